"""Watching a client's ZeroMQ connection to the controller (socket monitors).

- :func:`watch_controller`: ipyparallel's Client waits for ever for the results
  of a controller that died; a client of globular's watches its connection
  instead, and when it drops every result still outstanding fails at once with
  an error that says so, and what to run.
- :class:`HandshakeWatch`: when a connection request times out, what the
  connection saw (no answer at the address, a handshake the controller refused,
  or a controller that took the connection and did not answer).

Each monitor binds an inproc address of its own (pyzmq's default names it after
the socket's file descriptor, which a later socket may reuse while the old
monitor's endpoint is still bound).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

log = logging.getLogger(__name__)
_serial = itertools.count()

HANDSHAKE_FAILED: dict[int, str] = {
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "no detail",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "protocol error",
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "authentication refused",
}
PROBE_SECONDS = 3.0


def _monitor(socket: zmq.Socket[Any], events: int) -> zmq.Socket[Any]:
    """A PAIR socket receiving ``socket``'s events, on an inproc address no other monitor has."""
    addr = f"inproc://globular-monitor-{id(socket):x}-{next(_serial)}"
    socket.monitor(addr, events)
    pair: zmq.Socket[Any] = socket.context.socket(zmq.PAIR)
    pair.connect(addr)
    return pair


def _unmonitor(socket: zmq.Socket[Any] | None, pair: zmq.Socket[Any] | None) -> None:
    """Turn ``socket``'s monitor off, then close its reader ``pair``: in this order only (a
    monitor left on without a reader blocks libzmq's I/O thread at its next event, #3575)."""
    if socket is not None and not socket.closed:
        try:
            socket.monitor(None, 0)
        except zmq.ZMQError:
            pass
    if pair is not None:
        pair.close(linger=0)


class ControllerWatch:
    """Fails a client's outstanding results when its connection to the controller drops."""

    def __init__(self, client: Any, cluster: str) -> None:
        self.client = client
        self.cluster = cluster
        self.socket = client._query_socket
        self.monitor = _monitor(self.socket, zmq.EVENT_DISCONNECTED)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="globular-controller-watch", daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        # reads every event until stop(): a monitor whose events nobody reads blocks libzmq's I/O
        # thread once its queue is full (and one whose reader is gone blocks it at the first
        # event: libzmq #3575), and that thread serves every socket of the context
        failed = False
        try:
            while not self.stopping.is_set():
                if not self.monitor.poll(200):
                    continue
                event = recv_monitor_message(self.monitor)["event"]
                if event == zmq.EVENT_DISCONNECTED and not failed:
                    failed = True
                    log.warning("the controller of cluster %s is gone", self.cluster)
                    self.client._io_loop.add_callback(fail_outstanding, self.client, self.cluster)
        except zmq.ZMQError:  # the client closed under us
            return

    def stop(self) -> None:
        """Stop watching (before the client closes its sockets): the monitor is turned off on
        the socket first, then its reader closed (the other order can block libzmq, #3575)."""
        self.stopping.set()
        self.thread.join(2)
        _unmonitor(self.socket, self.monitor)


def watch_controller(client: Any, cluster: str) -> ControllerWatch:
    """Watch ``client``'s connection to the controller of ``cluster`` until ``.stop()``."""
    return ControllerWatch(client, cluster)


def fail_outstanding(client: Any, cluster: str) -> None:
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


class HandshakeWatch:
    """The events of a client's query socket while it asks for its connection; :meth:`why`
    turns them (or, when they were missed, a probe's) into a reason."""

    def __init__(self) -> None:
        self.socket: zmq.Socket[Any] | None = None
        self.monitor: zmq.Socket[Any] | None = None

    def attach(self, socket: zmq.Socket[Any]) -> None:
        self.socket = socket
        self.monitor = _monitor(socket, zmq.EVENT_ALL)

    def events(self) -> list[int]:
        seen: list[int] = []
        while self.monitor is not None and self.monitor.poll(0):
            seen.append(recv_monitor_message(self.monitor)["event"])
        return seen

    def why(self, url: str, serverkey: bytes | None) -> str:
        """Why a connection request to the controller at ``url`` got no answer."""
        seen = self.events()
        if not any(e in seen for e in (zmq.EVENT_HANDSHAKE_SUCCEEDED, *HANDSHAKE_FAILED)):
            seen += probe(url, serverkey)
        return judge(seen, url, curve=bool(serverkey))

    def close(self) -> None:
        _unmonitor(self.socket, self.monitor)
        self.socket = self.monitor = None


def probe(url: str, serverkey: bytes | None, seconds: float = PROBE_SECONDS) -> list[int]:
    """The events of a fresh socket connecting to the controller's registration ``url`` as the
    client did (its own context: nothing shared with the client that failed)."""
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        if serverkey:
            public, secret = zmq.curve_keypair()
            sock.curve_serverkey = serverkey
            sock.curve_publickey, sock.curve_secretkey = public, secret
        monitor = _monitor(sock, zmq.EVENT_ALL)
        sock.connect(url)
        seen: list[int] = []
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if monitor.poll(100):
                event = recv_monitor_message(monitor)["event"]
                seen.append(event)
                if event == zmq.EVENT_HANDSHAKE_SUCCEEDED or event in HANDSHAKE_FAILED:
                    break
        _unmonitor(sock, monitor)
        sock.close(linger=0)
        return seen
    finally:
        ctx.term()


def judge(seen: list[int], url: str, *, curve: bool) -> str:
    """A reason, in words, from a connection's monitor events."""
    mechanism = "CURVE handshake" if curve else "ZMTP handshake"
    failed = [HANDSHAKE_FAILED[e] for e in seen if e in HANDSHAKE_FAILED]
    if failed:
        return (
            f"the controller at {url} refused the {mechanism} ({failed[0]}): the connection file's "
            "curve_serverkey (or its encryption) is not that controller's; a stale file?"
        )
    if zmq.EVENT_HANDSHAKE_SUCCEEDED in seen:
        return (
            f"the connection to {url} and its {mechanism} work, but the controller did not answer "
            "the connection request in time (busy, or stopped: its log says)"
        )
    if zmq.EVENT_CONNECTED in seen and zmq.EVENT_DISCONNECTED in seen[seen.index(zmq.EVENT_CONNECTED) :]:
        return (
            f"the controller at {url} took the connection, then dropped it before the {mechanism} "
            "completed: its encryption or curve_serverkey differs from the connection file's (a stale file?)"
        )
    if zmq.EVENT_CONNECTED in seen:  # a wrong key is refused at once: this is a controller that does not answer
        return (
            f"the controller at {url} took the connection but never answered the {mechanism}: it is frozen "
            "or overloaded (`globular status` says which; `globular restart-controller` starts a new one)"
        )
    return f"nothing answers at {url} (the controller is not running, or not reachable from here)"
