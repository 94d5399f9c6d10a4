"""A running cluster: its record, its provider, its plugins, and what can be done to it.

(Longer than most modules: every operation on a cluster lives here, beside the
context they share, so that each reads top to bottom.)

Every operation holds the cluster's operation lock, keeps the state record up
to date as it goes (a process is recorded as soon as it is started), and
returns data; rendering is the caller's business.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from globular import environment
from globular.errors import ClusterNotFound, GlobularError, NodeFailures, PluginFailed, StartFailed
from globular.fanout import each_node
from globular.paths import globular_home
from globular.plugins.base import Plugin, PluginReport
from globular.preflight import NodeCheck, PreflightFailed
from globular.providers.base import NodeProvider, Runner, StopResult
from globular.registry import RegistryError, provider_class, resolve_plugin
from globular.reporting import NullReporter, Reporter, step_label
from globular.spec import ClusterSpec, PluginSpec
from globular.state import ClusterRecord, NodeRecord, ProcessRecord, StateStore, check_cluster_name


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


def node_names(count: int, existing: list[str] = ()) -> list[str]:  # type: ignore[assignment]
    """StarCluster's names: ``master``, then ``node001``, ``node002``, ... not yet used."""
    names: list[str] = []
    taken = set(existing)
    if "master" not in taken and count > 0:
        names.append("master")
    index = 1
    while len(names) < count:
        name = f"node{index:03d}"
        if name not in taken:
            names.append(name)
        index += 1
    return names


def node_order(node: NodeRecord) -> tuple[bool, str]:
    """The master first, then the others by name."""
    return (not node.is_master, node.name)


def load_plugin(spec: PluginSpec) -> Plugin:
    try:
        _, cls = resolve_plugin(spec.setup_class)
    except RegistryError as exc:
        raise GlobularError(f"plugin {spec.name!r}: {exc}") from None
    return cls.from_spec(spec)


