"""The provider interface: nodes come and go; a runner does work on one node.

A :class:`NodeProvider` creates, lists and terminates nodes.  A :class:`Runner`
runs commands and writes files on one node; process control (start detached,
check, stop by pid) is built on top of those two, the same for every provider.

The contract, for whoever writes one (a provider registers under the
``globular.providers`` entry point, as the built-ins do):

- **What a provider implements.** ``name``, ``Settings`` (a pydantic model: the keys
  of ``[cluster NAME]`` it reads), ``region`` (``local`` for this machine; where the
  nodes are otherwise: it names the connection file ``<cluster>-<region>.json``),
  :meth:`NodeProvider.create_nodes`, :meth:`NodeProvider.terminate_nodes` and
  :meth:`NodeProvider.make_runner`.  Everything else has a default.
- **A node is a record** (:class:`~globular.state.NodeRecord`) the provider fills in
  ``create_nodes``: ``address`` (where the other nodes reach it), ``workdir`` (its folder,
  made 0700), ``cores``, ``python``, and ``data`` for the provider's own fields.
- **How a node is reached** is its runner's: a :attr:`Runner.direct` runner's node addresses
  are reached from here as they are (the local provider, a Slurm job's compute node seen from
  the login node): clients connect to the controller as it is.  Any other runner forwards
  (:meth:`Runner.forward_port`): over SSH through globular's own connection, or through the
  node programs for a node entered by a command (:class:`~globular.providers.exec_runner.ExecRunner`:
  ``ip netns exec``, ``kubectl exec``; a provider says only that command).  ``login``
  (``"user@host:port"``) is only what ipyparallel's own ``Client`` reads from the connection
  file's ``ssh`` field.  ``remote_nodes`` says the nodes are other machines (traffic between
  them is encrypted by default).  :class:`globular.providers.ssh.RemoteProvider` is the base
  for machines reached by SSH (connecting with host keys checked, a node folder, its Python
  checked, a long-lived helper per node): the ssh and ec2 providers differ only in where the
  machines come from.
- **Asking a node.** :meth:`Runner.nodeproc` asks the node programs (:mod:`globular.node`,
  stdlib only, shipped as one source: :data:`NODE_SOURCE`) one question each; the default
  runs ``python -c NODE_SOURCE VERB`` per question.  A runner for machines further away
  subclasses :class:`globular.providers.helper.HelperRunner` and says only how the node's
  one long-lived helper starts (``start_helper``: SSH runs ``serve`` on a channel;
  a :class:`~globular.providers.helper.PipedHelperRunner` names a command run here, Slurm a
  ``relay`` in a job step); the base starts it on first use and again when it ended or the
  node's Python changed.  The verbs a node answers, whatever its provider, are
  :data:`globular.node.VERBS`: ``prepare`` (its folder, 0700), ``facts``/``node_facts``,
  ``spawn``/``alive``/``stop``/``sweep`` (processes, by pid and start time, and by mark),
  ``tree``/``chunk_read``/``chunk_write``/``sha256`` (files), ``remove_dir`` (a marked folder,
  when the node goes), ``env_*`` (its Python environment), ``free_ports``, ``addresses``,
  ``tail``/``logs``, ``read_json``/``write``; a provider answers them all by running the node
  programs there, and overrides a method only to do better (SFTP for files).  One more program
  is a stream, not a question: ``pipe`` relays one TCP connection as the node sees it over its
  stdin and stdout (an :class:`~globular.providers.exec_runner.ExecRunner` forwards ports with it).
- **Progress.** ``create_nodes`` calls ``on_ready(node)`` for each node as it is usable and
  ``self.on_step(node, step)`` as it reaches a step of :data:`globular.reporting.NODE_STEPS`
  (``provision``, ``ssh``; the later steps are the core's and the plugins'); a provider
  whose steps are named otherwise says so in ``node.data["step_names"]`` (Slurm: ``ssh`` is
  ``running``).  ``self.reporter`` takes bars for long waits (instances booting).
- **A node's failure** raises :class:`~globular.errors.NodeError` naming it (several:
  :class:`~globular.errors.NodeFailures`); whatever was made for the others is the
  caller's to release, through ``terminate_nodes``, which must also take nodes that were
  only half made.
- **Giving nodes back.** ``rents_machines`` (they cost while they exist) turns on
  idle release: :meth:`NodeProvider.release_commands` says what a node runs to give itself
  back (Slurm: ``scancel`` its job; EC2: power off); :meth:`NodeProvider.release_cluster`
  removes what the cluster shared (EC2's security group).
- **What a node must have** (ipyparallel, a packer's module) is the plugins' business:
  they ask in their preflight.  A provider never names them; with ``default_environment =
  "managed"`` globular builds each node's Python environment (``envs_dir``).
- **How a node is reached from here**, for every provider (the defaults fit nodes that are
  this machine): :meth:`NodeProvider.shell_argv` (a shell or a command on a node, for
  ``sshnode``/``sshmaster``), :meth:`Runner.forward_port` (a port as the node sees it, for
  ``globular.Client``, the notebook forward and ``top``), :meth:`Runner.port_refuses` (why
  nothing answers there), :meth:`NodeProvider.login_with` (a key given by the user).  No
  caller looks at the provider's class or parses ``login``.
- **Optional:** ``status`` (columns and problems for ``globular status``), ``login_key`` (the key the printed ``Client`` line
  names), ``discover`` (clusters found without a record), ``max_nodes``/``size_problem``
  (bounds checked before anything is recorded), ``config_values`` (keys read from other
  sections of the config, as EC2's ``[aws info]``), ``places_nodes`` (``addnode --host``),
  ``forget`` (what it keeps on this machine, for ``terminate --force``).
"""

