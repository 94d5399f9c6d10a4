"""``globular status NAME``: what each node is doing, asked of the nodes and the controller.

Per node: where its bring-up got to (provision → ssh → setup → engines →
registered) and how long each step took, its engines (running / registered /
expected), its load and how long it has been in the cluster; and, when
something is wrong, what and where to look.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from globular.errors import GlobularError
from globular.health import ask_node
from globular.plugins.engines import engine_node
from globular.plugins.ipcluster import IPCluster, IPClusterSettings, engines_for
from globular.plugins.roles import CONTROLLER, DATA_KEY, ENGINE
from globular.registry import provider_class
from globular.reporting import NODE_STEPS, step_label
from globular.state import ClusterRecord, NodeRecord

ASK_TIMEOUT = 10.0


@dataclass
class NodeStatus:
    name: str
    address: str
    state: str  # the last step reached, or "unreachable" / "engines dead"
    steps: dict[str, float]  # step -> seconds it took
    engines_running: int | None
    engines_registered: int | None
    engines_expected: int
    load: float | None
    uptime: float  # seconds in the cluster
    problem: str | None = None


@dataclass
class ClusterStatusReport:
    name: str
    status: str  # the record's
    provider: str
    region: str
    controller: str  # "up", "down", "unknown"
    nodes: list[NodeStatus] = field(default_factory=list)
    encryption: str | None = None  # "curve" (CurveZMQ), "none", or None: no controller recorded
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and all(n.problem is None for n in self.nodes)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def _settings(record: ClusterRecord) -> IPClusterSettings | None:
    for spec in record.spec.plugins:
        if spec.setup_class == f"{IPCluster.__module__}:{IPCluster.__qualname__}":
            return IPClusterSettings.model_validate(spec.settings)
    return None


def step_times(node: NodeRecord) -> dict[str, float]:
    times, previous = {}, node.created
    for step in NODE_STEPS:
        if step in node.steps:
            times[step_label(node, step)] = round(max(0.0, node.steps[step] - previous), 2)
            previous = node.steps[step]
    return times


def _registered(record: ClusterRecord, home: Path) -> dict[str, int] | None:
    """Registered engines per node, from the controller (None: it does not answer)."""
    from globular.client import connect

    try:
        client = connect(record.name, home=home, timeout=5)
    except Exception:  # no controller, no connection file, no tunnel: all mean "cannot tell"
        return None
    try:
        mapping = (record.plugin_data.get(DATA_KEY) or {}).get("engine_ids", {})
        counts: dict[str, int] = {}
        strays = [i for i in client.ids if str(i) not in mapping]
        for engine_id in client.ids:
            node = mapping.get(str(engine_id))
            if node:
                counts[node] = counts.get(node, 0) + 1
        if strays:  # restarted by a supervisor: ask them where they run
            result = client[strays].apply_async(engine_node)
            for node in result.get(10):
                counts[node] = counts.get(node, 0) + 1
        return counts
    except Exception:
        return None
    finally:
        client.close()


async def cluster_status(record: ClusterRecord, home: Path) -> ClusterStatusReport:
    report = ClusterStatusReport(record.name, record.status, record.spec.provider, record.region, "unknown")
    report.encryption = (record.plugin_data.get(DATA_KEY) or {}).get("encryption")
    settings = _settings(record)
    provider = provider_class(record.spec.provider)(record.spec, cluster=record.name, home=home)
    try:
        answers = await asyncio.gather(
            *(asyncio.wait_for(ask_node(provider, n, ASK_TIMEOUT), ASK_TIMEOUT + 5) for n in record.nodes),
            return_exceptions=True,
        )
    finally:
        await provider.close()
    registered = await asyncio.to_thread(_registered, record, home) if settings else None
    now = time.time()
    for node, answer in zip(record.nodes, answers):
        expected = engines_for(node, settings) if settings else 0
        steps = step_times(node)
        reached = [s for s in NODE_STEPS if s in node.steps]
        state = reached[-1] if reached else "provision"
        status = NodeStatus(
            node.name, node.address, state, steps, None, None, expected, None, round(now - node.created, 1)
        )
        if isinstance(answer, BaseException):
            status.state = "unreachable"
            why = (
                str(answer)
                if isinstance(answer, GlobularError)
                else (type(answer).__name__ if str(answer) == "" else str(answer))
            )
            status.problem = f"does not answer: {why}".strip()
            report.nodes.append(status)
            continue
        alive = dict(zip([(p.pid, p.start) for p in node.processes], answer["alive"]))
        status.load = round(answer["load"][0], 2)
        running = sum(1 for p in node.processes if p.role == ENGINE and alive[(p.pid, p.start)]) + sum(
            answer["children"]
        )
        status.engines_running = running
        if node.is_master:
            controllers = [p for p in node.processes if p.role == CONTROLLER]
            if controllers:
                report.controller = "up" if all(alive[(p.pid, p.start)] for p in controllers) else "down"
                if report.controller == "down":
                    report.problems.append(
                        f"the controller on {node.name} is not running (its log: {controllers[0].log})"
                    )
        if registered is not None:
            status.engines_registered = registered.get(node.name, 0)
        if expected and running < expected:
            status.state = "engines dead"
            status.problem = f"{expected - running} of {expected} engines not running (killed or crashed: their logs are in {node.workdir}/logs)"
        elif expected and status.engines_registered is not None and status.engines_registered < expected:
            status.state = "engines"
            status.problem = f"{expected - status.engines_registered} of {expected} engines running but not registered"
        report.nodes.append(status)
    if registered is None and settings and report.controller != "down" and record.status == "running":
        report.problems.append("the controller does not answer a client")
    return report