class Cluster:
    """A cluster known to the state store; the context plugins work in."""

    def __init__(self, record: ClusterRecord, *, home: Path, store: StateStore, reporter: Reporter):
        self.record = record
        self.home = home
        self.store = store
        self.reporter = reporter
        self.provider: NodeProvider = provider_class(record.spec.provider)(record.spec, cluster=record.name, home=home)
        self.provider.reporter = reporter
        self.provider.on_step = self.node_step
        self.stopped = StopResult(0, 0, [])  # totals of every stop_processes call

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def nodes(self) -> list[NodeRecord]:
        return self.record.nodes

    @property
    def master(self) -> NodeRecord:
        return self.record.master

    def runner(self, node: NodeRecord) -> Runner:
        return self.provider.runner(node)

    async def close(self) -> None:
        await self.provider.close()

    # -- record keeping, for plugins ----------------------------------------

    def save(self) -> None:
        self.store.save(self.record)

    def track(self, node: NodeRecord, procs: list[ProcessRecord]) -> None:
        """Record processes started on ``node`` (so terminate can always stop them)."""
        node.processes.extend(procs)
        self.save()

    def untrack(self, node: NodeRecord, procs: list[ProcessRecord]) -> None:
        gone = {(p.pid, p.start) for p in procs}
        node.processes = [p for p in node.processes if (p.pid, p.start) not in gone]
        self.save()

    def node_step(self, node: NodeRecord, step: str) -> None:
        """``node`` reached ``step``: recorded (``globular status`` shows it) and reported live."""
        now = time.time()
        previous = max([node.created, *(t for s, t in node.steps.items() if s != step)])
        node.steps[step] = now
        node_step = getattr(self.reporter, "node_step", None)
        if node_step is not None:
            node_step(node.name, step_label(node, step), max(0.0, now - previous))

    def node_ready(self, node: NodeRecord) -> None:
        """The provider made ``node`` usable: it joins the record (saved at once, so that
        whatever happens next, terminate knows it) and the "nodes" progress step."""
        self.record.nodes.append(node)
        self.record.nodes.sort(key=node_order)
        self.node_step(node, "setup")
        self.save()
        self.reporter.advance("nodes")

    def plugin_data(self, key: str) -> dict:
        """A plugin's own part of the state record (saved with :meth:`save`)."""
        return self.record.plugin_data.setdefault(key, {})

    def plugins(self) -> list[Plugin]:
        return [load_plugin(spec) for spec in self.record.spec.plugins]

    async def stop_processes(self, node: NodeRecord, procs: list[ProcessRecord], timeout: float = 10.0) -> StopResult:
        result = await self.runner(node).stop(procs, timeout=timeout)
        self.untrack(node, procs)
        self.stopped = StopResult(self.stopped.stopped + result.stopped, self.stopped.killed + result.killed, [])
        return result

    async def stop_role(self, role: str) -> int:
        """Stop every recorded process of ``role`` on every node (by pid); how many there were."""
        stopped = 0
        for node in self.nodes:
            procs = node.processes_with_role(role)
            if procs:
                await self.stop_processes(node, procs)
                stopped += len(procs)
        return stopped

    def require_running(self) -> None:
        if self.record.status != "running":
            raise GlobularError(f"cluster {self.name!r} is {self.record.status}, not running")

    # -- operations ----------------------------------------------------------

    async def _stop_and_release(self, nodes: list[NodeRecord]) -> None:
        """Stop every process still recorded on ``nodes`` (by pid), then release the nodes."""
        await each_node([n for n in nodes if n.processes], lambda n: self.stop_processes(n, list(n.processes)))
        await self.provider.terminate_nodes(nodes)

    async def preflight(self, plugins: list[Plugin], nodes: list[NodeRecord]) -> list[NodeCheck]:
        """Every plugin's checks of ``nodes``, merged per node (see :mod:`globular.preflight`)."""
        merged: dict[str, NodeCheck] = {}
        for plugin in plugins:
            for check in await plugin.preflight(self, nodes):
                if check.node not in merged:
                    merged[check.node] = check
                else:
                    merged[check.node].problems += check.problems
                    merged[check.node].warnings += check.warnings
        return [merged[n.name] for n in nodes if n.name in merged]

    async def prepare_environments(self, plugins: list[Plugin], nodes: list[NodeRecord]) -> None:
        """Build (or find cached) each node's Python environment (:mod:`globular.environment`);
        afterwards every process on the nodes runs from it."""
        await environment.prepare(self, plugins, nodes)

    async def require_preflight(self, plugins: list[Plugin], nodes: list[NodeRecord]) -> list[NodeCheck]:
        """:meth:`preflight`, raising :class:`PreflightFailed` (one line a node) if any node fails."""
        checks = await self.preflight(plugins, nodes)
        if any(not c.ok for c in checks):
            raise PreflightFailed(checks)
        return checks

    async def _run_hooks(self, plugins: list[Plugin], hook: str, *args) -> list[PluginReport]:
        """Run ``hook`` of each plugin in order; the first failure stops the rest."""
        reports = []
        for plugin in plugins:
            report = await self._hook(plugin, hook, *args)
            if report is not None:
                reports.append(report)
        return reports

    async def release(self, nodes: list[NodeRecord], plugins: list[Plugin]) -> None:
        """Take ``nodes`` out of the cluster: ``on_remove_node`` in reverse plugin
        order, stop whatever they still run, release them, drop them from the record.

        Every step runs even if an earlier one failed; the first failure is raised.
        """
        errors: list[BaseException] = []
        for node in nodes:
            for plugin in reversed(plugins):
                try:
                    await self._hook(plugin, "on_remove_node", node)
                except PluginFailed as exc:
                    errors.append(exc)
        try:
            await self._stop_and_release(nodes)
        except BaseException as exc:
            errors.append(exc)
        else:
            names = {n.name for n in nodes}
            self.record.nodes = [n for n in self.record.nodes if n.name not in names]
            self.save()
        if errors:
            raise errors[0]

    async def _hook(self, plugin: Plugin, hook: str, *args) -> PluginReport | None:
        try:
            return await getattr(plugin, hook)(self, *args)
        except GlobularError as exc:
            raise PluginFailed(plugin.name, hook, exc) from exc
        except Exception as exc:  # a third-party plugin's bug: still name the plugin
            raise PluginFailed(plugin.name, hook, GlobularError(f"{type(exc).__name__}: {exc}")) from exc

    async def teardown(self, plugins: list[Plugin]) -> TerminateResult:
        """Undo everything: plugins' ``on_shutdown`` (reverse order), stop every
        recorded process by pid, release the nodes, delete the record.

        A plugin's failure does not stop the rest; a process that cannot be
        stopped (or a node that cannot be released) keeps the record, marked
        ``failed``, so that ``terminate`` can try again.
        """
        started = time.monotonic()
        self.record.status = "stopping"
        self.save()
        warnings: list[str] = []
        for plugin in reversed(plugins):
            try:
                await self._hook(plugin, "on_shutdown")
            except PluginFailed as exc:
                warnings.append(str(exc))
        try:
            await self._stop_and_release(self.nodes)
            await self.provider.release_cluster()
        except BaseException as exc:
            self.record.status = "failed"
            self.record.error = str(exc)
            self.save()
            raise
        finally:
            await self.close()
        self.store.delete(self.name)
        return TerminateResult(
            name=self.name,
            nodes=len(self.nodes),
            processes_stopped=self.stopped.stopped,
            processes_killed=self.stopped.killed,
            elapsed=time.monotonic() - started,
            warnings=warnings,
        )