from __future__ import annotations

import asyncio
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from globular.errors import BadInput, GlobularError
from globular.providers.runner import (
    CHUNK,
    NODE_SCRIPTS,
    NODE_SOURCE,
    CommandResult,
    NodeShell,
    ProcessSpec,
    Runner,
    StopResult,
    display,
    process_mark,
)
from globular.reporting import NullReporter, Reporter
from globular.spec import ClusterSpec, Settings
from globular.spec import Settings as SettingsModel
from globular.state import NodeRecord

__all__ = [
    "CHUNK", "NODE_SCRIPTS", "NODE_SOURCE", "CommandResult", "NodeProvider", "NodeShell", "ProcessSpec",
    "ProviderStatus", "Runner", "StopResult", "display", "process_mark",
]  # fmt: skip


@dataclass
class ProviderStatus:
    """What a provider adds to ``status`` and ``listclusters`` (Slurm: each node's job)."""

    node_columns: dict[str, dict[str, str]] = field(default_factory=dict)  # node -> column -> text
    node_problems: dict[str, str] = field(default_factory=dict)  # node -> what is wrong with it
    node_states: dict[str, str] = field(default_factory=dict)  # node -> its state, where a problem says
    warnings: list[str] = field(default_factory=list)  # the cluster works, but soon may not
    node_time_left: dict[str, float] = field(default_factory=dict)  # node -> seconds before the provider ends it


