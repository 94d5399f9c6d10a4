"""The plugin interface: what a plugin gets (:class:`PluginContext`) and the hooks it may implement.

A plugin is a class named by ``setup_class`` in a ``[plugin NAME]`` section (or
registered under the ``globular.plugins`` entry point group, as the built-ins
are).  Its typed settings are the rest of that section, validated by its
``Settings`` model.  Hooks run in the order of the cluster's ``plugins =`` list;
removal and shutdown run in reverse order.

Everything a hook may touch is in :class:`PluginContext`; nothing else of the
core is part of the plugin API.  A plugin can also add status columns
(:meth:`Plugin.status`), offer a client for the clusters it runs (:meth:`Plugin.client_for`,
what ``globular.connect`` returns) and add CLI commands: click commands named under the
``globular.commands`` entry point group (see :mod:`globular.cli`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

from globular.errors import GlobularError
from globular.providers.base import Runner, StopResult
from globular.reporting import Reporter
from globular.results import NodeCheck, PluginReport
from globular.spec import PluginSpec, Settings
from globular.spec import Settings as SettingsModel
from globular.state import ClusterRecord, NodeRecord, ProcessRecord

# the plugin API: what plugins import from here (NodeCheck and PluginReport live in globular.results)
__all__ = ["NodeCheck", "Plugin", "PluginContext", "PluginReport", "PluginStatus", "PreflightFailed", "StatusView"]


class PluginContext(Protocol):
    """The cluster as a plugin's hook sees it.

    Nodes and their processes are records (:class:`~globular.state.NodeRecord`);
    work on a node goes through its :class:`~globular.providers.base.Runner`.
    Every process a plugin starts must be recorded with :meth:`track` as soon as
    it runs, so that ``terminate`` can always stop it by pid.
    """

    @property
    def name(self) -> str:
        """The cluster's name."""

    @property
    def region(self) -> str:
        """Where its nodes are (``local``, ``ssh``, an AWS region)."""

    @property
    def home(self) -> Path:
        """globular's folder on this machine (``~/.globular``)."""

    @property
    def reporter(self) -> Reporter:
        """Progress for the user."""

    @property
    def nodes(self) -> list[NodeRecord]:
        """The cluster's nodes, the master first."""

    @property
    def master(self) -> NodeRecord: ...

    @property
    def remote_nodes(self) -> bool:
        """The nodes are other machines, reached over a network."""

    @property
    def rents_machines(self) -> bool:
        """The nodes cost money while they exist (ec2): release them when idle."""

    def release_commands(self, node: NodeRecord) -> list[list[str]]:
        """How ``node`` gives itself back when idle (commands run there in turn until one
        succeeds; empty: it cannot, or need not).  The provider decides."""

    @property
    def login_key(self) -> str | None:
        """The private key file this machine logs in to the nodes with, when the config names one."""

    def runner(self, node: NodeRecord) -> Runner:
        """Runs commands, writes files, starts and stops processes on ``node``."""

    def track(self, node: NodeRecord, procs: list[ProcessRecord]) -> None:
        """Record processes started on ``node`` (saved at once)."""

    async def stop_processes(self, node: NodeRecord, procs: list[ProcessRecord], timeout: float = 10.0) -> StopResult:
        """Stop ``procs`` by pid (SIGTERM, then SIGKILL) and forget them."""

    def plugin_data(self, key: str) -> dict[str, Any]:
        """A plugin's own part of the state record (saved with :meth:`save`)."""

    def settings_of(self, plugin: type[Plugin]) -> SettingsModel | None:
        """The settings of the cluster's ``plugin`` (None: the cluster does not use it)."""

    def save(self) -> None:
        """Write the state record now."""

    def node_step(self, node: NodeRecord, step: str) -> None:
        """``node`` reached ``step`` (``globular status`` shows it; see reporting.NODE_STEPS)."""

    def is_lost(self, node: NodeRecord) -> bool:
        """``node`` leaves because it is lost (its provider ended it, it stopped answering: the
        balancer replaces it): nothing on it answers, so ``on_remove_node`` should not wait on it."""


class PreflightFailed(GlobularError):
    """One line per node that cannot run what the plugins start; nothing was started."""

    def __init__(self, checks: list[NodeCheck]):
        self.checks = checks
        lines = [f"{c.node}: {'; '.join(c.problems)}" for c in checks if c.problems]
        super().__init__("preflight failed, nothing was started:\n" + "\n".join(lines))


