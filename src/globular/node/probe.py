"""The network as a node sees it: free ports for the controller, a stand-in listener, a connect."""

from __future__ import annotations

import time
from typing import Any

from globular.node.protocol import Refused, Request, verb


def _quiet_ports() -> list[int]:
    """Ports in a random order that no process is handed without asking for them by number:
    below the kernel's ephemeral range (bind to port 0) and below pyzmq's random ports (49152
    and up: engines, their nannies and kernels bind those while the controller starts)."""
    import random

    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            ephemeral = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral = 32768
    ports = list(range(20000, max(20000 + 1000, min(ephemeral, 49152))))
    random.shuffle(ports)
    return ports


@verb(any_python=True)
def free_ports(req: Request) -> Any:
    """``req["count"]`` distinct TCP ports free on ``req["ip"]``, taken from ``req["ports"]``
    when given (else from :func:`_quiet_ports`, then any); fewer when not enough are free."""
    import socket

    held: list[Any] = []
    try:
        for port in req.get("ports") or [*_quiet_ports()[: req["count"] * 4], *[0] * req["count"]]:
            if len(held) == req["count"]:
                break
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.bind((req["ip"], port))
            except OSError:
                s.close()
                continue
            held.append(s)
        return [s.getsockname()[1] for s in held]
    finally:
        for s in held:
            s.close()


@verb()
def listen(req: Request) -> Any:
    """Accept TCP connections on ``ip:port`` for ``seconds`` (preflight's stand-in controller)."""
    import socket

    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((req["ip"], int(req["port"])))
    server.listen(64)
    server.settimeout(0.2)
    deadline = time.monotonic() + float(req.get("seconds", 30))
    while time.monotonic() < deadline:
        try:
            conn, _ = server.accept()
            conn.close()
        except OSError:
            continue
    return True


@verb(any_python=True)
def connect(req: Request) -> Any:
    """Can this node open a TCP connection to ``host:port``?"""
    import socket

    try:
        with socket.create_connection((req["host"], int(req["port"])), timeout=float(req.get("timeout", 5))):
            return {"ok": True}
    except OSError as exc:
        return {"ok": False, "error": exc.strerror or str(exc)}


def pipe(req: Request) -> None:
    """Relay one TCP connection to ``host:port``, as the node sees it, over this process's stdin
    and stdout, until both ends close (stdin's end is passed on as a half-close): a port forwarded
    through the node's own programs (what ``kubectl port-forward`` does for a pod), run as
    ``python -c SOURCE pipe REQUEST``.  A connection refused there is :class:`Refused` (exit
    status 3, the reason on stderr), before a byte is relayed."""
    import os
    import socket
    import threading

    try:
        conn = socket.create_connection((req["host"], int(req["port"])), timeout=float(req.get("timeout", 10)))
    except OSError as exc:
        raise Refused(exc.strerror or str(exc)) from None
    conn.settimeout(None)

    def inward() -> None:  # stdin -> the connection
        try:
            while block := os.read(0, 1 << 16):
                conn.sendall(block)
        except OSError:
            pass
        try:
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    threading.Thread(target=inward, daemon=True).start()
    try:
        while block := conn.recv(1 << 16):
            view = memoryview(block)
            while view:
                view = view[os.write(1, view) :]
    except OSError:
        pass
    finally:
        conn.close()
