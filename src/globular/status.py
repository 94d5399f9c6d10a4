"""What a recorded cluster is doing, asked of its nodes (one round trip each, bounded)
and of its plugins (each adds columns and problems through :meth:`Plugin.status`).

``globular status NAME`` shows :func:`cluster_status`: per node, where its bring-up got
to (provision → ssh → setup → env → engines → registered) and how long each step
took, its load, how long it has been in the cluster, the plugins' columns, and
what is wrong.  ``listclusters`` shows :func:`cluster_health` for every cluster at
once: is the record what the nodes say (a dead process, a start that was killed
half-way, nodes that do not answer)?
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from globular.cluster import load_plugin
from globular.errors import GlobularError
from globular.node.proc import pid_alive
from globular.plugins.base import PluginStatus, StatusView
from globular.providers.base import NodeProvider
from globular.registry import RegistryError, make_provider
from globular.reporting import NODE_STEPS, step_label
from globular.state import ClusterRecord, NodeRecord

log = logging.getLogger(__name__)
ASK_TIMEOUT = 10.0


@dataclass
class NodeStatus:
    name: str
    address: str
    state: str  # the last step reached, or "unreachable", or what a plugin says ("engines dead")
    steps: dict[str, float]  # step -> seconds it took
    load: float | None
    uptime: float  # seconds in the cluster
    problem: str | None = None
    columns: dict[str, str] = field(default_factory=dict)  # the plugins' columns
    data: dict[str, Any] = field(default_factory=dict)  # the plugins' data (engines_running, ...)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), **self.data}


@dataclass
class ClusterStatusReport:
    name: str
    status: str  # the record's
    provider: str
    region: str
    nodes: list[NodeStatus] = field(default_factory=list)
    columns: dict[str, str] = field(default_factory=dict)  # the plugins' (controller, traffic, engines)
    data: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and all(n.problem is None for n in self.nodes)

    def to_dict(self) -> dict[str, Any]:
        base = {k: v for k, v in asdict(self).items() if k != "nodes"}
        return {**base, **self.data, "nodes": [n.to_dict() for n in self.nodes], "ok": self.ok}


@dataclass
class Health:
    """What the nodes say about one cluster's recorded processes, for ``listclusters``."""

    name: str
    condition: str = "ok"  # "ok", or what is wrong in a few words
    columns: dict[str, str] = field(default_factory=dict)  # the plugins' (engines, idle shutdown)

    @property
    def ok(self) -> bool:
        return self.condition == "ok"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def step_times(node: NodeRecord) -> dict[str, float]:
    """How long each step took: from the moment before it (another step, a restart's mark, or
    the node's creation) to when it was reached."""
    times = {}
    for step in NODE_STEPS:
        if step in node.steps:
            reached = node.steps[step]
            before = max([node.created, *(t for t in node.steps.values() if t < reached)])
            times[step_label(node, step)] = round(max(0.0, reached - before), 2)
    return times


