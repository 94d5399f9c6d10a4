"""Node environments: each node gets a venv with what the cluster needs, built offline.

The wheelhouse (steps 1 and 2's local side) is :mod:`globular.wheelhouse`; the node's
half is :mod:`globular.node` (``env_*``).

With ``environment = managed`` (the default of providers whose nodes are other
machines), globular

1. asks every node (at once) for its Python: version, implementation, ABI,
   platform, libc, whether it has ``venv``, the free space, and the
   environments it already has (:mod:`globular.node`, run with the host's Python);
2. resolves, **on this machine**, a wheelhouse for each distinct (package set,
   node platform) with pip (``pip download --only-binary=:all:`` for the nodes'
   platform tags): ipyparallel at exactly this machine's version and whatever the
   plugins ask for (``Plugin.node_packages``), plus ``packages`` and
   ``requirements`` of the ``[cluster]`` section.  Wheelhouses are cached in
   ``~/.globular/wheels/<digest>`` by a digest of (package set, requirements file,
   wheelhouse folder, node target), so the index is asked once;
3. ships the wheels over the connection it already holds (a tar stream on stdin)
   and builds ``<remote_dir>/envs/<name>`` on every node at once (a venv made
   ``--without-pip``, filled by pip run from its own wheel, ``--no-index``).  A
   node that already has the environment (same digest, same base Python) installs
   nothing: ``env cached`` in the node's step line.

Then ``node.python`` is the environment's Python: the controller, the engines,
the notebook and every helper run from it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from globular.errors import CommandError, GlobularError, NodeError, NodeFailures
from globular.fanout import each_node
from globular.providers.base import NODE_SOURCE
from globular.spec import ClusterSpec
from globular.state import NodeRecord
from globular.wheelhouse import Target, Wanted, Wheelhouse, digest, env_name, probe_problems, resolve, wanted_for

if TYPE_CHECKING:
    from globular.plugins.base import Plugin, PluginContext
    from globular.providers.base import NodeProvider

log = logging.getLogger(__name__)

PROBE_TIMEOUT = 30.0
BUILD_TIMEOUT = 900.0
SPACE_FACTOR = 4  # a venv takes about this many times its wheels' size, while they are unpacked beside it
SPACE_MARGIN = 64 * 2**20


def environment_mode(spec: ClusterSpec, default: str) -> str:
    return spec.environment.mode or default


# -- on the nodes --------------------------------------------------------------------


async def _call(
    cluster: PluginContext,
    node: NodeRecord,
    python: str,
    verb: str,
    request: dict[str, Any],
    *,
    input: bytes | None = None,
    timeout: float,
) -> Any:
    # the node programs, run by ``python`` (the host's own: the environment is not made yet).  The
    # request goes on stdin, as every request does; only where stdin carries the wheels (env_build)
    # is it the argument, and it holds no secret (a folder, a name, the installer)
    if input is None:
        argv, input = [python, "-c", NODE_SOURCE, verb], json.dumps(request).encode()
    else:
        argv = [python, "-c", NODE_SOURCE, verb, json.dumps(request)]
    result = await cluster.runner(node).run(argv, input=input, timeout=timeout)
    try:
        return json.loads(result.stdout)
    except ValueError:
        raise CommandError(
            node.name, f"globular.node {verb}", result.returncode, result.stderr, result.stdout
        ) from None


def base_python(node: NodeRecord) -> str:
    """The host's own Python, from which the node's environment is made."""
    return node.data.get("env", {}).get("base_python") or node.python


async def prepare(
    cluster: PluginContext, provider: NodeProvider, plugins: list[Plugin], nodes: list[NodeRecord]
) -> dict[str, dict[str, Any]]:
    """Give each of ``nodes`` its environment (see the module's doc); node name -> what was done."""
    spec = provider.spec
    if environment_mode(spec, provider.default_environment) != "managed" or not nodes:
        return {}
    reporter = cluster.reporter
    root = provider.envs_dir()
    reporter.begin("env", "node environments", len(nodes))
    try:
        probes = await _probe(cluster, nodes, root)
        wants = {n.name: wanted_for(spec, plugins, n) for n in nodes}
        targets = {n.name: Target.from_probe(probes[n.name]) for n in nodes}
        # one read of a requirements file each
        digests = {key: digest(*key) for key in {(wants[n.name], targets[n.name]) for n in nodes}}
        plans = {
            n.name: _Plan(
                root, probes[n.name], (wants[n.name], targets[n.name]),
                env_name(digests[(wants[n.name], targets[n.name])], probes[n.name]["executable"]),
            )
            for n in nodes
        }  # fmt: skip
        houses = await _wheelhouses(cluster, {plan.key for plan in plans.values() if not plan.ready})

        async def build(node: NodeRecord) -> dict[str, Any]:
            plan = plans[node.name]
            return await _build(cluster, node, plan, None if plan.ready else houses[plan.key])

        done = await each_node(nodes, build)
    finally:
        reporter.end("env")
        cluster.save()
    return done


@dataclass(frozen=True)
class _Plan:
    """One node's environment: where (``root``), what it has (``facts``: its probe), for which
    wheelhouse (``key``) and under which name."""

    root: str
    facts: dict[str, Any]
    key: tuple[Wanted, Target]
    name: str

    @property
    def ready(self) -> bool:
        return self.name in self.facts["ready"]


async def _probe(cluster: PluginContext, nodes: list[NodeRecord], root: str) -> dict[str, Any]:
    """Every node's Python and the environments it has (at once); a node it will not do fails."""

    async def probe(node: NodeRecord) -> Any:
        if base_python(node) == node.python:  # the helper runs it already: one round trip, no new Python
            return await cluster.runner(node).nodeproc("env_probe", {"root": root}, timeout=PROBE_TIMEOUT)
        return await _call(cluster, node, base_python(node), "env_probe", {"root": root}, timeout=PROBE_TIMEOUT)

    probes = await each_node(nodes, probe)
    problems = {n.name: "; ".join(p) for n in nodes if (p := probe_problems(probes[n.name]))}
    if problems:
        raise NodeFailures({name: GlobularError(text) for name, text in problems.items()})
    return probes


async def _wheelhouses(
    cluster: PluginContext, needed: set[tuple[Wanted, Target]]
) -> dict[tuple[Wanted, Target], Wheelhouse]:
    """One wheelhouse per distinct (packages, target) the nodes still need, made at once."""
    houses: dict[tuple[Wanted, Target], Wheelhouse] = {}
    if not needed:
        return houses
    reporter, cache = cluster.reporter, cluster.home / "wheels"
    reporter.begin("wheels", "wheelhouse (this machine)", len(needed))

    async def make(key: tuple[Wanted, Target]) -> None:
        houses[key] = await resolve(key[0], key[1], cache)
        reporter.advance("wheels")

    try:
        await asyncio.gather(*(make(k) for k in needed))
    finally:
        reporter.end("wheels")
    return houses


async def _build(cluster: PluginContext, node: NodeRecord, plan: _Plan, house: Wheelhouse | None) -> dict[str, Any]:
    """``node``'s environment: found ready, or built from ``house``; the node runs from it."""
    facts, name = plan.facts, plan.name
    started = time.monotonic()
    if house is None:
        python, cached = f"{facts['root']}/{name}/bin/python", True
    else:
        needs = house.size * SPACE_FACTOR + SPACE_MARGIN
        if facts["free"] < needs:
            raise NodeError(
                node.name,
                f"only {facts['free'] / 2**20:.0f} MB free under {facts['root']}; "
                f"its environment needs about {needs / 2**20:.0f} MB",
            )
        try:
            request = {"root": plan.root, "name": name, "installer": house.installer}
            reply = await _call(
                cluster, node, facts["executable"], "env_build", request, input=house.tar(), timeout=BUILD_TIMEOUT
            )
        except CommandError as exc:
            if exc.returncode is None or exc.returncode == 3:
                raise NodeError(node.name, f"building its environment failed: {exc.stderr.strip()}") from None
            raise
        python, cached = reply["python"], reply["cached"]
    node.python = python
    node.data["env"] = {"name": name, "base_python": facts["executable"], "cached": cached, "root": facts["root"]}
    cluster.node_step(node, "env")
    cluster.reporter.advance("env")
    return {"name": name, "cached": cached, "seconds": round(time.monotonic() - started, 2)}


async def prune(cluster: PluginContext, provider: NodeProvider, keep: set[str]) -> dict[str, list[str]]:
    """Remove the environments on ``cluster``'s nodes but those named in ``keep``; node -> what went."""
    root = provider.envs_dir()

    async def one(node: NodeRecord) -> list[str]:
        reply = await _call(
            cluster, node, base_python(node), "env_prune", {"root": root, "keep": sorted(keep)}, timeout=120
        )
        removed: list[str] = reply["removed"]
        return removed

    return await each_node(cluster.nodes, one)
