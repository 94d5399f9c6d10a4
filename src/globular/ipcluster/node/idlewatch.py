"""Idle shutdown (``idle_shutdown = 30m``), run on the nodes as ``python -c <this source> REQUEST``.

On the master (``mode = "master"``) it asks the controller, every few seconds,
whether any task is queued or running and how many have completed; when nothing
has run for ``idle`` seconds it shuts the engines and the controller down through
the controller (``Client.shutdown(hub=True)``) and writes what it did to the
state file.  The state file (``deadline``, ``last_activity``, ``shutdown``) is
what ``listclusters`` shows.

On every other node whose provider says how a node gives itself back
(``NodeProvider.release_commands``: a Slurm job ends itself with ``scancel``, an
EC2 instance powers itself off and so terminates) it only watches the
controller's address (``mode = "node"``): once the controller has been gone for
``grace`` seconds, the node runs those commands.  The master does the same after
its shutdown.  This program knows no provider: it runs the commands it is given.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from typing import Any


def write_state(path: str, state: dict[str, Any]) -> None:
    tmp = f"{path}.tmp"
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        json.dump(state, f)
    os.replace(tmp, path)


def release(commands: list[list[str]]) -> bool:
    """Give this node back the way its provider said (``commands``, in turn, until one succeeds):
    a Slurm node ends its job, a rented machine powers itself off."""
    for argv in commands:
        try:
            if subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=60).returncode == 0:
                return True
        except (OSError, subprocess.TimeoutExpired):
            continue
    return False


def reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=3):
            return True
    except OSError:
        return False


def watch_master(req: dict[str, Any]) -> None:
    from ipyparallel import Client

    idle = float(req["idle"])
    client = Client(req["connection_file"], timeout=30)
    last_activity = time.time()
    completed = None
    state = {"idle": idle, "last_activity": last_activity, "deadline": last_activity + idle, "shutdown": None}
    write_state(req["state_file"], state)
    while True:
        status = client.queue_status()
        # the controller's queue_status keeps every engine it ever had, a dead one's unfinished
        # tasks included (its ids never shrink): only the registered ones say what is busy
        registered = set(client.ids)
        engines = {k: v for k, v in status.items() if k in registered}
        busy = status.get("unassigned", 0) > 0 or any(v.get("queue") or v.get("tasks") for v in engines.values())
        done = sum(v.get("completed", 0) for v in engines.values())
        now = time.time()
        if busy or done != completed:
            last_activity = now
        completed = done
        state.update(last_activity=last_activity, deadline=last_activity + idle)
        write_state(req["state_file"], state)
        if now >= last_activity + idle:
            break
        time.sleep(max(0.2, min(5.0, idle / 20)))
    print(f"idle for {idle:g}s: shutting down the engines and the controller", flush=True)
    state["shutdown"] = time.time()
    write_state(req["state_file"], state)
    try:
        client.shutdown(targets="all", hub=True, block=False)
    finally:
        client.close()
    if req.get("release"):
        time.sleep(5)
        print("releasing this machine", flush=True)
        release(req["release"])


def watch_node(req: dict[str, Any]) -> None:
    grace = float(req.get("grace", 120))
    host, port = req["controller"], int(req["port"])
    gone_since = None
    while True:
        if reachable(host, port):
            gone_since = None
        elif gone_since is None:
            gone_since = time.monotonic()
        elif time.monotonic() - gone_since >= grace:
            print(f"the controller at {host}:{port} has been gone for {grace:g}s: releasing this machine", flush=True)
            release(req.get("release") or [])
            return
        time.sleep(10)


def main(argv: list[str]) -> None:
    with open(argv[1]) as f:
        req = json.load(f)
    (watch_master if req["mode"] == "master" else watch_node)(req)


if __name__ == "__main__":
    main(sys.argv)