def _context(home: Path | None, reporter: Reporter | None) -> tuple[Path, StateStore, Reporter]:
    home = home or globular_home()
    return home, StateStore(home), reporter or NullReporter()


async def start(
    name: str, spec: ClusterSpec, *, home: Path | None = None, reporter: Reporter | None = None
) -> StartResult:
    """Provision ``spec.cluster_size`` nodes and run the plugins on them.

    On any failure (or interruption) everything made so far is undone and
    :class:`StartFailed` says what failed and whether the cleanup worked.
    """
    home, store, reporter = _context(home, reporter)
    check_cluster_name(name)
    plugins = [load_plugin(p) for p in spec.plugins]  # fail before anything exists
    started = time.monotonic()
    with store.operation(name):
        provider = provider_class(spec.provider)(spec, cluster=name, home=home)
        kept = spec.model_copy(update={"plugins": [type(p).redacted(s) for p, s in zip(plugins, spec.plugins)]})
        record = ClusterRecord(name=name, region=provider.region, spec=kept)
        store.create(record)
        cluster = Cluster(record, home=home, store=store, reporter=reporter)
        try:
            names = node_names(spec.cluster_size)
            reporter.begin("nodes", f"nodes ({spec.provider})", len(names))

            await cluster.provider.create_nodes(names, cluster.node_ready)
            reporter.end("nodes")
            await cluster.prepare_environments(plugins, record.nodes)
            checks = await cluster.require_preflight(plugins, record.nodes)
            reports = await cluster._run_hooks(plugins, "run")
            record.status = "running"
            cluster.save()
            await cluster.close()
            return StartResult(record=record, elapsed=time.monotonic() - started, reports=reports, checks=checks)
        except BaseException as exc:
            try:
                await cluster.teardown(plugins)
            except BaseException as cleanup_exc:
                if not isinstance(exc, Exception):
                    raise
                raise StartFailed(name, exc, cleanup_exc) from exc
            if not isinstance(exc, Exception):
                raise
            raise StartFailed(name, exc) from exc


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
    home, store, reporter = _context(home, reporter)
    started = time.monotonic()
    with store.operation(name):
        cluster = open_cluster(name, home=home, reporter=reporter)
        cluster.require_running()
        plugins = cluster.plugins()
        names = node_names(count, [n.name for n in cluster.nodes])
        added: list[NodeRecord] = []

        def ready(node: NodeRecord) -> None:
            added.append(node)
            cluster.node_ready(node)

        try:
            reporter.begin("nodes", f"new nodes ({cluster.record.spec.provider})", count)
            await cluster.provider.create_nodes(names, ready, existing=list(cluster.nodes), hosts=hosts)
            reporter.end("nodes")
            await cluster.prepare_environments(plugins, added)
            checks = await cluster.require_preflight(plugins, added)
            results = await each_node(added, lambda node: cluster._run_hooks(plugins, "on_add_node", node))
        except BaseException:
            await cluster.release(added, plugins)
            raise
        finally:
            await cluster.close()
        reports = [r for node in added for r in results[node.name]]
        return NodesResult(cluster.record, [n.name for n in added], time.monotonic() - started, reports, checks)


