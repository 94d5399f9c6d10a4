"""What can be done to a cluster: start, add and remove nodes, check, run a plugin, terminate.

Each operation holds the cluster's operation lock and a log file
(``~/.globular/logs/<cluster>.log``) while it runs, changes the desired node set
and reconciles (:class:`~globular.cluster.ClusterContext`), and returns data;
rendering is the caller's business.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from globular.cluster import ClusterContext, load_plugin, node_names
from globular.errors import BadInput, ClusterNotFound, GlobularError, NodeFailures, StartFailed
from globular.fanout import each_node
from globular.logs import cluster_log
from globular.node.proc import process_start
from globular.paths import globular_home, write_private
from globular.plugins.base import NodeCheck, Plugin, PluginReport
from globular.registry import make_provider, provider_class
from globular.reporting import NullReporter, Reporter
from globular.spec import ClusterSpec, PluginSpec
from globular.state import ClusterRecord, NodeRecord, StateStore, check_cluster_name

T = TypeVar("T")
log = logging.getLogger(__name__)


@dataclass
class StartResult:
    record: ClusterRecord
    elapsed: float
    reports: list[PluginReport] = field(default_factory=list)
    checks: list[NodeCheck] = field(default_factory=list)  # preflight, with its warnings


@dataclass
class PluginRunResult:
    record: ClusterRecord
    plugin: str
    elapsed: float
    report: PluginReport | None


@dataclass
class NodesResult:
    """What ``add_nodes`` / ``remove_node`` did."""

    record: ClusterRecord
    nodes: list[str]
    elapsed: float
    reports: list[PluginReport] = field(default_factory=list)
    checks: list[NodeCheck] = field(default_factory=list)


@dataclass
class TerminateResult:
    name: str
    nodes: int
    processes_stopped: int
    processes_killed: int
    elapsed: float
    warnings: list[str] = field(default_factory=list)
    reports: list[PluginReport] = field(default_factory=list)  # what the plugins kept (the notebooks)


def home_store_reporter(home: Path | None, reporter: Reporter | None) -> tuple[Path, StateStore, Reporter]:
    """The globular home an operation runs in (default: this user's), its records, its progress."""
    home = home or globular_home()
    return home, StateStore(home), reporter or NullReporter()


def warm_imports(plugins: list[Plugin]) -> None:
    """Import the plugins' :attr:`~globular.plugins.base.Plugin.warm_modules` in a thread while
    the provider makes the nodes (time spent waiting), not later, on the way of the start."""
    modules = sorted({module for plugin in plugins for module in plugin.warm_modules})

    def load() -> None:
        for module in modules:
            try:
                importlib.import_module(module)
            except Exception as exc:  # noqa: BLE001 - the hook that needs it says why, later
                log.debug("warming up: cannot import %s: %s", module, exc)

    if modules:
        threading.Thread(target=load, name="globular-warm-imports", daemon=True).start()


@asynccontextmanager
async def opened(name: str, home: Path | None, reporter: Reporter | None) -> AsyncIterator[ClusterContext]:
    """Cluster ``name``, locked for one operation, logged to its log file, closed afterwards."""
    home, store, reporter = home_store_reporter(home, reporter)
    with store.operation(name), cluster_log(home, name):
        ctx = ClusterContext(store.get(name), home=home, store=store, reporter=reporter)
        try:
            yield ctx
        finally:
            await ctx.close()


@asynccontextmanager
async def created(
    name: str, spec: ClusterSpec, home: Path | None, reporter: Reporter | None
) -> AsyncIterator[ClusterContext]:
    """A new record for cluster ``name`` of ``spec``, locked and logged like :func:`opened`."""
    home, store, reporter = home_store_reporter(home, reporter)
    check_cluster_name(name)
    with store.operation(name), cluster_log(home, name):
        provider = make_provider(spec, cluster=name, home=home)
        record = ClusterRecord(name=name, region=provider.region, spec=spec, desired=node_names(spec.cluster_size))
        store.create(record)
        ctx = ClusterContext(record, home=home, store=store, reporter=reporter, provider=provider)
        try:
            yield ctx
        finally:
            await ctx.close()


async def start(
    name: str, spec: ClusterSpec, *, home: Path | None = None, reporter: Reporter | None = None
) -> StartResult:
    """Provision ``spec.cluster_size`` nodes and run the plugins on them.

    On any failure (or interruption) everything made so far is undone and
    :class:`StartFailed` says what failed and whether the cleanup worked.
    """
    plugins = [load_plugin(p) for p in spec.plugins]  # fail before anything exists
    started = time.monotonic()
    warm_imports(plugins)
    kept = spec.model_copy(update={"plugins": [type(p).redacted(s) for p, s in zip(plugins, spec.plugins)]})
    async with created(name, kept, home, reporter) as ctx:
        log.info("starting cluster %s: %d nodes, provider %s", name, spec.cluster_size, spec.provider)
        try:
            _, checks, _ = await ctx.reconcile(plugins)
            reports = await ctx.run_hooks(plugins, "run")
            ctx.record.status = "running"
            ctx.save()
            log.info("cluster %s is running (%.1f s)", name, time.monotonic() - started)
            return StartResult(ctx.record, time.monotonic() - started, reports, checks)
        except BaseException as exc:
            log.info("cluster %s did not start (%s): undoing what was made", name, exc or type(exc).__name__)
            logs = await keep_logs(ctx) if isinstance(exc, Exception) else None
            try:
                await ctx.teardown(plugins)
            except BaseException as cleanup_exc:
                if not isinstance(exc, Exception):
                    raise
                raise StartFailed(name, exc, cleanup_exc, logs=logs) from exc
            if not isinstance(exc, Exception):
                raise
            raise StartFailed(name, exc, logs=logs) from exc


async def keep_logs(ctx: ClusterContext) -> str | None:
    """Copy every node's logs to ``~/.globular/failed/<cluster>-<time>/<node>/`` before the nodes
    go (a failed start removes them); the folder, or None when there was nothing to keep."""
    folder = ctx.home / "failed" / f"{ctx.name}-{time.strftime('%Y%m%d-%H%M%S')}"

    async def one(node: NodeRecord) -> None:
        found = await ctx.runner(node).nodeproc("logs", {"dir": f"{node.workdir}/logs"}, timeout=30)
        for file, text in found.items():
            write_private(folder / node.name / file, text.encode())

    try:
        await each_node(list(ctx.nodes), one)
    except NodeFailures as exc:
        log.warning("%s: could not keep every node's logs: %s", ctx.name, exc)
    return str(folder) if folder.exists() else None


async def add_nodes(
    name: str,
    count: int = 1,
    *,
    hosts: list[str] | None = None,
    home: Path | None = None,
    reporter: Reporter | None = None,
) -> NodesResult:
    """Add ``count`` nodes to a running cluster and run the plugins' ``on_add_node`` on each.

    ``hosts`` names the machines to use (ssh provider); by default the provider
    picks (ssh: the next unused hosts of ``node_hosts``).  If anything fails, the
    new nodes are removed again and the cluster is as it was.
    """
    if hosts:
        count = len(hosts)
    if count < 1:
        raise GlobularError("the number of nodes to add must be at least 1")
    started = time.monotonic()
    async with opened(name, home, reporter) as ctx:
        ctx.require_running()
        provider = type(ctx.provider)
        if hosts and not provider.places_nodes:
            raise BadInput(f"the {provider.name} provider {provider.where_nodes_come_from}: it takes no --host")
        total = len(ctx.record.desired) + count
        problem = None if hosts else provider.size_problem(ctx.provider.settings, total)
        if problem is not None:  # the rule start checks its size with, checked before anything changes
            raise BadInput(f"-n {count}: the cluster would have {total} nodes; {problem[1]}")
        cap = ctx.record.spec.max_nodes
        if cap is not None and total > cap:
            raise BadInput(f"-n {count}: the cluster would have {total} nodes; its max_nodes is {cap}")
        plugins = ctx.plugins()
        warm_imports(plugins)
        ctx.record.desired += node_names(count, ctx.record.desired)
        log.info("cluster %s: adding %d nodes", name, count)
        ctx.save()
        added, checks, reports = await ctx.reconcile(plugins, join=True, hosts=hosts)
        return NodesResult(ctx.record, [n.name for n in added], time.monotonic() - started, reports, checks)


async def remove_node(
    name: str, node_name: str, *, lost: bool = False, home: Path | None = None, reporter: Reporter | None = None
) -> NodesResult:
    """Run the plugins' ``on_remove_node`` (reverse order), stop the node's processes, release it.
    ``lost``: the node is gone (the balancer replaces it): what cannot be done on it is logged,
    and it leaves the record all the same."""
    started = time.monotonic()
    async with opened(name, home, reporter) as ctx:
        ctx.require_running()
        node = ctx.record.node(node_name)
        if node.is_master:
            raise GlobularError("the master cannot be removed; use `globular terminate` to stop the whole cluster")
        ctx.record.desired = [n for n in ctx.record.desired if n != node_name]
        ctx.save()
        await ctx.reconcile(ctx.plugins(), join=True, lost=lost)
        return NodesResult(ctx.record, [node_name], time.monotonic() - started)


async def restart_node(
    name: str, node_name: str, *, home: Path | None = None, reporter: Reporter | None = None
) -> NodesResult:
    """Run the plugins' ``on_restart_node`` on ``node_name``: what of its work left the cluster
    (an engine no longer registered) starts again in place; the node and the rest stay.  Its
    reports (none: there was nothing to restart)."""
    started = time.monotonic()
    async with opened(name, home, reporter) as ctx:
        ctx.require_running()
        node = ctx.record.node(node_name)
        reports = await ctx.run_hooks(ctx.plugins(), "on_restart_node", node)
        ctx.save()
        return NodesResult(ctx.record, [node_name], time.monotonic() - started, reports)


async def check(
    name: str, spec: ClusterSpec | None = None, *, home: Path | None = None, reporter: Reporter | None = None
) -> list[NodeCheck]:
    """Preflight alone.  On running cluster ``name``: its nodes.  Otherwise ``spec``'s nodes
    are brought up, checked and released again (providers that rent machines refuse)."""
    home, store, reporter = home_store_reporter(home, reporter)
    if store.exists(name):
        async with opened(name, home, reporter) as ctx:
            return await ctx.preflight(ctx.plugins(), ctx.nodes)
    if spec is None:
        raise ClusterNotFound(name)
    if provider_class(spec.provider).rents_machines:
        raise GlobularError(
            f"cluster {name!r} is not running, and checking a {spec.provider} template would rent machines: "
            "`start` runs the same checks before anything starts"
        )
    plugins = [load_plugin(p) for p in spec.plugins]

    async def work(ctx: ClusterContext) -> list[NodeCheck]:
        try:
            from globular import environment

            await environment.prepare(ctx, ctx.provider, plugins, ctx.nodes)
        except NodeFailures as exc:  # a node whose environment cannot be made: its check says why
            return [
                NodeCheck(n.name, n.address, problems=[str(exc.failures[n.name]).removeprefix(f"{n.name}: ")])
                for n in ctx.nodes
                if n.name in exc.failures
            ]
        return await ctx.preflight(plugins, ctx.nodes)

    return await _on_template_nodes(name, spec, home, reporter, work)


async def _on_template_nodes(
    name: str, spec: ClusterSpec, home: Path, reporter: Reporter, work: Callable[[ClusterContext], Awaitable[T]]
) -> T:
    """Bring up ``spec``'s nodes under a record named ``name``, run ``work``, release them."""
    async with created(name, spec, home, reporter) as ctx:
        try:
            await ctx.reconcile([], prepare=False)
            return await work(ctx)
        finally:
            await ctx.teardown([])


async def prune_environments(
    spec: ClusterSpec, *, home: Path | None = None, reporter: Reporter | None = None
) -> dict[str, list[str]]:
    """Remove the node environments (:mod:`globular.environment`) from the hosts of template
    ``spec``, except those a running cluster of this machine uses; node -> what was removed."""
    home, store, reporter = home_store_reporter(home, reporter)
    if not provider_class(spec.provider).environments_outlive_nodes:
        raise GlobularError(f"{spec.provider} nodes are released with their disks: there is nothing to prune")
    in_use = {n.data["env"]["name"] for r in store.list()[0] for n in r.nodes if n.data.get("env")}
    spec = spec.model_copy(update={"plugins": []})

    async def work(ctx: ClusterContext) -> dict[str, list[str]]:
        from globular import environment

        return await environment.prune(ctx, ctx.provider, in_use)

    return await _on_template_nodes(f"prune-{spec.template}"[:63], spec, home, reporter, work)


async def terminate(
    name: str, *, discard: bool = False, home: Path | None = None, reporter: Reporter | None = None
) -> TerminateResult:
    """Stop every process of the cluster, release its nodes, forget it.  First each plugin keeps
    what the user would lose (ipcluster: the notebooks, copied home), unless ``discard``; if
    that fails, nothing is stopped or released."""
    started = time.monotonic()
    async with opened(name, home, reporter) as ctx:
        plugins: list[Plugin] = []
        warnings: list[str] = []
        for spec in ctx.record.spec.plugins:
            try:
                plugins.append(load_plugin(spec))
            except GlobularError as exc:  # uninstalled plugin: its processes are still stopped by pid
                warnings.append(str(exc))
        nodes = len(ctx.nodes)
        await stop_balancer(ctx.record)
        log.info("terminating cluster %s: %d nodes", name, nodes)
        reports = await ctx.run_hooks(plugins, "before_terminate", discard)
        warnings += await ctx.teardown(plugins)
        stopped = ctx.stopped
        return TerminateResult(
            name, nodes, stopped.stopped, stopped.killed, time.monotonic() - started, warnings, reports
        )


BALANCER_GRACE = 15.0  # s a balancer asked to stop gets to end its step (a drain, an addnode undone)


async def stop_balancer(record: ClusterRecord) -> bool:
    """Stop the cluster's balancer (``globular loadbalance``) if one runs: SIGTERM by pid (and
    start time), SIGKILL after :data:`BALANCER_GRACE`.  Whether one ran."""
    balancer = record.balancer
    if balancer is None or not balancer.running:
        return False
    if balancer.pid == os.getpid():  # this process balances it (the library, in a notebook): it cannot be signalled
        raise GlobularError(f"cluster {record.name!r} is balanced by this process: stop its Balancer first")
    log.info("%s: stopping its balancer (pid %d)", record.name, balancer.pid)
    os.kill(balancer.pid, signal.SIGTERM)
    deadline = time.monotonic() + BALANCER_GRACE
    while time.monotonic() < deadline:
        if process_start(balancer.pid) != balancer.start:  # it ended
            return True
        await asyncio.sleep(0.05)
    os.kill(balancer.pid, signal.SIGKILL)
    return True


async def run_plugin(
    name: str, spec: PluginSpec, *, home: Path | None = None, reporter: Reporter | None = None
) -> PluginRunResult:
    """Run one plugin's ``run`` hook on a running cluster."""
    plugin = load_plugin(spec)
    started = time.monotonic()
    async with opened(name, home, reporter) as ctx:
        report = await ctx.hook(plugin, "run")
        return PluginRunResult(ctx.record, spec.name, time.monotonic() - started, report)
