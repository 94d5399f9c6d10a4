"""Is a recorded cluster what its record says?  Asked of the nodes, by pid.

``listclusters`` shows the answer: a dead controller, dead engines, a start
that was killed half-way (its globular process is gone), or nodes that do not
answer.  Each cluster is checked with a bounded time, all at once.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from globular.errors import GlobularError
from globular.plugins.idle import idle_state_file
from globular.plugins.roles import DATA_KEY, ENGINE, SUPERVISOR
from globular.registry import RegistryError, provider_class
from globular.state import ClusterRecord, NodeRecord

CHECK_TIMEOUT = 10.0


@dataclass
class Health:
    """What the nodes say about one cluster's recorded processes."""

    name: str
    condition: str = "ok"  # "ok", or what is wrong in a few words
    alive: Counter = field(default_factory=Counter)  # role -> processes alive
    recorded: Counter = field(default_factory=Counter)  # role -> processes recorded
    engines_alive: int | None = None  # engine processes running now (supervised ones included)
    idle_deadline: float | None = None  # idle_shutdown: when it will stop the cluster (epoch s)
    idle_shutdown_at: float | None = None  # ... or when it did

    @property
    def ok(self) -> bool:
        return self.condition == "ok"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def ask_node(provider, node: NodeRecord, timeout: float = CHECK_TIMEOUT) -> dict:
    """One round trip: which of ``node``'s recorded processes are alive, how many engines each
    supervisor runs, and the node's load and uptime (nodeproc ``facts``)."""
    supervisors = [p.model_dump() for p in node.processes if p.role == SUPERVISOR]
    request = {"procs": [p.model_dump() for p in node.processes], "parents": supervisors}
    return await provider.runner(node)._nodeproc("facts", request, timeout=timeout)


async def check(record: ClusterRecord, home: Path) -> Health:
    health = Health(record.name)
    if record.status in ("starting", "stopping") and not _pid_alive(record.owner_pid):
        health.condition = (
            f"interrupted: its globular process (pid {record.owner_pid}) is gone while {record.status}; "
            f"`globular terminate {record.name}` cleans up"
        )
    try:
        provider = provider_class(record.spec.provider)(record.spec, cluster=record.name, home=home)
    except RegistryError as exc:
        health.condition = f"unknown: {exc}"
        return health
    idle = None
    try:
        asks = [ask_node(provider, n) for n in record.nodes]
        if (record.plugin_data.get(DATA_KEY) or {}).get("idle_shutdown"):
            master = record.master
            asks.append(provider.runner(master)._nodeproc("read_json", {"path": idle_state_file(master)}))
        results = await asyncio.wait_for(asyncio.gather(*asks, return_exceptions=True), CHECK_TIMEOUT)
        if len(results) > len(record.nodes):
            idle, results = results[-1], results[: len(record.nodes)]
    except TimeoutError:
        health.condition = f"unknown: nodes did not answer within {CHECK_TIMEOUT:g}s"
        return health
    finally:
        await provider.close()
    engines = 0
    unreachable = []
    for node, result in zip(record.nodes, results):
        if isinstance(result, BaseException):
            unreachable.append(f"{node.name} ({result})" if isinstance(result, GlobularError) else node.name)
            continue
        alive, children = result["alive"], result["children"]
        for proc, up in zip(node.processes, alive):
            health.recorded[proc.role] += 1
            health.alive[proc.role] += int(up)
            engines += int(up) if proc.role == ENGINE else 0
        engines += sum(children)
    health.engines_alive = engines
    if isinstance(idle, dict):
        health.idle_deadline = idle.get("deadline")
        health.idle_shutdown_at = idle.get("shutdown")
        if health.idle_shutdown_at and health.ok:
            stamp = time.strftime("%H:%M:%S", time.localtime(health.idle_shutdown_at))
            health.condition = f"idle shutdown at {stamp}: `globular terminate {record.name}` releases the nodes"
            return health
    if not health.ok:
        return health
    if unreachable:
        health.condition = f"unknown: no answer from {', '.join(unreachable)}"
        return health
    dead = [
        f"{role} down"
        if health.recorded[role] == 1
        else f"{health.recorded[role] - health.alive[role]} of {health.recorded[role]} {role} dead"
        for role in sorted(health.recorded)
        if health.alive[role] < health.recorded[role]
    ]
    if dead:
        health.condition = "degraded: " + ", ".join(dead)
    return health


async def check_all(records: list[ClusterRecord], home: Path) -> dict[str, Health]:
    results = await asyncio.gather(*(check(r, home) for r in records))
    return {h.name: h for h in results}