async def remove_node(
    name: str, node_name: str, *, home: Path | None = None, reporter: Reporter | None = None
) -> NodesResult:
    """Run the plugins' ``on_remove_node`` (reverse order), stop the node's processes, release it."""
    home, store, reporter = _context(home, reporter)
    started = time.monotonic()
    with store.operation(name):
        cluster = open_cluster(name, home=home, reporter=reporter)
        cluster.require_running()
        node = cluster.record.node(node_name)
        if node.is_master:
            raise GlobularError("the master cannot be removed; use `globular terminate` to stop the whole cluster")
        try:
            await cluster.release([node], cluster.plugins())
        finally:
            await cluster.close()
        return NodesResult(cluster.record, [node_name], time.monotonic() - started)


async def check(
    name: str, spec: ClusterSpec | None = None, *, home: Path | None = None, reporter: Reporter | None = None
) -> list[NodeCheck]:
    """Preflight alone.  On running cluster ``name``: its nodes.  Otherwise ``spec``'s nodes
    are brought up, checked and released again (providers that rent machines refuse)."""
    home, store, reporter = _context(home, reporter)
    try:
        record = store.get(name)
    except ClusterNotFound:
        record = None
    if record is not None:
        with store.operation(name):
            cluster = Cluster(record, home=home, store=store, reporter=reporter)
            try:
                return await cluster.preflight(cluster.plugins(), cluster.nodes)
            finally:
                await cluster.close()
    if spec is None:
        raise ClusterNotFound(name)
    provider_cls = provider_class(spec.provider)
    if provider_cls.rents_machines:
        raise GlobularError(
            f"cluster {name!r} is not running, and checking a {spec.provider} template would rent machines: "
            "`start` runs the same checks before anything starts"
        )
    plugins = [load_plugin(p) for p in spec.plugins]

    async def work(cluster: Cluster) -> list[NodeCheck]:
        try:
            await cluster.prepare_environments(plugins, cluster.nodes)
        except NodeFailures as exc:  # a node whose environment cannot be made: its check says why
            return [
                NodeCheck(
                    node=n.name, address=n.address, problems=[str(exc.failures[n.name]).removeprefix(f"{n.name}: ")]
                )
                for n in cluster.nodes
                if n.name in exc.failures
            ]
        return await cluster.preflight(plugins, cluster.nodes)

    return await _on_template_nodes(name, spec, home, store, reporter, work)


async def _on_template_nodes(name: str, spec: ClusterSpec, home: Path, store: StateStore, reporter: Reporter, work):
    """Bring up ``spec``'s nodes under a record named ``name``, run ``work(cluster)``, release them."""
    check_cluster_name(name)
    with store.operation(name):
        region = provider_class(spec.provider)(spec, cluster=name, home=home).region
        record = ClusterRecord(name=name, region=region, spec=spec)
        store.create(record)
        cluster = Cluster(record, home=home, store=store, reporter=reporter)
        try:
            reporter.begin("nodes", f"nodes ({spec.provider})", spec.cluster_size)
            await cluster.provider.create_nodes(node_names(spec.cluster_size), cluster.node_ready)
            reporter.end("nodes")
            return await work(cluster)
        finally:
            await cluster.teardown([])


