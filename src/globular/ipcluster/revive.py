"""Engines that left the controller while their node stays: started again in place.

An engine cut off from the controller (a partition, a frozen process) gives up before the
controller drops it (:func:`~globular.ipcluster.settings.engine_heartbeat_misses`, the
watchdog's rule) and exits; one frozen past that window, or killed, is gone from the
controller all the same.  With ``restart_dead_engines`` its supervisor starts it again; else
the balancer calls :meth:`IPCluster.on_restart_node`, which lands here: the node's engines
that the controller no longer lists are stopped by pid (alive or not), and as many new ones
start on the node under fresh ids (an id the controller dropped is never reused), each with
the GPU its predecessor held.  The node's registered engines, and the tasks they run, are
not touched.
"""

from __future__ import annotations

import asyncio
import logging

from globular.ipcluster.engines import claim_engine_ids, engine_env, engine_spec, fork_engines, wait_for_engines
from globular.ipcluster.gpus import ENGINE_GPUS, gpu_table
from globular.ipcluster.lifecycle import client_of, running_data
from globular.ipcluster.roles import ENGINE
from globular.ipcluster.settings import IPClusterSettings
from globular.plugins.base import PluginContext
from globular.state import NodeRecord, ProcessRecord

log = logging.getLogger(__name__)
STOP_GRACE = 2.0  # s an engine the controller dropped gets to end on SIGTERM (a frozen one never does)


def left_engines(node: NodeRecord, registered: set[int], node_of: dict[int, str]) -> list[ProcessRecord]:
    """``node``'s engine processes (started one by one, not under a supervisor) whose engine
    the controller does not list among ``registered``, as many as the node has fewer engines
    registered (``node_of``: engine id -> node) than processes: an engine the controller gave
    another id than it asked for still counts as there."""
    procs = node.processes_with_role(ENGINE)
    missing = len(procs) - sum(1 for engine in registered if node_of.get(engine) == node.name)
    if missing <= 0:
        return []
    return [p for p in procs if p.ident and int(p.ident) not in registered][:missing]


async def revive_engines(ctx: PluginContext, node: NodeRecord, settings: IPClusterSettings) -> dict[int, int]:
    """Start again, in place, ``node``'s engines that left the controller: old id -> new id
    (empty: every engine of the node is registered)."""
    data = running_data(ctx)
    client = await client_of(ctx)
    try:
        registered = set(await asyncio.to_thread(lambda: client.ids))
        node_of = {int(k): v for k, v in (data.get("engine_ids") or {}).items()}
        left = left_engines(node, registered, node_of)
        if not left:
            return {}
        old = [int(p.ident) for p in left if p.ident]
        log.info("%s: engines %s of %s left the controller: starting them again", ctx.name, old, node.name)
        await ctx.stop_processes(node, left, timeout=STOP_GRACE)
        mapping = data.setdefault("engine_ids", {})
        for engine_id in old:
            mapping.pop(str(engine_id), None)
        new = claim_engine_ids(ctx, node, len(old), floor=max(registered | set(old), default=-1) + 1)
        table = gpu_table(data)
        gpus = {n: table.pop(str(o)) for o, n in zip(old, new) if table.get(str(o))}
        if gpus:
            data[ENGINE_GPUS] = {**table, **{str(i): uuid for i, uuid in gpus.items()}}
            data.pop("gpu_engines", None)
        engines = [engine_spec(ctx, node, i, settings, gpus.get(i)) for i in new]
        runner = ctx.runner(node)
        if settings.engine_fork:
            started = await fork_engines(runner, node, engines, new[0], engine_env(ctx, node, settings), settings)
        else:
            started = await runner.spawn(engines)
        ctx.track(node, started)
        ctx.save()
        await wait_for_engines(
            ctx, client, wanted=dict.fromkeys(new, node.name), nodes=[node], timeout=settings.engine_timeout,
            key="revive", description=f"engines of {node.name} registered again", settings=settings,
        )  # fmt: skip
        return dict(zip(old, new))
    finally:
        client.close()
