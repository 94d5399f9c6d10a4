"""``globular top``: what a running cluster is doing, refreshed, from what already runs.

Each frame is one round trip per node through the helper globular holds (the ``facts`` verb,
with CPU and memory samples, GPUs where the cluster has GPU engines) and one ``queue_status``
of the controller over a client kept open between frames: no agent on the nodes, no new port.

- a node: CPU % of its cores since the last frame, memory used/total, load, GPUs (use, memory),
  engines busy (something queued on them) / idle / dead (expected but not registered);
- the cluster: tasks waiting, running, done in the last 10 s (and per second), failed in the
  last 10 s, engines registered against expected, and the slowest node (fewest tasks done per
  engine in the window, among the nodes that had work);
- what changed: an engine that left or joined, a node that stopped answering or came back.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC
from pathlib import Path
from typing import Any

from globular.aio import in_thread
from globular.errors import GlobularError
from globular.ipcluster.controller import ControllerSilent, answer_within, record_data
from globular.ipcluster.gpus import engine_count
from globular.ipcluster.roles import ENGINE
from globular.ipcluster.settings import IPClusterSettings
from globular.providers.base import NodeProvider
from globular.registry import make_provider, resolve_plugin
from globular.state import ClusterRecord, StateStore
from globular.status import balancer_words

WINDOW = 10.0  # seconds of history the rates are over
ASK_TIMEOUT = 10.0  # s a node may take to answer
CONTROLLER_TIMEOUT = 3.0  # s the controller may take: longer, and the frame says it is not answering
CONNECT_TIMEOUT = 5.0  # s to connect to it
CONNECT_AGAIN = 10.0  # s after a connection that failed, before the next try (the frames meanwhile say so)
NOT_ANSWERING = (ControllerSilent, TimeoutError, OSError)  # OSError: the tunnel too (TunnelError)


@dataclass
class NodeRow:
    node: str
    answering: bool
    cpu: float | None = None  # percent of its cores, since the last frame
    memory_used: int | None = None
    memory_total: int | None = None
    load: float | None = None
    gpus: list[dict[str, Any]] = field(default_factory=list)
    busy: int = 0
    idle: int = 0
    dead: int = 0
    done: int = 0  # tasks its engines finished in the window


@dataclass
class Frame:
    cluster: str
    time: float
    nodes: list[NodeRow]
    waiting: int  # tasks not running yet (the scheduler's unassigned and the engines' queues)
    running: int
    done: int  # in the last WINDOW seconds
    per_second: float
    failed: int  # in the last WINDOW seconds
    registered: int
    expected: int
    slowest: str | None
    events: list[str]
    queue_status: dict[str, Any]  # ipyparallel's own, summed: unassigned, queue, tasks, completed
    # None while the controller answers; else what is wrong ("not answering since 12:03:04"),
    # and the task numbers are those of its last answer (controller_answered)
    controller_problem: str | None = None
    controller_answered: float | None = None  # when it last answered (time.time())
    desired: int | None = None  # the nodes the record wants (the balancer's target while it adds or removes)
    balancer: str | None = None  # "running (pid 12), 1..3 nodes"; None: the cluster never had one


def settings_of_record(record: ClusterRecord) -> IPClusterSettings:
    for spec in record.spec.plugins:
        if resolve_plugin(spec.setup_class)[1].Settings is IPClusterSettings:
            return spec.typed_settings(IPClusterSettings)
    raise GlobularError(f"cluster {record.name!r} does not run the ipcluster plugin")


class Watch:
    """One cluster, watched: the client, the provider and the history a frame needs."""

    def __init__(self, name: str, home: Path):
        self.home = home
        self.record = StateStore(home).get(name)
        self.settings = settings_of_record(self.record)
        self.provider: NodeProvider = make_provider(self.record.spec, cluster=self.record.name, home=home)
        self.client: Any = None
        self.cpu: dict[str, list[int]] = {}
        self.history: deque[tuple[float, dict[int, int]]] = deque()  # (time, completed per engine)
        self.failures: deque[tuple[float, int]] = deque()
        self.last_check = time.time()
        self.seen_ids: set[int] | None = None
        self.seen_nodes: set[str] | None = None
        self.answering: dict[str, bool] = {}
        self.events: deque[str] = deque(maxlen=6)
        self.dead_seen: set[tuple[str, int]] = set()
        self.last_answer: tuple[float, dict[Any, Any]] | None = None  # when, and queue_status then
        self.silent_since: float | None = None
        self.connect_again = 0.0  # monotonic time of the next try to connect, after one failed
        self.connect_error = ""

    async def _connected(self) -> Any:
        """The client, connected now if it was not (a controller that never answered: tried
        again CONNECT_AGAIN s after the last try)."""
        if self.client is None:
            from globular.client.connect import connect

            if time.monotonic() < self.connect_again:
                raise ControllerSilent(self.connect_error)
            try:
                client = await in_thread(connect, self.record.name, home=self.home, timeout=CONNECT_TIMEOUT)
            except NOT_ANSWERING as exc:
                self.connect_again, self.connect_error = time.monotonic() + CONNECT_AGAIN, str(exc)
                raise
            self.client = answer_within(client, CONTROLLER_TIMEOUT)
        return self.client

    async def _ask_controller(self) -> tuple[dict[Any, Any], int, str | None]:
        """queue_status and the failures since the last frame; when the controller does not
        answer in time, its last answer (no failures) and what is wrong."""
        try:
            await self._connected()
            status, failed = await in_thread(self._controller)
        except NOT_ANSWERING as exc:
            now = time.time()
            if self.silent_since is None:
                self.silent_since = now
                self.events.append(f"the controller stopped answering ({exc})")
            since = time.strftime("%H:%M:%S", time.localtime(self.silent_since))
            return (self.last_answer[1] if self.last_answer else {}), 0, f"controller not answering since {since}"
        if self.silent_since is not None:
            self.events.append("the controller answers again")
            self.silent_since = None
        self.last_answer = (time.time(), status)
        return status, failed, None

    async def close(self) -> None:
        if self.client is not None:
            self.client.close(linger=0)  # nothing it still meant to send holds up the exit
        await self.provider.close()

    async def _facts(self) -> dict[str, dict[str, Any] | BaseException]:
        gpus = self.settings.wants_gpus

        async def one(node: Any) -> dict[str, Any]:
            request = {"usage": True, "gpus": gpus, "procs": [p.model_dump() for p in node.processes]}
            answer: dict[str, Any] = await self.provider.runner(node).nodeproc("facts", request, timeout=ASK_TIMEOUT)
            return answer

        answers = await asyncio.gather(*(one(n) for n in self.record.nodes), return_exceptions=True)
        return {n.name: a for n, a in zip(self.record.nodes, answers)}

    def _controller(self) -> tuple[dict[Any, Any], int]:
        """queue_status of the registered engines and the unassigned tasks (the controller's own
        answer keeps every engine it ever had, a dead one's unfinished tasks included), and the
        tasks that failed since the last frame (the hub's records)."""
        answer = self.client.queue_status()
        registered = set(self.client.ids)
        status = {k: v for k, v in answer.items() if k == "unassigned" or k in registered}
        since = self.last_check
        self.last_check = time.time()
        failed = 0
        try:
            from datetime import datetime

            records = self.client.db_query(
                {"completed": {"$gte": datetime.fromtimestamp(since, UTC)}}, keys=["result_header"]
            )
            failed = sum(1 for r in records if (r.get("result_header") or {}).get("status") == "error")
        except Exception:  # noqa: BLE001 - a hub without a task database (NoDB): no failure count
            pass
        return status, failed

    async def frame(self) -> Frame:
        self.record = StateStore(self.home).get(self.record.name)  # nodes added or removed meanwhile
        facts, (status, failed, problem) = await asyncio.gather(self._facts(), self._ask_controller())
        now = time.time()
        data = record_data(self.record)
        engines = {int(k): v for k, v in status.items() if k != "unassigned"}
        completed = {i: s["completed"] for i, s in engines.items()}
        self.history.append((now, completed))
        while len(self.history) > 1 and now - self.history[1][0] >= WINDOW:
            self.history.popleft()
        self.failures.append((now, failed))
        while self.failures and now - self.failures[0][0] > WINDOW:
            self.failures.popleft()
        start_time, start = self.history[0]
        done_by = {i: n - start.get(i, 0) for i, n in completed.items()} if len(self.history) > 1 else {}
        node_of = {int(k): v for k, v in (data.get("engine_ids") or {}).items()}
        rows = []
        for node in self.record.nodes:
            answer = facts.get(node.name)
            row = NodeRow(node.name, isinstance(answer, dict))
            mine = [i for i in engines if node_of.get(i) == node.name]
            row.busy = sum(1 for i in mine if engines[i]["queue"] + engines[i]["tasks"] > 0)
            row.idle = len(mine) - row.busy
            gone = []  # engines whose process died: seen before the controller drops them
            if isinstance(answer, dict):
                gone = [p for p, up in zip(node.processes, answer.get("alive") or []) if p.role == ENGINE and not up]
            for proc in gone:
                if (node.name, proc.pid) not in self.dead_seen:
                    self.dead_seen.add((node.name, proc.pid))
                    self.events.append(f"engine {proc.ident or '?'} ({node.name}) died (pid {proc.pid})")
            row.dead = max(engine_count(data, node, self.settings) - len(mine), len(gone), 0)
            row.done = sum(done_by.get(i, 0) for i in mine)
            if isinstance(answer, dict):
                self._usage(row, answer)
            was = self.answering.get(node.name)
            if was is not None and was != row.answering:
                self.events.append(f"{node.name} {'answers again' if row.answering else 'stopped answering'}")
            self.answering[node.name] = row.answering
            rows.append(row)
        ids = set(engines)
        if self.seen_ids is not None:
            for i in sorted(self.seen_ids - ids):
                self.events.append(f"engine {i} ({node_of.get(i, '?')}) left the controller")
            for i in sorted(ids - self.seen_ids):
                self.events.append(f"engine {i} ({node_of.get(i, '?')}) joined")
        self.seen_ids = ids
        names = {n.name for n in self.record.nodes}
        if self.seen_nodes is not None:
            for name in sorted(names - self.seen_nodes):
                self.events.append(f"node {name} joined the cluster")
            for name in sorted(self.seen_nodes - names):
                self.events.append(f"node {name} left the cluster")
        self.seen_nodes = names
        span = now - start_time
        done = sum(done_by.values())
        busy_nodes = [r for r in rows if r.busy + r.idle and r.done + r.busy]
        slowest = min(busy_nodes, key=lambda r: r.done / max(1, r.busy + r.idle)).node if len(busy_nodes) > 1 else None
        sums = {
            "unassigned": int(status.get("unassigned", 0)),
            "queue": sum(s["queue"] for s in engines.values()),
            "tasks": sum(s["tasks"] for s in engines.values()),
            "completed": sum(completed.values()),
        }
        running = sum(r.busy for r in rows)
        return Frame(
            cluster=self.record.name,
            time=now,
            nodes=rows,
            waiting=sums["unassigned"] + max(0, sums["queue"] + sums["tasks"] - running),
            running=running,
            done=done,
            per_second=round(done / span, 2) if span > 0 else 0.0,
            failed=sum(n for _, n in self.failures),
            registered=len(ids),
            expected=int(data.get("engines") or sum(engine_count(data, n, self.settings) for n in self.record.nodes)),
            slowest=slowest,
            events=list(self.events),
            queue_status=sums,
            controller_problem=problem,
            controller_answered=self.last_answer[0] if self.last_answer else None,
            desired=len(self.record.desired),
            balancer=balancer_words(self.record),
        )

    def _usage(self, row: NodeRow, answer: dict[str, Any]) -> None:
        usage = answer.get("usage") or {}
        cpu = usage.get("cpu")
        if cpu:
            before = self.cpu.get(row.node)
            if before and cpu[1] > before[1]:
                row.cpu = round(100.0 * (cpu[0] - before[0]) / (cpu[1] - before[1]), 1)
            self.cpu[row.node] = cpu
        memory = usage.get("memory")
        if memory:
            row.memory_total, row.memory_used = memory[0], memory[0] - memory[1]
        row.load = round(answer["load"][0], 2) if answer.get("load") else None
        row.gpus = list((answer.get("gpus") or {}).get("devices") or [])
