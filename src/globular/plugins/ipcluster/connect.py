"""Reaching a running cluster's controller from this machine: ``globular.connect``.

When the master is reached by ssh, the controller's ports are forwarded over
globular's own SSH connection (the cluster's key, known_hosts and user), held by
a thread until the client is closed; nothing but SSH has to be reachable.

ipyparallel's Client waits for ever for the results of a controller that died.
The client ``connect`` returns watches its connection to the controller instead
(a ZeroMQ socket monitor): when it drops, every result still outstanding fails
at once with an error that says so, and what to run.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from globular.aio import LoopThread
from globular.paths import globular_home
from globular.plugins.ipcluster.controller import connection_info, reachable_info, record_data
from globular.registry import make_provider
from globular.state import StateStore

if TYPE_CHECKING:
    from ipyparallel import Client

log = logging.getLogger(__name__)


def connect(name: str, *, home: Path | None = None, timeout: float = 10.0) -> Client:
    """A ready ``ipyparallel.Client`` for running cluster ``name``."""
    from ipyparallel import Client

    home = home or globular_home()
    record = StateStore(home).get(name)
    info = connection_info(record_data(record), record.name)
    if record.master.is_local:
        return watch_controller(Client(info, timeout=timeout), record.name)
    tunnel = LoopThread("globular-ssh-tunnel")
    provider = make_provider(record.spec, cluster=record.name, home=home)

    def close_tunnel() -> None:
        if tunnel.loop.is_closed():  # closed already (close() and then the client's __del__)
            return
        try:
            tunnel.call(provider.close(), 10)
        finally:
            tunnel.close()

    try:
        info = tunnel.call(reachable_info(provider.runner(record.master), info), timeout + 30)
        client = Client(info, timeout=timeout)
    except BaseException:
        close_tunnel()
        raise
    close = client.close

    def close_with_tunnel(*args: Any, **kwargs: Any) -> Any:
        try:
            return close(*args, **kwargs)
        finally:
            close_tunnel()

    client.close = close_with_tunnel
    return watch_controller(client, record.name)


def watch_controller(client: Client, cluster: str) -> Client:
    """Fail ``client``'s outstanding results as soon as its connection to the controller drops."""
    import zmq
    from zmq.utils.monitor import recv_monitor_message

    monitor = client._query_socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    stop = threading.Event()

    def watch() -> None:
        try:
            while not stop.is_set():
                if monitor.poll(200) and recv_monitor_message(monitor)["event"] == zmq.EVENT_DISCONNECTED:
                    log.warning("the controller of cluster %s is gone", cluster)
                    client._io_loop.add_callback(fail_outstanding, client, cluster)
                    return
        except zmq.ZMQError:  # the client closed under us
            return
        finally:
            monitor.close(linger=0)

    thread = threading.Thread(target=watch, name="globular-controller-watch", daemon=True)
    thread.start()
    close = client.close

    def close_and_stop_watching(*args: Any, **kwargs: Any) -> Any:
        stop.set()
        thread.join(2)
        return close(*args, **kwargs)

    client.close = close_and_stop_watching
    return client


def fail_outstanding(client: Client, cluster: str) -> None:
    """Every result ``client`` still waits for fails (on its IO thread, where replies are handled),
    like ipyparallel fails the tasks of an engine that died."""
    from ipyparallel import error

    for msg_id in list(client.outstanding):
        if msg_id in client.results:
            continue
        try:
            raise error.EngineError(
                f"the controller of cluster {cluster!r} is gone, and with it task {msg_id}: "
                f"`globular status {cluster}` says why, `globular restart-controller {cluster}` starts a new one"
            )
        except error.EngineError:
            content = error.wrap_exception()
        msg = client.session.msg("apply_reply", content=content)
        msg["parent_header"]["msg_id"] = msg_id
        msg["metadata"]["engine"] = client.metadata[msg_id].get("engine_uuid") or ""
        client._handle_apply_reply(msg)
