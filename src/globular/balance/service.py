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
from typing import Any

from globular.bounds import BoundsProblem, balance_from_flags
from globular.errors import BadInput, BalancerRunning, GlobularError
from globular.logs import log_file
from globular.paths import private_dir
from globular.reference import in_duration
from globular.registry import provider_class
from globular.spec import BalanceSpec
from globular.state import ClusterRecord, StateStore

START_TIMEOUT = 30.0  # s for a detached balancer to record itself


@dataclass
class Detached:
    pid: int
    log: str


def chosen_bounds(record: ClusterRecord, flags: dict[str, Any]) -> BalanceSpec:
    """The balancer's bounds for ``record``: its template's, with ``loadbalance``'s flags
    (``min_nodes``, ``max_nodes``, ... those not None) instead; a template without
    ``min_nodes`` needs ``-n`` and ``-m``.  Checked against the cluster's ``max_nodes`` and
    what its provider can place (:class:`BadInput` naming the flag)."""
    spec = record.spec.balance
    if spec is None:
        missing = [flag for key, flag in (("min_nodes", "-n"), ("max_nodes", "-m")) if flags.get(key) is None]
        if missing:
            raise BadInput(
                f"cluster {record.name!r} has no min_nodes and max_nodes in its template "
                f"[cluster {record.spec.template}]: give {' and '.join(missing)}"
            )
        spec = BalanceSpec(min_nodes=flags["min_nodes"], max_nodes=flags["max_nodes"])
    provider = provider_class(record.spec.provider)
    limit = provider.max_nodes(record.spec.typed_provider_settings(provider.Settings))
    try:
        return balance_from_flags(spec, flags, record.spec.max_nodes, limit, record.spec.provider)
    except BoundsProblem as exc:
        flag = "-m" if exc.key == "max_nodes" else "-n"
        value = flags.get(exc.key) or getattr(spec, exc.key)
        said = exc.message if exc.message.startswith(f"{value}") else f"{value}: {exc.message}"
        raise BadInput(f"{flag} {said}") from None


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
