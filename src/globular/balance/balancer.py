"""The balancer's loop: observe, decide, change the desired node set, again every
``polling_interval``.

Each change goes through :func:`globular.operations.add_nodes` or
:func:`~globular.operations.remove_node`, under the cluster's operation lock, exactly as the
commands do; between changes the lock is free, so the user's own ``addnode``, ``put`` or
``status`` run as usual (a change that finds the cluster busy waits for the next poll).
A node leaves only once the plugin has drained it (:meth:`LoadWatcher.drain`): nothing of the
user's runs there or can land there.  A poll that fails (the controller does not answer, a
provider call is refused) is logged and reported, and the next try waits longer (doubling, up
to :data:`MOST_PAUSE`); it never ends the loop.  Every decision is a line of the cluster's
log (``~/.globular/logs/<cluster>.log``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from globular import operations
from globular.balance.heal import LossWatch
from globular.balance.policy import Bounds, Decision, Policy
from globular.errors import BalancerRunning, ClusterBusy, ClusterNotFound, GlobularError
from globular.logs import cluster_log
from globular.node.proc import process_start
from globular.paths import globular_home
from globular.plugins.base import ClusterLoad, LoadWatcher
from globular.providers.base import NodeProvider
from globular.registry import make_provider, resolve_plugin
from globular.results import counted
from globular.spec import BalanceSpec
from globular.state import BalanceEvent, BalancerRecord, ClusterRecord, StateStore
from globular.status import ASK_TIMEOUT

log = logging.getLogger(__name__)
MOST_PAUSE = 300.0  # seconds between tries after failures, at most
REVIVE_AFTER = 5.0  # s a node's engines stay unregistered before they are started again in place (at least 2 polls)


@dataclass(frozen=True)
class Event:
    """One thing the balancer did or saw: ``kind`` is add, remove, restart, lost, keep, busy,
    error, watch or stop."""

    time: float  # time.time()
    kind: str
    text: str
    nodes: tuple[str, ...] = ()
    load: ClusterLoad | None = None
    size: int = 0  # nodes desired afterwards


def bounds_of(spec: BalanceSpec) -> Bounds:
    return Bounds(**spec.model_dump())


def watcher_for(record: ClusterRecord, home: Path) -> LoadWatcher:
    """The load watcher of the first plugin of ``record`` that has one."""
    for spec in record.spec.plugins:
        _, cls = resolve_plugin(spec.setup_class)
        watcher = cls.load_watcher(record, home)
        if watcher is not None:
            return watcher
    raise GlobularError(
        f"cluster {record.name!r} runs no plugin whose work the balancer can follow (its plugins: "
        f"{', '.join(p.name for p in record.spec.plugins) or 'none'})"
    )


class Balancer:
    """Balances running cluster ``name`` within ``bounds`` until :meth:`stop`."""

    def __init__(
        self,
        name: str,
        bounds: Bounds,
        *,
        home: Path | None = None,
        on_event: Callable[[Event], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.name = name
        self.bounds = bounds
        self.home = home or globular_home()
        self.store = StateStore(self.home)
        self.policy = Policy(bounds)
        self.on_event = on_event or (lambda event: None)
        self.clock = clock
        self._stopped = asyncio.Event()
        self._desired: list[str] | None = None
        self._unsaved: list[BalanceEvent] = []
        self.failures = 0
        self.losses = LossWatch()
        self._provider_now: NodeProvider | None = None
        self._provider_nodes: tuple[tuple[str, str, float], ...] | None = None
        self._master_lost: str | None = None
        self._replacing: dict[str, str] = {}  # node its provider ends soon -> the node that replaces it
        self._said: set[str] = set()  # what was said once (a master ending, a replacement at max_nodes)
        self._left_since: dict[str, float] = {}  # node -> since when some of its engines are unregistered

    def stop(self) -> None:
        self._stopped.set()

    def _event(self, kind: str, text: str, **kw: object) -> Event:
        text = "; ".join(line.strip() for line in text.splitlines() if line.strip())  # one line each
        event = Event(time.time(), kind, text, **kw)  # type: ignore[arg-type]
        with cluster_log(self.home, self.name):
            log.info("balancer: %s: %s%s", kind, text, f" ({', '.join(event.nodes)})" if event.nodes else "")
        self._unsaved.append(BalanceEvent(time=event.time, kind=kind, text=text, nodes=list(event.nodes)))
        self._save_events()
        self.on_event(event)
        return event

    def _claim(self) -> None:
        """Record this process as the cluster's balancer; a second one is refused."""
        me = os.getpid()
        with self.store.operation(self.name, timeout=5.0):
            record = self.store.get(self.name)
            other = record.balancer
            if other is not None and other.pid != me and other.running:
                since = time.strftime("%Y-%m-%d %H:%M", time.localtime(other.started))
                raise BalancerRunning(self.name, other.pid, since)
            bounds = BalanceSpec(**asdict(self.bounds))
            record.balancer = BalancerRecord(pid=me, start=process_start(me) or 0, bounds=bounds)
            self.store.save(record)

    def _save_events(self) -> None:
        """The decisions not yet in the record go there (now, or at a later decision when
        another command holds the cluster)."""
        try:
            with self.store.operation(self.name, timeout=0.2):
                record = self.store.get(self.name)
                if record.balancer is None or record.balancer.pid != os.getpid():
                    return
                record.balancer.events = (record.balancer.events + self._unsaved)[-BalancerRecord.KEPT_EVENTS :]
                self.store.save(record)
                self._unsaved.clear()
        except (ClusterBusy, ClusterNotFound):
            pass

    async def run(self, watcher: LoadWatcher | None = None) -> None:
        """Poll until :meth:`stop`; the cluster is left as it is.  ``watcher``: the plugin's
        (:func:`watcher_for`) unless given."""
        record = self.store.get(self.name)
        if record.status != "running":
            raise GlobularError(f"cluster {self.name!r} is {record.status}, not running: there is nothing to balance")
        self._claim()
        watcher = watcher or watcher_for(record, self.home)
        b = self.bounds
        self._event(
            "watch",
            f"{counted(len(record.desired), 'node')}; bounds {b.min_nodes}..{b.max_nodes}, polling every {b.polling_interval:g} s, "
            f"adding after {b.wait_time:g} s of waiting tasks, removing after {b.kill_after:g} s idle",
            size=len(record.desired),
        )
        try:
            while not self._stopped.is_set():
                pause = b.polling_interval
                try:
                    await self.poll(watcher)
                    self.failures = 0
                except ClusterNotFound:
                    self._event("stop", "the cluster is gone (terminated)")
                    break
                except (GlobularError, OSError) as exc:
                    self.failures += 1
                    pause = min(b.polling_interval * 2**self.failures, MOST_PAUSE)
                    self._event("error", f"{exc}; trying again in {pause:.0f} s")
                try:
                    await asyncio.wait_for(self._stopped.wait(), pause)
                except TimeoutError:
                    pass
        finally:
            await watcher.close()
            await self._close_provider()
            self._release()

    async def _provider(self, record: ClusterRecord) -> NodeProvider:
        """The cluster's provider, kept while its nodes stay the same (a runner keeps its
        connection to its node: a node replaced under the same name gets a new one)."""
        nodes = tuple((n.name, n.address, n.created) for n in record.nodes)
        if self._provider_nodes != nodes:
            await self._close_provider()
            self._provider_now = make_provider(record.spec, cluster=record.name, home=self.home)
            self._provider_nodes = nodes
        assert self._provider_now is not None
        return self._provider_now

    async def _close_provider(self) -> None:
        provider, self._provider_now, self._provider_nodes = self._provider_now, None, None
        if provider is not None:
            await provider.close()

    def _release(self) -> None:
        """Record that this balancer stopped (its decisions stay, for ``status``)."""
        try:  # briefly: terminate may hold it, waiting for this process to end
            with self.store.operation(self.name, timeout=0.2):
                record = self.store.get(self.name)
                if record.balancer is not None and record.balancer.pid == os.getpid():
                    record.balancer.events = (record.balancer.events + self._unsaved)[-BalancerRecord.KEPT_EVENTS :]
                    record.balancer.stopped = time.time()
                    self.store.save(record)
        except (ClusterBusy, ClusterNotFound):  # terminate holds it: the record goes anyway
            pass

    async def poll(self, watcher: LoadWatcher) -> Event | None:
        """One round: observe, decide, act; the event of what was done (None: nothing to do)."""
        record = self.store.get(self.name)
        if record.status != "running":
            raise GlobularError(f"cluster {self.name!r} is {record.status}")
        now = self.clock()
        if self._desired is not None and record.desired != self._desired:
            self.policy.changed(now)  # a user's addnode or removenode
        self._desired = list(record.desired)
        healed = await self.heal(record)
        if healed is not None:
            return healed
        swapped = await self.replace_ending(watcher, record)  # unchanged: nothing was healed
        if swapped is not None:
            return swapped
        load = await watcher.observe()
        self.policy.observe(load, now)
        revived = await self.revive(load, now)
        if revived is not None:
            return revived
        decision = self.policy.decide(load, record.desired, record.master.name, now)
        if decision is None:
            return None
        return await self.apply(watcher, decision, load)

    async def heal(self, record: ClusterRecord) -> Event | None:
        """Replace the nodes that are lost (:mod:`.heal`): each leaves the record (as
        ``removenode``: what is left of it stopped by pid, released) and as many new nodes are
        asked for, within ``max_nodes``.  A lost master is reported, never removed: the
        controller went with it."""
        answer_within = min(ASK_TIMEOUT, max(3.0, 2 * self.bounds.polling_interval))
        lost = await self.losses.lost(record, await self._provider(record), answer_within)
        master = record.master.name
        if master in lost:
            reason = lost.pop(master)
            if self._master_lost != reason:
                self._master_lost = reason
                self._event("error", f"the master is lost ({reason}): its controller went with it, and globular does "
                            f"not replace a master: `globular terminate {self.name}`, then `start`")  # fmt: skip
        if not lost:
            return None
        gone = []
        for node, reason in sorted(lost.items()):
            self._event("lost", reason, nodes=(node,))
            try:
                await operations.remove_node(self.name, node, lost=True, home=self.home)
                gone.append(node)
            except ClusterBusy:
                return self._event("busy", "another globular command holds the cluster: the next poll heals")
            except GlobularError as exc:
                self._event("error", f"{node} could not be removed: {exc}", nodes=(node,))
        if not gone:
            return None
        desired = self.store.get(self.name).desired
        count = min(len(gone), self.bounds.max_nodes - len(desired))
        event = self._event("remove", f"lost: {', '.join(gone)}", nodes=tuple(gone), size=len(desired))
        self._changed(desired)
        if count > 0:
            result = await operations.add_nodes(self.name, count, home=self.home)
            event = self._event("add", f"replacing {', '.join(gone)}", nodes=tuple(result.nodes),
                                size=len(result.record.desired))  # fmt: skip
            self._changed(result.record.desired)
        return event

    def _changed(self, desired: list[str]) -> None:
        """This balancer changed the desired node set to ``desired``: the stabilization time
        runs from now, and a later difference is a user's change."""
        self.policy.changed(self.clock())
        self._desired = list(desired)

    async def revive(self, load: ClusterLoad, now: float) -> Event | None:
        """Start again in place the engines of a node that stays but whose engines left the
        controller (:attr:`ClusterLoad.unregistered`: cut off past its heartbeat window, frozen,
        killed) once they have been gone :data:`REVIVE_AFTER` s, through the plugins'
        ``on_restart_node`` (:func:`globular.operations.restart_node`); the node's other
        engines, and their tasks, are not touched.  One node a poll."""
        for name in list(self._left_since):
            if name not in load.unregistered:
                del self._left_since[name]
        for name in load.unregistered:
            self._left_since.setdefault(name, now)
        after = max(REVIVE_AFTER, 2 * self.bounds.polling_interval)
        due = sorted(n for n, since in self._left_since.items() if now - since >= after and n in (self._desired or []))
        if not due:
            return None
        node = due[0]
        count = load.unregistered[node]
        waited = now - self._left_since[node]
        try:
            result = await operations.restart_node(self.name, node, home=self.home)
        except ClusterBusy:
            return self._event("busy", "another globular command holds the cluster: the next poll restarts")
        except ClusterNotFound:
            raise
        except GlobularError as exc:  # reported, and tried again after the growing pause
            raise GlobularError(f"{node}'s engines could not be started again: {exc}") from exc
        del self._left_since[node]
        if not result.reports:
            return None  # they came back meanwhile
        done = "; ".join(text for report in result.reports for _, text in report.summary)
        return self._event(
            "restart",
            f"{counted(count, 'engine')} not registered with the controller for {waited:.0f} s: {done}",
            nodes=(node,), size=len(result.record.desired),
        )  # fmt: skip

    async def replace_ending(self, watcher: LoadWatcher, record: ClusterRecord) -> Event | None:
        """``replace_before``: a node its provider ends within that time (a Slurm job near its
        time limit) gets its replacement first, within ``max_nodes``; then it is drained (its
        running tasks end first) and removed, before its end.  The master's end is reported:
        the cluster ends with it."""
        b = self.bounds
        ending = {
            n: left for n, left in self.losses.time_left.items() if left < b.replace_before and n in record.desired
        }
        master = record.master.name
        if master in ending and master not in self._said:
            self._said.add(master)
            self._event("error", f"the master ends in {ending[master]:.0f} s (its provider's limit): the cluster "
                        "ends with it; globular does not replace a master")  # fmt: skip
        for node, left in sorted(ending.items()):
            if node == master:
                continue
            new = self._replacing.get(node)
            if new is None or new not in record.desired:
                if len(record.desired) >= b.max_nodes:
                    if f"full:{node}" not in self._said:
                        self._said.add(f"full:{node}")
                        self._event(
                            "keep", f"{node} ends in {left:.0f} s; at max_nodes, it is replaced after", nodes=(node,)
                        )
                    continue
                result = await operations.add_nodes(self.name, 1, home=self.home)
                self._replacing[node] = result.nodes[0]
                self._changed(result.record.desired)
                return self._event("add", f"replacing {node}, which ends in {left:.0f} s (replace_before)",
                                   nodes=tuple(result.nodes), size=len(result.record.desired))  # fmt: skip
            # its running and queued tasks go first (the scheduler serves its queue in order):
            # the drain keeps its place from poll to poll until shortly before the node's end
            if node in await watcher.drain([node], timeout=min(b.polling_interval, 1.0), window=max(5.0, left - 5.0)):
                result = await operations.remove_node(self.name, node, home=self.home)
                del self._replacing[node]
                self._changed(result.record.desired)
                return self._event("remove", f"{node} replaced by {new} before its end ({left:.0f} s left)",
                                   nodes=(node,), size=len(result.record.desired))  # fmt: skip
        return None

    async def apply(self, watcher: LoadWatcher, decision: Decision, load: ClusterLoad) -> Event:
        try:
            if decision.action == "add":
                result = await operations.add_nodes(self.name, decision.count, home=self.home)
                event = self._event("add", decision.reason, nodes=tuple(result.nodes), load=load,
                                    size=len(result.record.desired))  # fmt: skip
                desired = result.record.desired
            else:
                drained = await watcher.drain(list(decision.nodes), timeout=max(self.bounds.polling_interval, 5.0))
                kept = [n for n in decision.nodes if n not in drained]
                if kept:
                    event = self._event("keep", "work landed on them while they were drained: they stay",
                                        nodes=tuple(kept))  # fmt: skip
                if not drained:
                    self.policy.changed(self.clock())
                    return event
                desired = list(self._desired or [])
                for node in drained:
                    result = await operations.remove_node(self.name, node, home=self.home)
                    desired = result.record.desired
                event = self._event("remove", decision.reason, nodes=tuple(drained), load=load, size=len(desired))
        except ClusterBusy:
            return self._event("busy", "another globular command holds the cluster: the next poll decides again")
        self._changed(desired)
        return event