@dataclass
class StatusView:
    """What a plugin's :meth:`Plugin.status` sees: the record, and each node's answer to one
    round trip (``facts``: which recorded processes are alive, in record order, as
    ``alive``; children per supervisor-like process as ``children``; ``load``), or the
    error it gave.  ``deep``: ``globular status`` (ask services too) rather than
    ``listclusters`` (be quick)."""

    record: ClusterRecord
    facts: dict[str, dict[str, Any] | BaseException]
    runner: Callable[[NodeRecord], Runner]
    home: Path
    deep: bool

    def alive(self, node: NodeRecord, role: str) -> int | None:
        """How many of ``node``'s recorded processes of ``role`` run (None: the node did not answer)."""
        facts = self.facts.get(node.name)
        if not isinstance(facts, dict):
            return None
        return sum(1 for p, up in zip(node.processes, facts["alive"]) if p.role == role and up)

    def children(self, node: NodeRecord, role: str) -> int | None:
        """How many live children ``node``'s recorded processes of ``role`` have (a supervisor's engines)."""
        facts = self.facts.get(node.name)
        if not isinstance(facts, dict):
            return None
        children: list[int] = facts["children"]
        return sum(n for p, n in zip(node.processes, children) if p.role == role)


@dataclass
class PluginStatus:
    """A plugin's part of a status: columns for people, data for programs, problems."""

    columns: dict[str, str] = field(default_factory=dict)  # cluster-wide: shown by status and listclusters
    data: dict[str, Any] = field(default_factory=dict)  # cluster-wide, in --output json
    node_columns: dict[str, dict[str, str]] = field(default_factory=dict)  # node -> column -> text
    node_data: dict[str, dict[str, Any]] = field(default_factory=dict)  # node -> key -> value
    node_states: dict[str, str] = field(default_factory=dict)  # node -> state that replaces its last step
    node_problems: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    condition: str | None = None  # listclusters' health, when the plugin knows better (idle shutdown)


@dataclass(frozen=True)
class NodeLoad:
    """One node's engines as the controller sees them."""

    engines: int  # registered
    busy: int  # with a task queued or running


@dataclass(frozen=True)
class ClusterLoad:
    """The controller's view, by node (engines it does not know of are left out)."""

    waiting: int  # tasks no engine has taken yet
    nodes: dict[str, NodeLoad] = field(default_factory=dict)
    # node -> its engines started there and alive or dead, but not registered (cut off from the
    # controller past its heartbeat window, frozen, or killed): :meth:`Plugin.on_restart_node`
    unregistered: dict[str, int] = field(default_factory=dict)

    @property
    def engines(self) -> int:
        return sum(n.engines for n in self.nodes.values())

    @property
    def busy(self) -> int:
        return sum(n.busy for n in self.nodes.values())


class LoadWatcher(Protocol):
    """A plugin's view of its cluster's work, for the balancer (:mod:`globular.balance`):
    ipcluster's asks the controller.  Made by :meth:`Plugin.load_watcher`."""

    async def observe(self) -> ClusterLoad:
        """The load now (raises :class:`~globular.errors.GlobularError` when it cannot be known)."""
        ...

    async def drain(self, nodes: list[str], timeout: float, window: float | None = None) -> list[str]:
        """Make sure no work of the user's is on ``nodes``' engines or can land there, waiting
        at most ``timeout`` s; the nodes that are (the others keep working as they were).
        ``window``: how long the drain may keep trying across calls (default ``timeout``)."""
        ...

    async def close(self) -> None: ...