async def prune_environments(
    spec: ClusterSpec, *, home: Path | None = None, reporter: Reporter | None = None
) -> dict[str, list[str]]:
    """Remove the node environments (:mod:`globular.environment`) from the hosts of template
    ``spec``, except those a running cluster of this machine uses; node -> what was removed."""
    home, store, reporter = _context(home, reporter)
    if provider_class(spec.provider).rents_machines:
        raise GlobularError(f"{spec.provider} nodes are released with their disks: there is nothing to prune")
    in_use = {n.data["env"]["name"] for r in store.list()[0] for n in r.nodes if n.data.get("env")}
    spec = spec.model_copy(update={"plugins": []})

    async def work(cluster: Cluster) -> dict[str, list[str]]:
        return await environment.prune(cluster, in_use)

    return await _on_template_nodes(f"prune-{spec.template}"[:63], spec, home, store, reporter, work)


@dataclass
class FoundCluster:
    """A cluster a provider's account holds that this machine has no record of."""

    name: str
    spec: ClusterSpec
    region: str
    nodes: list[NodeRecord]


async def discover(specs: list[ClusterSpec], *, home: Path | None = None) -> list[FoundCluster]:
    """Clusters started elsewhere (ec2: found by their tags) in the accounts ``specs`` use.

    Each account (provider, region, credentials) is asked once; clusters this
    machine has a record of are left out.
    """
    home, store, _ = _context(home, None)
    known = {r.name for r in store.list()[0]}
    asked: set = set()
    found: dict[str, FoundCluster] = {}
    for spec in specs:
        provider = provider_class(spec.provider)(spec, cluster="", home=home)
        owner = provider.account()
        account = (spec.provider, provider.region, owner)
        if owner is None or account in asked:
            continue
        asked.add(account)
        try:
            for name, nodes in (await provider.discover()).items():
                if name not in known and name not in found:
                    found[name] = FoundCluster(name, spec, provider.region, sorted(nodes, key=node_order))
        finally:
            await provider.close()
    return sorted(found.values(), key=lambda f: f.name)


def adopt(found: FoundCluster, *, home: Path | None = None) -> ClusterRecord:
    """Record a cluster found elsewhere so that ``terminate`` (and ``listclusters``) can act on it."""
    home, store, _ = _context(home, None)
    record = ClusterRecord(name=found.name, region=found.region, spec=found.spec, nodes=found.nodes, status="running")
    record.error = "adopted: started elsewhere, found by its tags"
    store.create(record)
    return record


def open_cluster(name: str, *, home: Path | None = None, reporter: Reporter | None = None) -> Cluster:
    home, store, reporter = _context(home, reporter)
    return Cluster(store.get(name), home=home, store=store, reporter=reporter)


async def terminate(name: str, *, home: Path | None = None, reporter: Reporter | None = None) -> TerminateResult:
    """Stop every process of the cluster, release its nodes, forget it."""
    home, store, reporter = _context(home, reporter)
    with store.operation(name):
        cluster = open_cluster(name, home=home, reporter=reporter)
        plugins, warnings = [], []
        for spec in cluster.record.spec.plugins:
            try:
                plugins.append(load_plugin(spec))
            except GlobularError as exc:  # uninstalled plugin: its processes are still stopped by pid
                warnings.append(str(exc))
        result = await cluster.teardown(plugins)
        result.warnings[:0] = warnings
        return result


async def run_plugin(
    name: str, spec: PluginSpec, *, home: Path | None = None, reporter: Reporter | None = None
) -> PluginRunResult:
    """Run one plugin's ``run`` hook on a running cluster."""
    home, store, reporter = _context(home, reporter)
    plugin = load_plugin(spec)
    started = time.monotonic()
    with store.operation(name):
        cluster = open_cluster(name, home=home, reporter=reporter)
        try:
            report = await cluster._hook(plugin, "run")
        finally:
            await cluster.close()
        return PluginRunResult(cluster.record, spec.name, time.monotonic() - started, report)


__all__ = [
    "Cluster",
    "FoundCluster",
    "NodeFailures",
    "NodesResult",
    "PluginRunResult",
    "StartResult",
    "TerminateResult",
    "add_nodes",
    "adopt",
    "check",
    "discover",
    "node_names",
    "open_cluster",
    "remove_node",
    "run_plugin",
    "start",
    "terminate",
]