async def ask_node(
    provider: NodeProvider, node: NodeRecord, timeout: float = ASK_TIMEOUT, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """One round trip: which of ``node``'s recorded processes are alive and how many live
    children each has, the node's load and uptime (the node programs' ``facts``), and what the
    plugins asked for besides (``extra``: ipcluster's GPUs)."""
    procs = [p.model_dump() for p in node.processes]
    facts: dict[str, Any] = await provider.runner(node).nodeproc(
        "facts", {**(extra or {}), "procs": procs, "parents": procs}, timeout=timeout
    )
    return facts


def facts_requests(record: ClusterRecord, deep: bool) -> dict[str, Any]:
    """What the record's plugins want asked of every node besides (:meth:`Plugin.facts_request`)."""
    extra: dict[str, Any] = {}
    for spec in record.spec.plugins:
        try:
            extra.update(load_plugin(spec).facts_request(record, deep))
        except (GlobularError, RegistryError, ValueError):
            continue  # the plugin's status says what is wrong with it
    return extra


async def ask_nodes(
    record: ClusterRecord, provider: NodeProvider, deep: bool = False
) -> dict[str, dict[str, Any] | BaseException]:
    """:func:`ask_node` for every node at once; a node that fails gives its error."""
    extra = facts_requests(record, deep)

    async def one(node: NodeRecord) -> dict[str, Any]:
        return await asyncio.wait_for(ask_node(provider, node, extra=extra), ASK_TIMEOUT + 5)

    answers = await asyncio.gather(*(one(n) for n in record.nodes), return_exceptions=True)
    for answer in answers:
        if isinstance(answer, BaseException) and not isinstance(answer, Exception):
            raise answer
    return {n.name: a for n, a in zip(record.nodes, answers)}


def _why(error: BaseException) -> str:
    if isinstance(error, TimeoutError):
        return f"no answer within {ASK_TIMEOUT:g}s"
    return str(error) or type(error).__name__


async def provider_status(provider: NodeProvider, record: ClusterRecord) -> PluginStatus:
    """The provider's :meth:`~globular.providers.base.NodeProvider.status`, as a plugin's would
    read (Slurm: each node's job); a failure is a problem of the status, not an error."""
    try:
        found = await asyncio.wait_for(provider.status(record.nodes), ASK_TIMEOUT)
    except (GlobularError, TimeoutError) as exc:
        return PluginStatus(problems=[f"{record.spec.provider}: {_why(exc)}"])
    if found is None:
        return PluginStatus()
    return PluginStatus(
        node_columns=found.node_columns,
        node_problems=found.node_problems,
        node_states=found.node_states,
        problems=found.warnings,
    )


async def plugin_statuses(view: StatusView) -> list[PluginStatus]:
    """Each of the record's plugins' :meth:`~globular.plugins.base.Plugin.status`; a plugin that
    is not installed, or fails, is a problem of the status, not an error."""
    found = []
    for spec in view.record.spec.plugins:
        try:
            status = await load_plugin(spec).status(view)
        except GlobularError as exc:
            found.append(PluginStatus(problems=[f"plugin {spec.name!r}: {exc}"]))
            continue
        except Exception as exc:
            log.exception("plugin %s failed in status", spec.name)
            found.append(PluginStatus(problems=[f"plugin {spec.name!r} failed in status: {type(exc).__name__}: {exc}"]))
            continue
        if status is not None:
            found.append(status)
    return found


def balancer_words(record: ClusterRecord) -> str | None:
    """``running (pid 123), 1..3 nodes``: the cluster's balancer in a few words (None: it never had one)."""
    balancer = record.balancer
    if balancer is None:
        return None
    state = f"running (pid {balancer.pid})" if balancer.running else "stopped"
    return f"{state}, {balancer.bounds.min_nodes}..{balancer.bounds.max_nodes} nodes"


def balancer_data(record: ClusterRecord) -> dict[str, Any] | None:
    """The balancer for ``status --output json``: whether it runs, its bounds, the desired node
    count, and its last decisions with their reasons."""
    balancer = record.balancer
    if balancer is None:
        return None
    return {
        "running": balancer.running,
        "pid": balancer.pid,
        "started": balancer.started,
        **balancer.bounds.model_dump(),
        "desired_nodes": len(record.desired),
        "events": [e.model_dump() for e in balancer.events],
    }


async def cluster_status(record: ClusterRecord, home: Path) -> ClusterStatusReport:
    report = ClusterStatusReport(record.name, record.status, record.spec.provider, record.region)
    if record.balancer is not None:
        report.columns["balancer"] = balancer_words(record) or ""
        report.data["balancer"] = balancer_data(record)
    provider = make_provider(record.spec, cluster=record.name, home=home)
    try:
        jobs = await provider_status(provider, record)
        facts = await ask_nodes(record, provider, deep=True)
        statuses = await plugin_statuses(StatusView(record, facts, provider.runner, home, deep=True))
    finally:
        await provider.close()
    statuses.insert(0, jobs)
    now = time.time()
    for node in record.nodes:
        reached = [s for s in NODE_STEPS if s in node.steps]
        status = NodeStatus(
            node.name, node.address, reached[-1] if reached else "provision", step_times(node), None,
            round(now - node.created, 1),
        )  # fmt: skip
        answer = facts[node.name]
        if isinstance(answer, BaseException):
            status.state = "unreachable"
            status.problem = f"does not answer: {_why(answer)}"
        else:
            status.load = round(answer["load"][0], 2)
        if node.name in jobs.node_problems:  # why it does not answer: Slurm ended its job
            status.state = jobs.node_states.get(node.name, status.state)
            status.problem = jobs.node_problems[node.name]
        for plugin in statuses:
            status.columns.update(plugin.node_columns.get(node.name, {}))
            status.data.update(plugin.node_data.get(node.name, {}))
            if status.problem is None and node.name in plugin.node_problems:
                status.state = plugin.node_states.get(node.name, status.state)
                status.problem = plugin.node_problems[node.name]
        report.nodes.append(status)
    for plugin in statuses:
        report.columns.update(plugin.columns)
        report.data.update(plugin.data)
        report.problems += plugin.problems
    return report


async def cluster_health(record: ClusterRecord, home: Path) -> Health:
    health = Health(record.name)
    if record.balancer is not None:
        health.columns["balancer"] = balancer_words(record) or ""
    if record.status in ("starting", "stopping") and not pid_alive(record.owner_pid):
        health.condition = (
            f"interrupted: its globular process (pid {record.owner_pid}) is gone while {record.status}; "
            f"`globular terminate {record.name}` cleans up"
        )
    try:
        provider = make_provider(record.spec, cluster=record.name, home=home)
    except RegistryError as exc:
        health.condition = f"unknown: {exc}"
        return health
    try:
        jobs = await provider_status(provider, record)
        facts = await ask_nodes(record, provider)
        statuses = await asyncio.wait_for(
            plugin_statuses(StatusView(record, facts, provider.runner, home, deep=False)), ASK_TIMEOUT
        )
    except TimeoutError:
        health.condition = f"unknown: the plugins' status took longer than {ASK_TIMEOUT:g}s"
        return health
    finally:
        await provider.close()
    ended = [f"{node} {problem}" for node, problem in jobs.node_problems.items()]
    if ended:
        health.condition = "degraded: " + ", ".join(ended)
        return health
    for plugin in statuses:
        health.columns.update(plugin.columns)
    condition = next((s.condition for s in statuses if s.condition), None)
    if condition and health.ok:
        health.condition = condition
    if not health.ok:
        return health
    unreachable = [f"{name} ({_why(a)})" for name, a in facts.items() if isinstance(a, BaseException)]
    if unreachable:
        health.condition = f"unknown: no answer from {', '.join(unreachable)}"
        return health
    recorded: Counter[str] = Counter()
    alive: Counter[str] = Counter()
    for node in record.nodes:
        answer = facts[node.name]
        assert isinstance(answer, dict)
        for proc, up in zip(node.processes, answer["alive"]):
            recorded[proc.role] += 1
            alive[proc.role] += int(up)
    dead = [
        f"{role} down" if recorded[role] == 1 else f"{recorded[role] - alive[role]} of {recorded[role]} {role} dead"
        for role in sorted(recorded)
        if alive[role] < recorded[role]
    ]
    if dead:
        health.condition = "degraded: " + ", ".join(dead)
    elif any(s.problems for s in statuses):
        health.condition = "; ".join(p for s in statuses for p in s.problems)
    return health


async def health_of_all(records: list[ClusterRecord], home: Path) -> dict[str, Health]:
    results = await asyncio.gather(*(cluster_health(r, home) for r in records))
    return {h.name: h for h in results}


def listed(record: ClusterRecord, health: Health) -> dict[str, Any]:
    """One row of ``listclusters``: the record's facts and what the nodes said."""
    return {
        "name": record.name,
        "status": record.status,
        "provider": record.spec.provider,
        "region": record.region,
        "nodes": len(record.nodes),
        "template": record.spec.template,
        "up": round(time.time() - record.created),
        "columns": health.columns,
        "health": health.condition,
        "ok": health.ok,
    }
