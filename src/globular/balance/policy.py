"""What the balancer decides, and why: pure logic, no processes, no clock of its own.

Each poll the balancer hands :meth:`Policy.decide` the controller's view (:class:`ClusterLoad`:
tasks waiting for an engine, and each node's registered and busy engines), the desired node
set of the record and the time; it answers one :class:`Decision` or None.

- *Grow* when tasks have waited unassigned for ``wait_time`` (with ipyparallel's default
  ``TaskScheduler.hwm = 1`` a task waits only when every engine is working): enough nodes for
  the waiting tasks, counting the nodes asked for and not yet joined as coming, at most
  ``add_nodes_per_iteration`` at a time and never above ``max_nodes``.  Below ``min_nodes``
  (a node was lost) it adds at once.
- *Shrink* only whole nodes whose every engine has been idle (nothing queued, nothing running)
  for ``kill_after``, while no task waits; never the master; never below ``min_nodes``; never
  within ``stabilization_time`` of the last change; nodes asked for and not joined for
  ``kill_after`` first, then the node idle the longest.

The waits are measured on the caller's monotonic clock (``now``): a day-long wait is a float
of seconds, never a ``timedelta.seconds`` that wraps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from globular.plugins.base import ClusterLoad
from globular.results import counted


@dataclass(frozen=True)
class Bounds:
    """The balancer's settings (``[cluster]``'s, or ``loadbalance``'s flags), in nodes and seconds."""

    min_nodes: int
    max_nodes: int
    polling_interval: float = 5.0
    wait_time: float = 10.0
    add_nodes_per_iteration: int = 1
    kill_after: float = 60.0
    stabilization_time: float = 30.0
    replace_before: float = 300.0


@dataclass(frozen=True)
class Decision:
    """Add ``count`` nodes, or remove ``nodes``; ``reason`` says why, in words."""

    action: Literal["add", "remove"]
    reason: str
    count: int = 0
    nodes: tuple[str, ...] = ()


def _seconds(value: float) -> str:
    return f"{value:.0f} s" if value >= 10 else f"{value:.1f} s"


class Policy:
    """The balancer's memory between polls: since when tasks wait, since when each node idles,
    when the cluster last changed."""

    def __init__(self, bounds: Bounds):
        self.bounds = bounds
        self.waiting_since: float | None = None
        self.idle_since: dict[str, float] = {}
        self.coming_since: dict[str, float] = {}  # node asked for (desired) whose engines are not registered
        self.last_change: float | None = None

    def changed(self, now: float) -> None:
        """The desired node set changed at ``now`` (by this balancer or by a user's addnode)."""
        self.last_change = now

    def observe(self, load: ClusterLoad, now: float) -> None:
        if load.waiting <= 0:
            self.waiting_since = None
        elif self.waiting_since is None:
            self.waiting_since = now
        for name, node in load.nodes.items():
            if node.busy or not node.engines:
                self.idle_since.pop(name, None)
            else:
                self.idle_since.setdefault(name, now)
        for name in list(self.idle_since):
            if name not in load.nodes:
                del self.idle_since[name]

    def decide(self, load: ClusterLoad, desired: list[str], master: str, now: float) -> Decision | None:
        """What to do now, after :meth:`observe` of ``load``; ``desired``: the record's node set."""
        b = self.bounds
        size = len(desired)
        if size < b.min_nodes:
            count = min(b.min_nodes - size, b.max_nodes - size)
            return Decision("add", f"{size} of min_nodes {b.min_nodes} nodes", count=count)
        coming = [n for n in desired if n not in load.nodes]  # asked for, engines not registered yet
        for name in coming:
            self.coming_since.setdefault(name, now)
        for name in [n for n in self.coming_since if n not in coming]:
            del self.coming_since[name]
        waited = now - self.waiting_since if self.waiting_since is not None else 0.0
        if load.waiting > 0:
            if waited < b.wait_time or size >= b.max_nodes:
                return None
            per_node = max((n.engines for n in load.nodes.values()), default=1) or 1
            need = math.ceil(load.waiting / per_node) - len(coming)
            count = min(need, b.add_nodes_per_iteration, b.max_nodes - size)
            if count <= 0:
                return None
            return Decision(
                "add",
                f"{load.waiting} tasks waited {_seconds(waited)} for an engine "
                f"({load.busy} of {load.engines} engines busy, {len(coming)} nodes coming)",
                count=count,
            )
        if self.last_change is not None and now - self.last_change < b.stabilization_time:
            return None
        spare = size - b.min_nodes
        if spare <= 0:
            return None
        idle = sorted(
            (since, name)
            for name, since in self.idle_since.items()
            if name != master and name in desired and now - since >= b.kill_after
        )
        # a node asked for goes only once it has not joined for kill_after (a user's addnode in
        # flight, slow to boot, is not cancelled under it)
        leaving = [n for n in coming if n != master and now - self.coming_since[n] >= b.kill_after][:spare]
        leaving += [name for _, name in idle][: spare - len(leaving)]
        if not leaving:
            return None
        if len(leaving) == 1 and leaving[0] in coming:
            reason = "no task waits: the node asked for is not needed"
        else:
            longest = max((now - s for s, n in idle if n in leaving), default=0.0)
            reason = f"{counted(len(leaving), 'node')} idle for {_seconds(longest)} (kill_after {_seconds(b.kill_after)}), no task waits"
        return Decision("remove", reason, nodes=tuple(leaving))
