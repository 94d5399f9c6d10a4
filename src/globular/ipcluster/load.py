"""The balancer's view of an ipcluster: the controller's ``queue_status`` by node, and the
draining of nodes that are to leave.

**Observe.** ``queue_status()`` gives the tasks no engine has taken yet (``unassigned``) and,
per engine, its queue (direct tasks) and its load-balanced tasks; the record's ``engine_ids``
says which node each engine runs on; an engine it does not list (a supervisor restarted it,
``restart_dead_engines``, under a fresh id) is asked, once, where it runs, and until it has
answered no node is drained.  An engine with nothing queued and nothing running is idle.
Engines the controller no longer lists are left out.

Engines started on a node that the controller does not list (see
:mod:`~globular.ipcluster.revive`) are counted apart, for the balancer to start them again.

**Drain.** Removing an idle node races the scheduler: a task given to one of its engines
between "it is idle" and "it stopped" would fail with ``EngineError`` (ipyparallel re-runs it
only if the user set ``retries``).  So before a node leaves, each of its engines gets one task
of the balancer's own, through ipyparallel's scheduler like any other, restricted to that
engine (a ``LoadBalancedView`` with ``targets``): it publishes that it runs (ipyparallel's
``publish_data``), then holds the engine.  With ipyparallel's default ``TaskScheduler.hwm =
1`` an engine gets a task only when it has none outstanding, so once every engine of the node
runs the balancer's task, no task of the user's is on the node and none can be sent there: the
node leaves, and only the balancer's tasks end with it.  A task of the user's that landed first
simply runs to its end before the balancer's starts.  A drain that does not start within its
time (the engine is busy after all) gives up: its task, when it starts later, ends at once, and
the node stays (with a ``window`` longer than the wait, as ``replace_before`` asks, the task
keeps its place in the scheduler's queue from one poll to the next).  As a last check the controller must list nothing but that one task on each of
the node's engines (a controller configured with another ``hwm`` fails it: the node stays).
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

from globular.aio import in_thread
from globular.ipcluster.controller import answer_within
from globular.ipcluster.engines import engine_node
from globular.ipcluster.revive import left_engines
from globular.ipcluster.roles import DATA_KEY
from globular.plugins.base import ClusterLoad, NodeLoad
from globular.state import ClusterRecord, StateStore

log = logging.getLogger(__name__)

# run on an engine as exec(DRAIN_SOURCE, {"start_by": ..., "hold_until": ...}): standard library
# and ipyparallel only, nothing left in the user's namespace
DRAIN_SOURCE = """
import signal, time
if time.time() < start_by:
    from ipyparallel.engine.datapub import publish_data
    asked = []
    try:  # the engine's own SIGTERM handler cannot run while this holds the main thread: end first
        before = signal.signal(signal.SIGTERM, lambda *sig: asked.append(sig))
    except ValueError:  # not the main thread: nothing holds the handler up
        before = None
    try:
        publish_data({"globular_drain": "holding"})
        while not asked and time.time() < hold_until:
            time.sleep(0.05)
    finally:
        if before is not None:
            signal.signal(signal.SIGTERM, before)
    if asked and callable(before):
        before(*asked[0])
