"""IPCluster's idle shutdown: the watchers (its node program ``idlewatch``) started on the nodes."""

from __future__ import annotations

import json

from globular.fanout import each_node
from globular.ipcluster.controller import controller_address
from globular.ipcluster.node import source
from globular.ipcluster.roles import DATA_KEY, IDLE_WATCHER, ipython_dir, profile_dir
from globular.ipcluster.settings import IPClusterSettings
from globular.plugins.base import PluginContext
from globular.providers.base import ProcessSpec
from globular.state import NodeRecord

IDLEWATCH_SOURCE = source("idlewatch")


def idle_state_file(master: NodeRecord) -> str:
    return f"{master.workdir}/run/idle.json"


async def start_idle_watchers(ctx: PluginContext, settings: IPClusterSettings, nodes: list[NodeRecord]) -> None:
    """The master's watcher (asks the controller, shuts it down when idle); on providers that
    rent machines, a watcher on every other node that powers it off once the controller is gone."""
    data = ctx.plugin_data(DATA_KEY)
    info = data["engine_info"]

    async def start(node: NodeRecord) -> None:
        release = ctx.release_commands(node)  # the provider says how a node gives itself back
        if node.is_master:
            request = {
                "mode": "master",
                "idle": settings.idle_shutdown,
                "release": release,
                "connection_file": f"{profile_dir(node)}/security/ipcontroller-client.json",
                "state_file": idle_state_file(node),
            }
        elif release:
            request = {
                "mode": "node",
                "controller": controller_address(info),
                "port": info["registration"],
                "grace": 120,
                "release": release,
            }
        else:
            return
        runner = ctx.runner(node)
        path = f"{node.workdir}/run/idle-watch.json"
        await runner.write_file(path, json.dumps(request).encode(), 0o600)
        spec = ProcessSpec(
            argv=[node.python, "-c", IDLEWATCH_SOURCE, path],
            log=f"{node.workdir}/logs/idle-watch.log",
            role=IDLE_WATCHER,
            env={"GLOBULAR_CLUSTER": ctx.name, "GLOBULAR_NODE": node.name, "IPYTHONDIR": ipython_dir(node)},
            cwd=node.workdir,
        )
        ctx.track(node, await runner.spawn([spec]))

    await each_node(nodes, start)
    data["idle_shutdown"] = settings.idle_shutdown
    ctx.save()
