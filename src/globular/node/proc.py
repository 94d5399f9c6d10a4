"""Processes on a node: started detached in sessions of their own, checked and stopped by pid.

A process is ``{"pid": int, "start": int}``: the kernel's start time (field 22 of
/proc/PID/stat) makes sure a reused pid is never signalled.  Every process is started in a
session of its own, so it and its children form one process group, which is what gets
signalled.  A zombie counts as stopped.  Every process globular starts carries ``MARK``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Any

from globular.node.protocol import Proc, Refused, Request, verb


def _stat(pid: int | str) -> tuple[str, int, int, int] | None:
    """``(state, ppid, pgrp, start)`` of process ``pid`` from /proc/PID/stat (None: gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(")") + 2 :].split()
    return fields[0], int(fields[1]), int(fields[2]), int(fields[19])


def _processes() -> dict[int, tuple[str, int, int, int]]:
    """Every live process: ``{pid: (state, ppid, pgrp, start)}``."""
    found: dict[int, tuple[str, int, int, int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(entry)
            if st is not None and st[0] not in ("Z", "X"):
                found[int(entry)] = st
    return found


def process_start(pid: int) -> int | None:
    """The start time (clock ticks since boot) of live process ``pid`` of this machine; None
    when there is none.  A pid and its start time name one process for good."""
    st = _stat(pid)
    return st[3] if st is not None and st[0] not in ("Z", "X") else None


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (one of another user's counts); for a pid this machine
    recorded itself (a globular process, a save in progress), not one that could be reused."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _alive(proc: Proc) -> bool:
    st = _stat(proc["pid"])
    return st is not None and st[0] not in ("Z", "X") and st[3] == proc["start"]


def _signal(proc: Proc, sig: int) -> bool:
    if not _alive(proc):
        return False
    try:
        os.killpg(proc["pid"], sig)
    except OSError:
        try:
            os.kill(proc["pid"], sig)
        except OSError:
            return False
    return True


_spawned: list[int] = []  # pids this process started (a keeper reaps them as they end)


@verb(any_python=True)
def spawn(req: Request) -> Any:
    started = []
    try:
        for spec in req["procs"]:
            env = dict(os.environ)
            env.update(spec.get("env") or {})
            if req.get("mark"):
                env[MARK] = req["mark"]
            log_dir = os.path.dirname(spec["log"])
            if log_dir:
                os.makedirs(log_dir, mode=0o700, exist_ok=True)
            cwd = os.path.expanduser(spec["cwd"]) if spec.get("cwd") else None
            if cwd:
                if os.path.exists(cwd) and not os.path.isdir(cwd):
                    raise Refused(f"cannot start {spec['argv'][0]} in {cwd}: it is not a folder")
                os.makedirs(cwd, mode=0o700, exist_ok=True)
            with open(spec["log"], "ab") as log:
                child = subprocess.Popen(
                    spec["argv"],
                    cwd=cwd,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    umask=0o077,
                )
            st = _stat(child.pid)
            started.append({"pid": child.pid, "start": st[3] if st else 0})
            _spawned.append(child.pid)
    except OSError as exc:
        for proc in started:
            _signal(proc, signal.SIGKILL)
        raise Refused(f"cannot start {spec['argv'][0]!r}: {exc.strerror or exc}") from None
    return started


@verb(any_python=True)
def alive(req: Request) -> Any:
    return [_alive(p) for p in req["procs"]]


def _wait_gone(procs: list[Proc], timeout: float) -> list[Proc]:
    """What of ``procs`` still runs after ``timeout`` s (asked every 5 ms: a stop returns as soon
    as its processes are gone, and asking reads one small /proc file a process)."""
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in procs if _alive(p)]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.005)


def _descendants(procs: list[Proc]) -> list[Proc]:
    """Processes that stopping ``procs`` must stop too: children (and theirs) that left the
    process group, such as ipyparallel's engine nanny (a session of its own), and what is
    left of the group of a leader that died (SIGKILL)."""
    parents: dict[int, list[Proc]] = {}
    for pid, (_, ppid, pgrp, start) in _processes().items():
        parents.setdefault(ppid, []).append({"pid": pid, "start": start, "pgrp": pgrp})
    found, todo = [], [p["pid"] for p in procs if _alive(p)]
    groups = {p["pid"] for p in procs}
    # a dead leader's group lives on in its children (the controller's forked schedulers);
    # the kernel never hands out a pid still in use as a group id, so these are ours
    dead = groups - set(todo)
    for members in parents.values():
        for child in members:
            if child["pgrp"] in dead and child["pid"] not in dead:
                found.append({"pid": child["pid"], "start": child["start"]})
                todo.append(child["pid"])
    while todo:
        for child in parents.get(todo.pop(), []):
            todo.append(child["pid"])
            if child["pgrp"] not in groups:
                groups.add(child["pgrp"])
                found.append({"pid": child["pid"], "start": child["start"]})
    return found


@verb(any_python=True)
def stop(req: Request) -> Any:
    """SIGTERM (with strays of their process groups), wait up to ``timeout`` s, then SIGKILL what is left."""
    strays = _descendants(req["procs"])
    running = [p for p in req["procs"] if _signal(p, signal.SIGTERM)]
    for proc in strays:
        _signal(proc, signal.SIGTERM)
    left = _wait_gone(running + strays, float(req.get("timeout", 10)))
    for proc in left:
        _signal(proc, signal.SIGKILL)
    remaining = _wait_gone(left, 5.0)
    requested = {(p["pid"], p["start"]) for p in req["procs"]}
    return {
        "stopped": len(running),
        "killed": sum(1 for p in left if (p["pid"], p["start"]) in requested),
        "remaining": [p for p in remaining if (p["pid"], p["start"]) in requested],
    }


MARK = "GLOBULAR_MARK"  # in the environment of every process globular starts: "<home id>/<cluster>/<node>"


def _marked(prefix: str) -> list[Proc]:
    """Live processes (of this user) whose GLOBULAR_MARK is ``prefix`` or starts with ``prefix/``."""
    found = []
    wanted = f"{MARK}={prefix}".encode()
    mine = {os.getpid(), os.getppid()}
    for pid, (_, _, _, start) in _processes().items():
        if pid in mine:
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                entries = f.read().split(b"\0")
        except OSError:  # gone, or another user's
            continue
        if any(e == wanted or e.startswith(wanted + b"/") for e in entries):
            found.append({"pid": pid, "start": start})
    return found


@verb(any_python=True)
def sweep(req: Request) -> Any:
    """Stop every process marked ``req["mark"]`` (see MARK) that is not in ``req["known"]``:
    those a start that was killed between spawning and recording left behind.  Like ``stop``:
    SIGTERM to each process group, SIGKILL after ``timeout`` s."""
    known = {(p["pid"], p["start"]) for p in req.get("known", [])}
    strays = [p for p in _marked(req["mark"]) if (p["pid"], p["start"]) not in known]
    if not strays:
        return {"stopped": 0, "killed": 0, "remaining": []}
    return stop({"procs": strays, "timeout": req.get("timeout", 5)})


@verb(any_python=True)
def children(req: Request) -> Any:
    """How many live children each process of ``req["procs"]`` has (a supervisor's engines)."""
    counts = {p["pid"]: 0 for p in req["procs"] if _alive(p)}
    for _, ppid, _, _ in _processes().values():
        if ppid in counts:
            counts[ppid] += 1
    return [counts.get(p["pid"], 0) for p in req["procs"]]