"""
HOLD = 120.0  # s a drained engine is held after its drain's time: the node is removed well before
CONNECT_TIMEOUT = 10.0


def send_hold(client: Any, engine: int, start_by: float) -> Any:
    """Send ``engine`` the task that holds it (:data:`DRAIN_SOURCE`), through the scheduler,
    bound to it; its AsyncResult."""
    view = client.load_balanced_view(targets=[engine])
    view.retries = 0
    return view.apply_async(exec, DRAIN_SOURCE, {"start_by": start_by, "hold_until": start_by + HOLD})


async def holding(held: dict[int, Any], until: float) -> set[int]:
    """Wait, until ``until`` (``time.time()``) at most, for the hold tasks ``held`` (engine ->
    AsyncResult) to run; the engines they hold."""
    while True:
        started = {e for e, ar in held.items() if (ar.data or {}).get("globular_drain") == "holding"}
        if len(started) == len(held) or time.time() >= until:
            return started
        await asyncio.sleep(0.05)


class ControllerLoad:
    """:class:`~globular.plugins.base.LoadWatcher` of an ipcluster (see the module's doc)."""

    def __init__(self, name: str, home: Path):
        self.name = name
        self.home = home
        self.client: Any = None
        self.pending: dict[int, tuple[Any, float]] = {}  # engine -> its drain task and when it may start by
        # engines not in the record (a supervisor restarted them under a fresh id): where they
        # run, asked of each (it answers once its task ends), and the answers still to come
        self.placed: dict[int, str] = {}
        self.asking: dict[int, Any] = {}

    async def _client(self) -> Any:
        if self.client is None:
            from globular.client.connect import connect

            client = await in_thread(connect, self.name, home=self.home, timeout=CONNECT_TIMEOUT)
            self.client = answer_within(client)
        return self.client

    def _engines(self, record: ClusterRecord | None = None) -> dict[int, str]:
        """Engine -> node: the record's, and those the engines said (:meth:`_place`)."""
        record = record or StateStore(self.home).get(self.name)
        mapping = record.plugin_data.get(DATA_KEY, {}).get("engine_ids") or {}
        return {**self.placed, **{int(k): v for k, v in mapping.items()}}

    def _place(self, client: Any, registered: set[int], node_of: dict[int, str]) -> set[int]:
        """Ask the registered engines the record does not place where they run (one question
        each, answered after the task it runs); the engines not placed yet.  (Run in a thread.)"""
        for engine, answer in list(self.asking.items()):
            if answer.ready():
                del self.asking[engine]
                try:
                    self.placed[engine] = answer.get(0)
                except Exception as exc:  # noqa: BLE001 - it left, or failed: asked again if it is still there
                    log.info("%s: engine %d did not say where it runs: %s", self.name, engine, exc)
        strays = {e for e in registered if e not in node_of and e not in self.placed}
        for engine in sorted(strays - set(self.asking)):
            self.asking[engine] = client[engine].apply_async(engine_node)
        for engine in set(self.placed) - registered:
            del self.placed[engine]
        return strays

    async def observe(self) -> ClusterLoad:
        record = StateStore(self.home).get(self.name)
        client = await self._client()

        def ask() -> tuple[dict[Any, Any], set[int], dict[int, str]]:
            answer, registered = client.queue_status(), set(client.ids)
            self._place(client, registered, self._engines(record))
            return answer, registered, self._engines(record)

        answer, registered, node_of = await in_thread(ask)
        engines: dict[str, int] = {}
        busy: dict[str, int] = {}
        for engine in sorted(registered):
            node = node_of.get(engine)
            if node is None:
                continue
            queue = answer.get(engine) or {}
            engines[node] = engines.get(node, 0) + 1
            busy[node] = busy.get(node, 0) + (1 if queue.get("queue") or queue.get("tasks") else 0)
        nodes = {n: NodeLoad(engines=engines[n], busy=busy[n]) for n in engines}
        # nodes whose engines all registered once (a node joining or restarting is not done yet)
        left = {n.name: len(left_engines(n, registered, node_of)) for n in record.nodes if "registered" in n.steps}
        unregistered = {name: count for name, count in left.items() if count}
        return ClusterLoad(waiting=int(answer.get("unassigned") or 0), nodes=nodes, unregistered=unregistered)

    async def drain(self, nodes: list[str], timeout: float, window: float | None = None) -> list[str]:
        client = await self._client()
        registered = set(await in_thread(lambda: client.ids))
        node_of = self._engines()
        unplaced = {e for e in registered if e not in node_of}
        if unplaced:  # one of them may run on a node that is to leave: none leaves before they answer
            await in_thread(self._place, client, registered, node_of)
            log.info("%s: engines %s have not said where they run yet: no node leaves", self.name, sorted(unplaced))
            return []
        on = {node: sorted(e for e, n in node_of.items() if n == node and e in registered) for node in nodes}
        now = time.time()
        window = timeout if window is None else max(window, timeout)
        held: dict[int, Any] = {}
        for engine in (e for ids in on.values() for e in ids):
            kept = self.pending.get(engine)
            if kept is not None and kept[1] > now and not kept[0].ready():
                held[engine] = kept[0]  # asked before, still waiting for its turn: it keeps its place
                continue
            start_by = now + window
            held[engine] = await in_thread(send_hold, client, engine, start_by)
            self.pending[engine] = (held[engine], start_by)
        until = min(now + timeout, max((self.pending[e][1] for e in held), default=now))
        started = await holding(held, until)
        status = await in_thread(client.queue_status, sorted(started)) if started else {}
        drained = []
        for node, ids in on.items():
            alone = all(e in started and (status.get(e) or {}).get("tasks") == 1 and not (status.get(e) or {}).get("queue")
                        for e in ids)  # fmt: skip
            if alone:
                drained.append(node)
                for engine in ids:
                    self.pending.pop(engine, None)
            else:
                log.info("%s: %s not drained yet (its engines are working)", self.name, node)
        return drained

    async def close(self) -> None:
        if self.client is not None:
            self.client.close(linger=0)
            self.client = None
