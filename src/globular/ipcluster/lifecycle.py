"""The ipcluster processes as one: the controller and every node's engines started together and
waited for until registered (the client connection file written here between), and stopped,
with the notebook and the files they left here.  The plugins' hooks (:mod:`globular.ipcluster.plugin`)
call these."""

from __future__ import annotations

import asyncio
import importlib
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from globular.fanout import each_node
from globular.ipcluster.controller import (
    connection_file_path,
    controller_ready,
    launch_controller,
    open_client,
)
from globular.ipcluster.controller import running_data as _running_data
from globular.ipcluster.engines import engine_processes, start_engines, wait_for_engines
from globular.ipcluster.gpus import engine_count
from globular.ipcluster.labpanel import remove_cluster_files, write_cluster_files
from globular.ipcluster.notebook import stop_notebook
from globular.ipcluster.roles import CONTROLLER, DATA_KEY, IDLE_WATCHER
from globular.ipcluster.settings import IPClusterSettings
from globular.paths import write_private
from globular.plugins.base import PluginContext
from globular.state import NodeRecord

if TYPE_CHECKING:
    from ipyparallel import Client


def running_data(ctx: PluginContext) -> dict[str, Any]:
    """IPCluster's part of the record; fails, saying so, when no controller runs."""
    return _running_data(ctx.plugin_data(DATA_KEY), ctx.name)


async def client_of(ctx: PluginContext) -> Client:
    """A Client for the cluster's controller (tunnelled through ssh when the master is remote)."""
    return await open_client(running_data(ctx), ctx.name, ctx.runner(ctx.master))


async def start_controller_and_engines(
    ctx: PluginContext, settings: IPClusterSettings, encryption: str
) -> tuple[Path, int]:
    """A controller on the master and its engines on every node, registered; the client
    connection file written here.  Returns that file and how many engines run."""
    # the client library loads while the processes start (if start's warm-up has not loaded it)
    client_import = asyncio.create_task(asyncio.to_thread(importlib.import_module, "ipyparallel"))
    controller, engine_info = await launch_controller(ctx, settings, curve=encryption == "curve")
    # Engines start with the controller, not after it: their registration
    # request waits on the (pre-chosen) registration port until it listens.
    counts = {node.name: engine_count(ctx.plugin_data(DATA_KEY), node, settings) for node in ctx.nodes}
    ctx.reporter.begin("engine-start", "starting engines on nodes", len(ctx.nodes))
    started_ids = await each_node(
        ctx.nodes,
        lambda node: start_engines(ctx, node, counts[node.name], engine_info, settings),
        on_done=lambda node: ctx.reporter.advance("engine-start"),
    )
    ctx.reporter.end("engine-start")
    client_info, engine_info = await controller_ready(ctx, settings, controller, engine_info)
    local_file = connection_file_path(ctx.home, ctx.name, ctx.region)
    write_private(local_file, json.dumps(client_info, indent=2).encode())
    data = ctx.plugin_data(DATA_KEY)
    data.update(connection_file=str(local_file), engine_info=engine_info, encryption=encryption)
    ctx.save()
    write_cluster_files(ctx)  # ipyparallel's JupyterLab panel lists it
    await client_import
    client = await client_of(ctx)
    try:
        wanted = {i: n for ids in started_ids.values() for i, n in ids.items()}
        await wait_for_engines(
            ctx, client, wanted=wanted, nodes=ctx.nodes, timeout=settings.engine_timeout, settings=settings
        )
    finally:
        client.close()
    return local_file, sum(counts.values())


async def stop_engines_and_controller(ctx: PluginContext) -> int:
    """Stop every engine (with the idle watchers), then the controller; how many engines there were."""

    async def stop_node(node: NodeRecord) -> int:  # one round trip a node
        engines = engine_processes(node)
        watchers = node.processes_with_role(IDLE_WATCHER)
        await ctx.stop_processes(node, watchers + engines + node.processes_with_role(CONTROLLER))
        return len(engines)

    return sum((await each_node(ctx.nodes, stop_node)).values())


async def stop_ipcluster(ctx: PluginContext) -> int:
    """Stop the notebook server, every engine, then the controller; remove the local files."""
    await stop_notebook(ctx)
    stopped = await stop_engines_and_controller(ctx)
    data = ctx.plugin_data(DATA_KEY)
    if data.get("connection_file"):
        Path(data["connection_file"]).unlink(missing_ok=True)
    remove_cluster_files(ctx)
    gpus = data.get("gpus")  # what the nodes have stays true: `runplugin ipcluster` starts on it again
    data.clear()
    if gpus:
        data["gpus"] = gpus
    ctx.save()
    return stopped


def mark_restart(nodes: list[NodeRecord]) -> None:
    """Each node's engine steps are measured from now (the restart), not from the node's start."""
    now = time.time()
    for node in nodes:
        for step in ("engines", "registered"):
            node.steps.pop(step, None)
        node.steps["restart"] = now
