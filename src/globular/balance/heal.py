"""Which nodes of a cluster are lost, for the balancer to replace them.

A node is lost when its provider says it is gone (:meth:`NodeProvider.status`: a Slurm job
that ended — cancelled, preempted, timed out), when every process globular recorded on it is
gone (asked of the node, by pid and start time: a local node killed with -9), or when it has
not answered for :data:`SILENT_POLLS` polls in a row (a host that dropped off the network).
One silent poll is not enough: a loaded node may miss one answer.  The same round trip to
the provider says how long each node has before the provider ends it (a Slurm job's time
left), for ``replace_before``.
"""

from __future__ import annotations

import asyncio
import logging

from globular.errors import GlobularError
from globular.providers.base import NodeProvider
from globular.state import ClusterRecord
from globular.status import ask_node

log = logging.getLogger(__name__)

SILENT_POLLS = 3


class LossWatch:
    """Remembers, between polls, how long each node has been silent."""

    def __init__(self) -> None:
        self.silent: dict[str, int] = {}
        self.time_left: dict[str, float] = {}  # node -> seconds before its provider ends it (Slurm's walltime)

    async def lost(self, record: ClusterRecord, provider: NodeProvider, timeout: float) -> dict[str, str]:
        """Node -> why it is lost, among ``record``'s nodes that have started processes; a node
        that does not answer within ``timeout`` s is silent this poll."""
        try:
            said = await asyncio.wait_for(provider.status(record.nodes), timeout)
        except (GlobularError, TimeoutError) as exc:  # the processes still tell
            log.info("%s: the %s provider's status: %s", record.name, record.spec.provider, exc or "no answer")
            said = None
        found = dict(said.node_problems) if said is not None else {}
        self.time_left = dict(said.node_time_left) if said is not None else {}
        nodes = [n for n in record.nodes if n.processes and n.name not in found]
        answers = await asyncio.gather(*(ask_node(provider, n, timeout) for n in nodes), return_exceptions=True)
        for node, answer in zip(nodes, answers):
            if isinstance(answer, BaseException):
                if not isinstance(answer, Exception):
                    raise answer
                self.silent[node.name] = self.silent.get(node.name, 0) + 1
                if self.silent[node.name] >= SILENT_POLLS:
                    found[node.name] = (
                        f"it has not answered {SILENT_POLLS} polls in a row ({answer or type(answer).__name__})"
                    )
                continue
            self.silent.pop(node.name, None)
            if not any(answer["alive"]):
                count = len(node.processes)
                found[node.name] = "its process is gone" if count == 1 else f"its {count} processes are all gone"
        for name in list(self.silent):
            if name not in {n.name for n in record.nodes}:
                del self.silent[name]
        return found