class NodeProvider(ABC):
    """Creates, lists and terminates nodes, and gives a runner per node."""

    name: ClassVar[str]
    Settings: ClassVar[type[Settings]] = Settings
    rents_machines: ClassVar[bool] = False  # nodes cost while they exist (ec2 instances, Slurm allocations)
    environments_outlive_nodes: ClassVar[bool] = True  # node environments stay on disk (not ec2's)
    # "managed": globular builds each node's Python environment (globular.environment);
    # "system": the node's Python must have everything already
    default_environment: ClassVar[str] = "system"
    # the nodes are other machines, reached over a network (traffic between them is encrypted by default)
    remote_nodes: ClassVar[bool] = False
    # ``addnode --host`` names where a node goes (ssh: a host; slurm: a compute node); a provider
    # that places its nodes itself is never handed ``hosts`` (the core refuses them, saying where
    # its nodes come from)
    places_nodes: ClassVar[bool] = False
    where_nodes_come_from: ClassVar[str] = "places its nodes itself"

    def __init__(self, spec: ClusterSpec, *, cluster: str, home: Path):
        self.spec = spec
        self.settings = spec.typed_provider_settings(self.Settings)
        self.cluster = cluster
        self.home = home
        self._runners: dict[str, Runner] = {}
        self.reporter: Reporter = NullReporter()  # the operation's progress; set by the cluster
        self.on_step: Callable[[NodeRecord, str], None] = lambda node, step: None  # a node reached a step

    def release_commands(self, node: NodeRecord) -> list[list[str]]:
        """How ``node`` gives itself back when it is idle (idle shutdown runs these on the node,
        in turn, until one succeeds): empty when it cannot, or need not (the default: machines
        that cost nothing while they exist).  A provider that rents machines says how."""
        return []

    def login_key(self) -> str | None:
        """The private key file this machine logs in to the nodes with, when the config names
        one (for the client line ``start`` prints); None for nodes reached without a login."""
        return None

    @classmethod
    def config_values(
        cls, values: Mapping[str, str], sections: Mapping[str, str], extra: Mapping[str, Mapping[str, str]]
    ) -> tuple[dict[str, str], dict[str, str]]:
        """A template's ``values`` with what the provider reads from other sections (ec2:
        ``[aws info]``, ``[key NAME]``) added, and ``sections`` with where each came from (new
        dicts: the arguments stay as they are); a problem is a :class:`ConfigError` naming its
        section and key."""
        return dict(values), dict(sections)

    @classmethod
    def effective_settings(cls, settings: SettingsModel, cluster_size: int) -> dict[str, str]:
        """What a cluster of ``cluster_size`` nodes will use, in words, for settings left unset
        whose value the provider decides here (``config show``; local: the cores per node)."""
        return {}

    @classmethod
    def default_cluster_size(cls, settings: SettingsModel) -> int:
        """Nodes to start when neither the config nor ``-s`` says."""
        return 2

    @classmethod
    def max_nodes(cls, settings: SettingsModel) -> int | None:
        """The most nodes one cluster may have (None: the provider says when it runs out)."""
        return None

    @classmethod
    def size_problem(cls, settings: SettingsModel, size: int) -> tuple[str, str] | None:
        """``(key, message)`` if ``size`` nodes cannot be made with ``settings`` (default: more
        than :meth:`max_nodes`)."""
        limit = cls.max_nodes(settings)
        if limit is not None and size > limit:
            return (
                "cluster_size",
                f"{size} nodes asked for; the {cls.name} provider runs at most {limit}{cls.limit_reason}",
            )
        return None

    limit_reason: ClassVar[str] = ""  # said after the limit: where it comes from

    def envs_dir(self) -> str:
        """Where node environments live on the nodes (``~`` is the node user's home)."""
        return str(self.home / "envs")

    @property
    @abstractmethod
    def region(self) -> str:
        """Where the nodes are: ``local`` for this machine, an AWS region for ec2."""

    @abstractmethod
    async def create_nodes(
        self,
        names: list[str],
        on_ready: Callable[[NodeRecord], None],
        *,
        existing: Sequence[NodeRecord] = (),
        hosts: list[str] | None = None,
    ) -> list[NodeRecord]:
        """Bring up nodes with these names; call ``on_ready`` as each becomes usable.

        ``existing`` are the cluster's nodes already there (the cluster will have
        ``len(existing) + len(names)`` nodes); ``hosts`` asks for
        particular machines (only given to a provider that :attr:`places_nodes`).
        A node handed to ``on_ready`` belongs to the caller, who releases it if
        anything fails; the provider releases what it made but did not hand over.
        Per-node failures are raised together as :class:`NodeFailures`.
        """

    @abstractmethod
    async def terminate_nodes(self, nodes: list[NodeRecord]) -> None:
        """Release the nodes.  Their recorded processes are stopped before this is called; a
        provider whose nodes outlive this (not a rented machine) first stops every process
        still marked with a node (``globular.node`` ``sweep``): a start killed between spawning a
        process and recording it leaves nothing behind."""

    @abstractmethod
    def make_runner(self, node: NodeRecord) -> Runner:
        """A new runner that does work on ``node``."""

    def runner(self, node: NodeRecord) -> Runner:
        """The runner of ``node`` (one per node, kept until :meth:`close`)."""
        if node.name not in self._runners:
            runner = self.make_runner(node)
            runner.mark = self.mark(node.name)
            self._runners[node.name] = runner
        return self._runners[node.name]

    def mark(self, node: str | None = None) -> str:
        """The GLOBULAR_MARK of the processes started on ``node`` of this cluster."""
        return process_mark(self.home, self.cluster, node)

    async def close(self) -> None:
        """Close every runner's connections, all at once (a Slurm node's relay step takes a
        moment to end)."""
        runners, self._runners = list(self._runners.values()), {}
        await asyncio.gather(*(runner.close() for runner in runners))

    async def release_cluster(self) -> None:
        """After the last node is released: remove whatever else the provider made for
        the cluster (ec2: stray instances, the security group).  Default: nothing."""

    def account(self) -> object | None:
        """What identifies the account :meth:`discover` searches (None: nothing to search)."""
        return None

    async def status(self, nodes: Sequence[NodeRecord]) -> ProviderStatus | None:
        """What the provider knows of ``nodes`` beyond their processes (default: nothing)."""
        return None

    def shell_argv(self, node: NodeRecord, command: str | None, user: str | None = None) -> NodeShell:
        """How ``globular sshnode`` opens a shell on ``node`` (or runs ``command`` there), run
        here: ``ssh`` with the cluster's key for machines reached by SSH, ``srun --pty`` for a
        Slurm job's node.  This default: the node is this machine, so the user's shell in the
        node's folder.  ``user`` (log in as): only providers that log in take it."""
        if self.remote_nodes:
            raise GlobularError(f"{node.name}: the {self.name} provider opens no shell on its nodes")
        if user:
            raise BadInput(f"{node.name} of {self.cluster!r} is a {self.name} node: it takes no --user")
        shell = os.environ.get("SHELL") or "/bin/sh"
        argv = [shell] if command is None else ["/bin/sh", "-c", command]
        env = dict(
            os.environ, IPYTHONDIR=f"{node.workdir}/.ipython", GLOBULAR_NODE=node.name, GLOBULAR_CLUSTER=self.cluster
        )
        return NodeShell(argv, cwd=node.workdir, env=env)

    @classmethod
    def forget(cls, home: Path, cluster: str) -> None:
        """Remove what this provider keeps on this machine (under ``home``) for ``cluster``,
        which is gone: ``terminate --force``, whose record may be unreadable, asks every
        provider (the local provider: its node folders).  Default: nothing."""

    def login_with(self, key: str) -> None:
        """Log in to the nodes with the private key file ``key`` instead of the configured one
        (``Client(path, sshkey=...)`` of a cluster's file).  Providers without a login ignore it."""

    async def discover(self) -> dict[str, list[NodeRecord]]:
        """Clusters this provider's account holds, whoever started them: name → nodes.
        Providers without such a record of their own return nothing."""
        return {}