class Plugin:
    """Base class; every hook is optional."""

    Settings: ClassVar[type[Settings]] = Settings
    # settings kept out of the state record (passwords): the plugin gets them at start only
    secret_settings: ClassVar[frozenset[str]] = frozenset()
    # the plugin only works where globular makes the node environment (it installs packages)
    needs_managed_environment: ClassVar[bool] = False
    # modules the hooks import in globular's own process (ipcluster: ipyparallel, for its
    # client): ``start`` and ``addnode`` import them in a thread while the nodes are made
    warm_modules: ClassVar[tuple[str, ...]] = ()

    def __init__(self, name: str, settings: SettingsModel):
        self.name = name
        self.settings = settings

    @classmethod
    def from_spec(cls, spec: PluginSpec) -> Plugin:
        return cls(spec.name, spec.typed_settings(cls.Settings))

    @classmethod
    def effective_settings(cls, settings: SettingsModel, remote_nodes: bool) -> dict[str, str]:
        """What the cluster will use, in words, for settings left unset whose value the plugin
        decides from the cluster (``config show``); ``remote_nodes``: the provider's nodes are
        other machines.  ipcluster: ``encryption`` is curve there."""
        return {}

    @classmethod
    def redacted(cls, spec: PluginSpec) -> PluginSpec:
        """``spec`` with secret settings replaced, for the state record."""
        hidden = {k: "(not kept)" for k in cls.secret_settings if spec.settings.get(k) is not None}
        return spec.model_copy(update={"settings": {**spec.settings, **hidden}}) if hidden else spec

    async def before_terminate(self, ctx: PluginContext, discard: bool) -> PluginReport | None:
        """Before ``terminate`` stops or releases anything: keep what the user would lose
        (ipcluster copies the notebooks home).  Raising stops the terminate, nothing released;
        ``discard`` (``--discard-notebooks``, ``--force``): the user chose to lose it."""
        return None

    def working_folder(self, node: NodeRecord) -> str | None:
        """Where this plugin's processes on ``node`` work (``~`` is the node user's home); a
        relative path of ``globular put``/``get`` is relative to it.  None: the node's folder."""
        return None

    def facts_request(self, record: ClusterRecord, deep: bool) -> dict[str, Any]:
        """What to ask every node besides, in status's one round trip (keys of the ``facts``
        request of :mod:`globular.node.facts`; ipcluster: ``{"gpus": True}``).  The answers are
        in :attr:`StatusView.facts`.  ``deep``: ``globular status``, not ``listclusters``."""
        return {}

    @classmethod
    def client_for(cls, record: ClusterRecord, home: Path, timeout: float) -> Any | None:
        """A ready client for running cluster ``record`` if this plugin started what it talks to
        (``globular.connect``, ``Cluster.connect``, ``globular shell``); None: not this plugin's."""
        return None

    @classmethod
    def client_class(cls) -> type | None:
        """The client class users import as ``globular.Client`` (None: this plugin has none)."""
        return None

    @classmethod
    def forget(cls, home: Path, cluster: str) -> None:
        """Remove what this plugin keeps on this machine (under ``home``) for ``cluster``, which
        is gone: ``terminate --force``, whose record may be unreadable, asks every plugin.
        Default: nothing."""

    def node_packages(self, node: NodeRecord) -> list[str]:
        """Requirements (``name``, ``name==1.2``, ``name>=2``) this plugin needs in ``node``'s
        Python environment; globular installs them where it manages the environment."""
        return []

    async def preflight(self, ctx: PluginContext, nodes: list[NodeRecord]) -> list[NodeCheck]:
        """Before anything starts on ``nodes``: can they run what this plugin starts?
        One :class:`NodeCheck` per node (none: nothing to check)."""
        return []

    async def run(self, ctx: PluginContext) -> PluginReport | None:
        """The cluster's nodes are up (at start, or on ``runplugin``)."""
        return None

    async def on_add_node(self, ctx: PluginContext, node: NodeRecord) -> PluginReport | None:
        """``node`` joined a running cluster."""
        return None

    async def on_remove_node(self, ctx: PluginContext, node: NodeRecord) -> None:
        """``node`` is about to leave the cluster."""

    async def on_restart_node(self, ctx: PluginContext, node: NodeRecord) -> PluginReport | None:
        """Some of ``node``'s work left the cluster while the node stays and answers (an engine
        cut off from its controller past the heartbeat window, frozen, or killed): start that
        again in place, leaving what still works untouched.  The balancer calls it
        (:func:`globular.operations.restart_node`) for a node its :class:`LoadWatcher` lists in
        :attr:`ClusterLoad.unregistered`; None: nothing was left to restart."""
        return None

    async def on_shutdown(self, ctx: PluginContext) -> None:
        """The cluster is being terminated (or a start failed); undo ``run``.

        Must cope with a ``run`` that stopped half-way.
        """

    async def status(self, view: StatusView) -> PluginStatus | None:
        """Columns and problems for ``globular status`` and ``listclusters``."""
        return None

    @classmethod
    def load_watcher(cls, record: ClusterRecord, home: Path) -> LoadWatcher | None:
        """What the balancer watches on running cluster ``record`` (None: this plugin runs no
        work the balancer could follow)."""
        return None
