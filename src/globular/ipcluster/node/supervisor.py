"""The engine supervisor: one process per node that keeps its engines running.

Started (``restart_dead_engines = True``) as ``python -c <this source> REQUEST``
where REQUEST is a JSON file (0600) naming the engines to run::

    {"engines": [{"argv": [...], "log": "...", "env": {...}}], "restart_id_arg": "--IPEngine.id=", "restart_args": []}

(The controller runs under one too, with ``restart_args = ["--restore"]``: a controller
that comes back on the same ports with its engines' state keeps them and their ids.)

Standard library only, like :mod:`globular.node`.  Each engine runs in a
session of its own, as a child of the supervisor; when one exits, it is started
again (without the id it first asked for: the controller gives it a fresh one),
after a back-off that grows while it keeps dying at once (1 s, 2 s, ... 30 s).
On SIGTERM the supervisor stops restarting, SIGTERMs every engine's process
group, waits up to 10 s, SIGKILLs what is left and exits.  ``globular status`` counts its engines as its live children.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

QUICK_DEATH = 10.0  # s: an engine that dies sooner is restarted after a growing pause
MAX_PAUSE = 30.0


def log(message: str) -> None:
    sys.stdout.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} [supervisor] {message}\n")
    sys.stdout.flush()


class Slot:
    def __init__(self, spec: dict[str, Any], id_arg: str, restart_args: list[str]):
        self.argv = list(spec["argv"])
        self.log = spec["log"]
        self.env = dict(os.environ, **spec["env"]) if spec.get("env") else None  # its own (its GPU)
        self.id_arg = id_arg
        self.restart_args = restart_args
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.failures = 0
        self.restarts = 0
        self.due = 0.0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                umask=0o077,
                env=self.env,
            )
        self.started = time.monotonic()

    def exited(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def plan_restart(self) -> None:
        assert self.proc is not None
        code = self.proc.returncode
        try:  # what it left in its group (a controller's schedulers, an engine's nanny) goes too
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass
        lived = time.monotonic() - self.started
        self.failures = self.failures + 1 if lived < QUICK_DEATH else 0
        pause = min(MAX_PAUSE, 2 ** (self.failures - 1)) if self.failures else 0.0
        self.restarts += 1
        log(f"engine pid {self.proc.pid} exited with {code} after {lived:.1f}s; restart #{self.restarts} in {pause:g}s")
        # the first id was claimed by globular; a new engine asks the controller for a fresh one
        self.argv = [a for a in self.argv if not a.startswith(self.id_arg)]
        self.argv += [a for a in self.restart_args if a not in self.argv]
        self.proc = None
        self.due = time.monotonic() + pause


def stop_all(slots: list[Slot], timeout: float = 10.0) -> None:
    live = [s.proc for s in slots if s.proc is not None and s.proc.poll() is None]
    for proc in live:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except OSError:
            pass
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in live) and time.monotonic() < deadline:
        time.sleep(0.05)
    for proc in live:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
            proc.wait()


def main(argv: list[str]) -> None:
    path = argv[1]
    with open(path) as f:
        request = json.load(f)
    stopping: list[bool] = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    signal.signal(signal.SIGINT, lambda *_: stopping.append(True))
    id_arg, again = request.get("restart_id_arg", "--IPEngine.id="), request.get("restart_args", [])
    slots = [Slot(spec, id_arg, again) for spec in request["engines"]]
    for slot in slots:
        slot.start()
    log(f"started {len(slots)} engines: pids {[s.pid for s in slots]}")
    while not stopping:
        for slot in slots:
            if stopping:
                break
            if slot.proc is not None and slot.exited():
                slot.plan_restart()
            if slot.proc is None and time.monotonic() >= slot.due:
                slot.start()
                log(f"engine restarted: pid {slot.pid}")
        time.sleep(0.2)
    log("stopping")
    stop_all(slots)


if __name__ == "__main__":
    main(sys.argv)
