"""The balancer as a background service: ``globular loadbalance --detach`` (and ``start`` when
the template sets ``min_nodes``) runs ``globular loadbalance NAME`` in a session of its own on
this machine, which holds the cluster's record: it outlives the terminal that started it, its
output goes to ``~/.globular/logs/NAME.balancer.log`` (0600), and the record names it (pid and
start time).  ``--stop`` and ``terminate`` stop it by that pid.  Killed with -9, it leaves the
cluster as it is; ``--detach`` again starts a new one.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from globular.errors import BalancerRunning, GlobularError
from globular.logs import log_file
from globular.paths import private_dir
from globular.reference import in_duration
from globular.spec import BalanceSpec
from globular.state import StateStore

START_TIMEOUT = 30.0  # s for a detached balancer to record itself


@dataclass
class Detached:
    pid: int
    log: str


def balancer_log(home: Path, name: str) -> Path:
    return log_file(home, name).with_suffix(".balancer.log")


def _flag(seconds: float) -> str:
    return in_duration(seconds) if float(seconds).is_integer() else f"{seconds:g}s"


def balancer_argv(name: str, spec: BalanceSpec) -> list[str]:
    """``globular loadbalance`` with every bound and pace of ``spec`` as a flag."""
    return [
        sys.executable, "-m", "globular", "loadbalance",
        "-n", str(spec.min_nodes), "-m", str(spec.max_nodes), "-i", _flag(spec.polling_interval),
        "-w", _flag(spec.wait_time), "-a", str(spec.add_nodes_per_iteration), "-k", _flag(spec.kill_after),
        "-s", _flag(spec.stabilization_time), "--replace-before", _flag(spec.replace_before), name,
    ]  # fmt: skip


def detach(name: str, spec: BalanceSpec, home: Path, timeout: float = START_TIMEOUT) -> Detached:
    """Start the balancer of running cluster ``name`` in the background; returns once it has
    recorded itself.  A balancer already running is refused; one that fails to start says why
    (the last lines of its log)."""
    store = StateStore(home)
    record = store.get(name)
    if record.balancer is not None and record.balancer.running:
        since = time.strftime("%Y-%m-%d %H:%M", time.localtime(record.balancer.started))
        raise BalancerRunning(name, record.balancer.pid, since)
    log = balancer_log(home, name)
    private_dir(log.parent)
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        child = subprocess.Popen(
            balancer_argv(name, spec),
            stdin=subprocess.DEVNULL,
            stdout=fd,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # no terminal's hangup reaches it
            env={**os.environ, "GLOBULAR_HOME": str(home)},
        )
    finally:
        os.close(fd)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.poll() is not None:
            raise GlobularError(f"the balancer of {name!r} did not start: {_last_lines(log)}")
        balancer = store.get(name).balancer
        if balancer is not None and balancer.pid == child.pid and balancer.running:
            return Detached(child.pid, str(log))
        time.sleep(0.05)
    child.kill()
    child.wait()
    raise GlobularError(f"the balancer of {name!r} did not record itself within {timeout:g} s: {_last_lines(log)}")


def _last_lines(log: Path, count: int = 3) -> str:
    try:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "(no log)"
    return " / ".join(lines[-count:]) or "(its log is empty)"
