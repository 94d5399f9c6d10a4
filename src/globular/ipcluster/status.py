"""IPCluster's part of ``globular status`` and ``listclusters``: engines per node (running,
registered with the controller, expected), the controller, encryption, idle shutdown."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from globular.errors import GlobularError
from globular.ipcluster.controller import open_client, record_data
from globular.ipcluster.engines import engine_node
from globular.ipcluster.gpus import engine_count, gpu_status
from globular.ipcluster.idle import idle_state_file
from globular.ipcluster.roles import CONTROLLER, ENGINE, SUPERVISOR
from globular.ipcluster.settings import IPClusterSettings
from globular.plugins.base import PluginStatus, StatusView
from globular.results import age
from globular.state import ClusterRecord

if TYPE_CHECKING:
    from ipyparallel import Client

log = logging.getLogger(__name__)
ASK_TIMEOUT = 10.0


def registered_per_node(client: Client, mapping: dict[str, str], ask: bool = True) -> dict[str, int] | None:
    """Engines registered with the controller, per node (``mapping``: engine id -> node);
    engines a supervisor restarted (ids not in it) are asked where they run, unless not ``ask``
    (then None where there are such engines: a busy engine answers only after its task)."""
    counts: dict[str, int] = {}
    strays = [i for i in client.ids if str(i) not in mapping]
    if strays and not ask:
        return None
    for engine_id in client.ids:
        node = mapping.get(str(engine_id))
        if node:
            counts[node] = counts.get(node, 0) + 1
    if strays:
        for node in client[strays].apply_async(engine_node).get(ASK_TIMEOUT):
            counts[node] = counts.get(node, 0) + 1
    return counts


@dataclass
class Registered:
    """What the controller says of the engines: how many it has registered, per node where
    known (None: engines restarted by a supervisor were not asked where they run)."""

    total: int
    per_node: dict[str, int] | None


async def _registered(view: StatusView) -> tuple[Registered | None, str | None]:
    """The engines the controller has registered, or why it cannot tell.  The quick status
    (``listclusters``) asks only for the ids; the deep one (``status``) also asks engines
    restarted by a supervisor where they run."""
    data = record_data(view.record)
    try:
        client = await asyncio.wait_for(
            open_client(data, view.record.name, view.runner(view.record.master), timeout=5), ASK_TIMEOUT + 30
        )
    except (GlobularError, OSError, TimeoutError) as exc:
        return None, str(exc) or type(exc).__name__
    except Exception as exc:  # noqa: BLE001 - ipyparallel's own errors (TimeoutError subclasses, zmq errors)
        return None, f"{type(exc).__name__}: {exc}"
    try:
        mapping = data.get("engine_ids", {})
        per_node = await asyncio.to_thread(registered_per_node, client, mapping, view.deep)
        return Registered(len(client.ids), per_node), None
    except Exception as exc:  # noqa: BLE001 - an engine that does not answer where it runs
        log.info("engines of %s did not say where they run: %s", view.record.name, exc)
        return None, f"engines did not answer: {type(exc).__name__}: {exc}"
    finally:
        client.close()


def _unregistered(status: PluginStatus, record: ClusterRecord, registered: Registered) -> None:
    """Engines alive but not registered (cut off from the controller for longer than its
    heartbeat window, or frozen that long): the cluster is degraded, whatever the processes say."""
    running = status.data.get("engines_running")
    if running is None or registered.total >= running:
        return
    missing = running - registered.total
    where = ""
    if registered.per_node is not None:
        short = [
            name for name, node in status.node_data.items()
            if (node["engines_running"] or 0) > registered.per_node.get(name, 0)
        ]  # fmt: skip
        where = f" (on {', '.join(short)})" if short else ""
    status.data["engines_unregistered"] = missing
    status.condition = status.condition or (
        f"degraded: {missing} of {running} running engines not registered with the controller{where}; "
        f"`globular runplugin ipclusterrestart {record.name}` starts them again"
    )


def _idle_column(state: dict[str, Any] | None) -> str:
    if not state:
        return "on"
    if state.get("shutdown"):
        return "done " + time.strftime("%H:%M", time.localtime(state["shutdown"]))
    deadline = state.get("deadline")
    if deadline:
        return f"in {age(max(0.0, deadline - time.time()))} ({time.strftime('%H:%M', time.localtime(deadline))})"
    return "on"


async def ipcluster_status(view: StatusView, settings: IPClusterSettings) -> PluginStatus:
    """The cluster's controller, its engines (running, registered, expected; per node) and its
    idle shutdown, with what is wrong in words."""
    record = view.record
    data = record_data(record)
    status = PluginStatus()
    if not record.nodes:
        return status
    controller = _controller(view, data, status)
    _running_engines(view, data, settings, status)
    if data.get("idle_shutdown"):
        await _idle(view, status)
    if settings.wants_gpus and data:
        gpu_status(view, data, status)
    if not data or controller != "up" or record.status != "running":
        return status
    registered, why = await _registered(view)
    if registered is None:
        status.problems.append(f"the controller does not answer a client ({why})")
        return status
    status.data["engines_registered"] = registered.total
    _unregistered(status, record, registered)
    if registered.per_node is not None and view.deep:
        _registered_per_node(record, registered.per_node, status)
    return status


def _controller(view: StatusView, data: dict[str, Any], status: PluginStatus) -> str:
    """The controller: up, down, unknown or not running."""
    record = view.record
    master = record.master
    controllers = master.processes_with_role(CONTROLLER)
    up = view.alive(master, CONTROLLER)
    controller = "unknown" if up is None or not controllers else ("up" if up == len(controllers) else "down")
    if not controllers:
        controller = "not running"
        if record.status == "running":  # stopped (ipclusterstop), or never started: nothing to connect to
            status.condition = f"no controller and no engines: `globular runplugin ipcluster {record.name}` starts them"
    status.data.update(controller=controller, encryption=data.get("encryption"))
    status.columns["controller"] = controller
    if data.get("encryption"):
        status.columns["traffic"] = {"curve": "encrypted (CurveZMQ)", "none": "not encrypted"}[data["encryption"]]
    if controller == "down":
        status.problems.append(f"the controller on {master.name} is not running (its log: {controllers[0].log})")
    return controller


def _running_engines(view: StatusView, data: dict[str, Any], settings: IPClusterSettings, status: PluginStatus) -> None:
    """The engines running on each node against those expected there."""
    record = view.record
    expected_total = data.get("engines")
    running_total = 0
    for node in record.nodes:
        expected = engine_count(data, node, settings) if data else 0
        alive = view.alive(node, ENGINE)
        running = None if alive is None else alive + (view.children(node, SUPERVISOR) or 0)
        running_total += running or 0
        status.node_data[node.name] = {
            "engines_running": running,
            "engines_registered": None,
            "engines_expected": expected,
        }
        status.node_columns[node.name] = {"engines run/reg/exp": f"{'?' if running is None else running}/?/{expected}"}
        if running is not None and running > expected:
            status.node_states[node.name] = "engines"
            status.node_problems[node.name] = (
                f"{running} engines run, {expected} expected: {running - expected} that globular did not start "
                "(a second ipcluster? `globular runplugin ipclusterrestart` starts the right number)"
            )
        elif running is not None and expected and running < expected:
            status.node_states[node.name] = "engines dead"
            status.node_problems[node.name] = (
                f"{expected - running} of {expected} engines not running "
                f"(killed or crashed: their logs are in {node.workdir}/logs)"
            )
    if expected_total is not None:
        answered = all(isinstance(view.facts.get(n.name), dict) for n in record.nodes)
        if answered and running_total > expected_total:
            status.problems.append(f"{running_total} engines run, {expected_total} expected")
        status.columns["engines"] = f"{running_total if answered else '?'}/{expected_total}"
        status.data["engines_running"] = running_total if answered else None


async def _idle(view: StatusView, status: PluginStatus) -> None:
    """Idle shutdown: how long the cluster has been idle, and when it shut down."""
    record, master = view.record, view.record.master
    idle = None
    try:
        idle = await view.runner(master).nodeproc("read_json", {"path": idle_state_file(master)}, timeout=ASK_TIMEOUT)
    except GlobularError as exc:
        log.info("idle state of %s unreadable: %s", record.name, exc)
    status.columns["idle shutdown"] = _idle_column(idle)
    status.data["idle"] = idle
    if isinstance(idle, dict) and idle.get("shutdown"):
        stamp = time.strftime("%H:%M:%S", time.localtime(idle["shutdown"]))
        status.condition = f"idle shutdown at {stamp}: `globular terminate {record.name}` releases the nodes"


def _registered_per_node(record: ClusterRecord, per_node: dict[str, int], status: PluginStatus) -> None:
    for node in record.nodes:
        count = per_node.get(node.name, 0)
        node_data = status.node_data[node.name]
        node_data["engines_registered"] = count
        expected, running = node_data["engines_expected"], node_data["engines_running"]
        status.node_columns[node.name]["engines run/reg/exp"] = (
            f"{'?' if running is None else running}/{count}/{expected}"
        )
        if node.name not in status.node_problems and count > expected:
            status.node_states[node.name] = "engines"
            status.node_problems[node.name] = (
                f"{count} engines registered, {expected} expected: {count - expected} that globular did not start"
            )
        elif node.name not in status.node_problems and expected and count < expected:
            status.node_states[node.name] = "engines"
            status.node_problems[node.name] = f"{expected - count} of {expected} engines running but not registered"
