"""A cluster being worked on: its record, its provider, and one reconcile that brings
the nodes there are to the nodes the record wants.

:class:`ClusterContext` is what every operation (:mod:`globular.operations`) holds
while it runs, and what plugins get as their
:class:`~globular.plugins.base.PluginContext`.  The record keeps the desired node
set (``desired``); ``start``, ``addnode``, ``removenode`` and ``terminate`` change
it and call :meth:`ClusterContext.reconcile`, which makes the missing nodes and
releases the extra ones, like dask's ``SpecCluster``.  A process is recorded as
soon as it is started, so that terminate can always stop it by pid.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

from globular.errors import GlobularError, PluginFailed
from globular.fanout import each_node
from globular.plugins.base import NodeCheck, Plugin, PluginReport, PreflightFailed
from globular.providers.base import NodeProvider, Runner, StopResult
from globular.registry import RegistryError, make_provider, resolve_plugin
from globular.reporting import Reporter, step_label
from globular.spec import PluginSpec, Settings
from globular.state import ClusterRecord, NodeRecord, ProcessRecord, StateStore

log = logging.getLogger(__name__)


def node_names(count: int, existing: list[str] | tuple[str, ...] = ()) -> list[str]:
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


class ClusterContext:
    """A cluster known to the state store, as an operation and its plugins see it."""

    def __init__(
        self,
        record: ClusterRecord,
        *,
        home: Path,
        store: StateStore,
        reporter: Reporter,
        provider: NodeProvider | None = None,
    ):
        self.record = record
        self.store = store
        self._home = home
        self._reporter = reporter
        # one provider for the whole operation (``provider``: the one that said the new record's region)
        self.provider: NodeProvider = provider or make_provider(record.spec, cluster=record.name, home=home)
        self.provider.reporter = reporter
        self.provider.on_step = self.node_step
        self.stopped = StopResult(0, 0, [])  # totals of every stop_processes call
        self._save_pending = False
        self._lost: set[str] = set()  # nodes being released as lost

    # -- the PluginContext ---------------------------------------------------

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def region(self) -> str:
        return self.record.region

    @property
    def home(self) -> Path:
        return self._home

    @property
    def reporter(self) -> Reporter:
        return self._reporter

    @property
    def nodes(self) -> list[NodeRecord]:
        return self.record.nodes

    @property
    def master(self) -> NodeRecord:
        return self.record.master

    @property
    def remote_nodes(self) -> bool:
        return self.provider.remote_nodes

    @property
    def rents_machines(self) -> bool:
        return self.provider.rents_machines

    @property
    def login_key(self) -> str | None:
        return self.provider.login_key()

    def release_commands(self, node: NodeRecord) -> list[list[str]]:
        return self.provider.release_commands(node)

    def runner(self, node: NodeRecord) -> Runner:
        return self.provider.runner(node)

    def save(self) -> None:
        self.store.save(self.record)

    def track(self, node: NodeRecord, procs: list[ProcessRecord]) -> None:
        node.processes.extend(procs)
        self.save()

    def untrack(self, node: NodeRecord, procs: list[ProcessRecord]) -> None:
        gone = {(p.pid, p.start) for p in procs}
        node.processes = [p for p in node.processes if (p.pid, p.start) not in gone]
        self.save()

    async def stop_processes(self, node: NodeRecord, procs: list[ProcessRecord], timeout: float = 10.0) -> StopResult:
        result = await self.runner(node).stop(procs, timeout=timeout)
        self.untrack(node, procs)
        self.stopped = StopResult(self.stopped.stopped + result.stopped, self.stopped.killed + result.killed, [])
        return result

    def plugin_data(self, key: str) -> dict[str, Any]:
        return self.record.plugin_data.setdefault(key, {})

    def settings_of(self, plugin: type[Plugin]) -> Settings | None:
        for spec in self.record.spec.plugins:
            try:
                _, cls = resolve_plugin(spec.setup_class)
            except RegistryError:
                continue
            if cls is plugin:
                return spec.typed_settings(cls.Settings)
        return None

    def is_lost(self, node: NodeRecord) -> bool:
        return node.name in self._lost

    def node_step(self, node: NodeRecord, step: str) -> None:
        now = time.time()
        previous = max([node.created, *(t for s, t in node.steps.items() if s != step)])
        node.steps[step] = now
        log.debug("%s/%s: %s (%.2fs)", self.name, node.name, step, now - previous)
        node_step = getattr(self.reporter, "node_step", None)
        if node_step is not None:
            node_step(node.name, step_label(node, step), max(0.0, now - previous))

    # -- the rest, for operations --------------------------------------------

    def plugins(self) -> list[Plugin]:
        return [load_plugin(spec) for spec in self.record.spec.plugins]

    def require_running(self) -> None:
        if self.record.status != "running":
            raise GlobularError(f"cluster {self.name!r} is {self.record.status}, not running")

    async def close(self) -> None:
        await self.provider.close()

    def _node_ready(self, node: NodeRecord) -> None:
        """The provider made ``node`` usable: it joins the record and the "nodes" progress step.

        The record is saved once for all the nodes that became ready together (as soon as the
        provider yields), not once per node: the cost of a step grows with what it changed.
        """
        self.record.nodes.append(node)
        self.node_step(node, "setup")
        self.reporter.advance("nodes")
        if not self._save_pending:
            self._save_pending = True
            asyncio.get_running_loop().call_soon(self._save_ready_nodes)

    def _save_ready_nodes(self) -> None:
        if not self._save_pending:  # saved already
            return
        self._save_pending = False
        self.record.nodes.sort(key=node_order)
        self.save()

    async def hook(self, plugin: Plugin, hook: str, *args: Any) -> PluginReport | None:
        """Run one hook; any failure is a :class:`PluginFailed` that names the plugin."""
        log.debug("%s: plugin %s: %s", self.name, plugin.name, hook)
        try:
            report: PluginReport | None = await getattr(plugin, hook)(self, *args)
        except GlobularError as exc:
            raise PluginFailed(plugin.name, hook, exc) from exc
        except Exception as exc:  # a third-party plugin's bug: still name the plugin
            raise PluginFailed(plugin.name, hook, GlobularError(f"{type(exc).__name__}: {exc}")) from exc
        return report

    async def run_hooks(self, plugins: list[Plugin], hook: str, *args: Any) -> list[PluginReport]:
        """Run ``hook`` of each plugin in order; the first failure stops the rest."""
        reports = []
        for plugin in plugins:
            report = await self.hook(plugin, hook, *args)
            if report is not None:
                reports.append(report)
        return reports

    async def preflight(self, plugins: list[Plugin], nodes: list[NodeRecord]) -> list[NodeCheck]:
        """Every plugin's checks of ``nodes``, merged per node."""
        merged: dict[str, NodeCheck] = {}
        for plugin in plugins:
            for check in await plugin.preflight(self, nodes):
                if check.node not in merged:
                    merged[check.node] = check
                else:
                    merged[check.node].problems += check.problems
                    merged[check.node].warnings += check.warnings
        return [merged[n.name] for n in nodes if n.name in merged]

    async def prepare(self, plugins: list[Plugin], nodes: list[NodeRecord]) -> list[NodeCheck]:
        """Make ``nodes`` ready for the plugins: their Python environment (built, or found
        cached: :mod:`globular.environment`), then the preflight; a node that fails it
        raises :class:`PreflightFailed` (one line a node)."""
        from globular import environment  # the builder: only where nodes are made ready

        await environment.prepare(self, self.provider, plugins, nodes)
        checks = await self.preflight(plugins, nodes)
        if any(not c.ok for c in checks):
            raise PreflightFailed(checks)
        return checks

    # -- the node set --------------------------------------------------------

    async def reconcile(
        self,
        plugins: list[Plugin],
        *,
        join: bool = False,
        prepare: bool = True,
        hosts: list[str] | None = None,
        lost: bool = False,
    ) -> tuple[list[NodeRecord], list[NodeCheck], list[PluginReport]]:
        """Bring the nodes to ``record.desired``.

        Nodes not desired leave (``on_remove_node`` of each plugin first, in reverse
        order, when ``join``: the cluster runs).  Desired nodes that do not exist are
        made by the provider (``hosts``: on these machines), then, with ``prepare``,
        get their environment and preflight, and with ``join`` each plugin's
        ``on_add_node``.  If making them fails, the new nodes are released and taken
        out of ``desired`` again.  Returns the new nodes, their checks and reports.
        ``lost``: the nodes leaving are gone (see :meth:`release`).
        """
        wanted = set(self.record.desired)
        extra = [n for n in self.nodes if n.name not in wanted]
        if extra:
            log.info("%s: releasing %s", self.name, ", ".join(n.name for n in extra))
            await self.release(extra, plugins if join else [], lost=lost)
        have = {n.name for n in self.nodes}
        missing = [name for name in self.record.desired if name not in have]
        if not missing:
            return [], [], []
        added: list[NodeRecord] = []

        def ready(node: NodeRecord) -> None:
            added.append(node)
            self._node_ready(node)

        log.info("%s: making %s", self.name, ", ".join(missing))
        what = "new nodes" if self.nodes else "nodes"
        self.reporter.begin("nodes", f"{what} ({self.record.spec.provider})", len(missing))
        try:
            await self.provider.create_nodes(missing, ready, existing=list(self.nodes), hosts=hosts)
            self._save_ready_nodes()
            self.reporter.end("nodes")
            added.sort(key=node_order)  # ready in any order; reported in the record's
            checks = await self.prepare(plugins, added) if prepare else []
            reports: list[PluginReport] = []
            if join:
                results = await each_node(added, lambda node: self.run_hooks(plugins, "on_add_node", node))
                reports = [r for node in added for r in results[node.name]]
        except BaseException:
            if join:  # a running cluster goes back to what it was; a start is undone by its caller
                self.record.desired = [n for n in self.record.desired if n not in missing]
                await self.release(added, plugins)
            raise
        return added, checks, reports

    async def release(self, nodes: list[NodeRecord], plugins: list[Plugin], *, lost: bool = False) -> None:
        """Take ``nodes`` out of the cluster: ``on_remove_node`` in reverse plugin
        order, stop whatever they still run (by pid), release them, drop them from
        the record.  Every step runs even if an earlier one failed; the first
        failure is raised (the nodes then stay in the record, for a later reconcile).
        ``lost``: the nodes are gone (the balancer replaces them): what cannot be done on
        them is logged, and they leave the record all the same."""
        errors: list[BaseException] = []
        self._lost = {n.name for n in nodes} if lost else set()
        try:
            for node in nodes:
                for plugin in reversed(plugins):
                    try:
                        await self.hook(plugin, "on_remove_node", node)
                    except PluginFailed as exc:
                        errors.append(exc)
        finally:
            self._lost = set()

        try:  # the provider then sweeps what is marked but unrecorded (a start killed mid-spawn)
            await each_node([n for n in nodes if n.processes], lambda n: self.stop_processes(n, list(n.processes)))
            await self.provider.terminate_nodes(nodes)
        except BaseException as exc:  # noqa: BLE001 - collected; the first is raised below
            errors.append(exc)
        if lost and all(isinstance(e, Exception) for e in errors):  # an interruption is never swallowed
            for error in errors:
                log.warning("%s: %s is lost; it leaves the record all the same: %s", self.name,
                            ", ".join(n.name for n in nodes), error)  # fmt: skip
            errors = []
        if not errors:
            names = {n.name for n in nodes}
            self.record.nodes = [n for n in self.record.nodes if n.name not in names]
            self.save()
        for later in errors[1:]:
            log.warning("%s: releasing %s also failed: %s", self.name, ", ".join(n.name for n in nodes), later)
        if errors:
            raise errors[0]

    async def teardown(self, plugins: list[Plugin]) -> list[str]:
        """Undo everything: plugins' ``on_shutdown`` (reverse order), then an empty node set
        (every recorded process stopped by pid, every node released), then the record.

        A plugin's failure does not stop the rest (it is returned as a warning); a
        process that cannot be stopped (or a node that cannot be released) keeps the
        record, marked ``failed``, so that ``terminate`` can try again.
        """
        self.record.status = "stopping"
        self.save()
        warnings: list[str] = []
        for plugin in reversed(plugins):
            try:
                await self.hook(plugin, "on_shutdown")
            except PluginFailed as exc:
                warnings.append(str(exc))
        self.record.desired = []
        try:
            await self.reconcile([])
            await self.provider.release_cluster()
        except BaseException as exc:
            self.record.status = "failed"
            self.record.error = str(exc)
            self.save()
            raise
        finally:
            await self.close()
        self.store.delete(self.name)
        return warnings
