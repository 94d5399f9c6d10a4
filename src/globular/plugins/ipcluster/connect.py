"""Reaching a running cluster's controller from this machine: ``globular.connect``.

When the master is reached by ssh, the controller's ports are forwarded over
globular's own SSH connection (the cluster's key, known_hosts and user), held by
a thread until the client is closed; nothing but SSH has to be reachable.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from globular.aio import LoopThread
from globular.paths import globular_home
from globular.plugins.ipcluster.controller import connection_info, reachable_info, record_data
from globular.registry import make_provider
from globular.state import StateStore

if TYPE_CHECKING:
    from ipyparallel import Client


def connect(name: str, *, home: Path | None = None, timeout: float = 10.0) -> Client:
    """A ready ``ipyparallel.Client`` for running cluster ``name``."""
    from ipyparallel import Client

    home = home or globular_home()
    record = StateStore(home).get(name)
    info = connection_info(record_data(record), record.name)
    if record.master.is_local:
        return Client(info, timeout=timeout)
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
    return client
