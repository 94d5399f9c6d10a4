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
- **How a node is reached**, said by ``login``: ``None`` means this machine reaches the
  node's addresses directly (the local provider, a Slurm job's compute node seen from the
  login node): clients connect to the controller as it is.  ``"user@host:port"`` means it
  is reached over SSH: clients tunnel through the runner's :meth:`Runner.forward_port`
  (globular's own connection), and ``Client(path)`` reads the login from the connection
  file.  ``remote_nodes`` says the nodes are other machines (traffic between them is
  encrypted by default).  :class:`globular.providers.ssh.RemoteProvider` is the base for
  machines reached by SSH (connecting with host keys checked, a node folder, its Python
  checked, a long-lived helper per node): the ssh and ec2 providers differ only in where the
  machines come from.
- **Asking a node.** :meth:`Runner.nodeproc` asks the node programs (:mod:`globular.node`,
  stdlib only, shipped as one source: :data:`NODE_SOURCE`) one question each; the default
  runs ``python -c NODE_SOURCE VERB`` per question.  A runner for machines further away
  subclasses :class:`globular.providers.helper.HelperRunner` and says only how the node's
  one long-lived helper starts (``start_helper``: SSH runs ``serve`` on a channel, Slurm a
  ``relay`` in a job step); the base starts it on first use and again when it ended or the
  node's Python changed.
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
- **Optional:** ``status`` (columns and problems for ``globular status``), ``shell_argv``
  (how ``sshnode`` opens a shell), ``login_key`` (the key the printed ``Client`` line
  names), ``discover`` (clusters found without a record), ``max_nodes``/``size_problem``
  (bounds checked before anything is recorded), ``config_values`` (keys read from other
  sections of the config, as EC2's ``[aws info]``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shlex
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from globular import node
from globular.errors import CommandError, GlobularError, NodeError
from globular.reporting import NullReporter, Reporter
from globular.spec import ClusterSpec, Settings
from globular.spec import Settings as SettingsModel
from globular.state import NodeRecord, ProcessRecord

NODE_SOURCE = node.SOURCE  # the node programs, joined: run as ``python -c NODE_SOURCE VERB``
# scripts sent to the nodes as ``python -c SOURCE``: shown by module name in messages
NODE_SCRIPTS = {NODE_SOURCE: "globular.node"}


@dataclass(frozen=True)
class CommandResult:
    returncode: int
    stdout: str
    stderr: str


@dataclass
class ProcessSpec:
    """A process to start on a node."""

    argv: list[str]
    log: str
    role: str
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    ident: str | None = None  # kept in its record as given (an engine's id), never parsed back


@dataclass
class ProviderStatus:
    """What a provider adds to ``status`` and ``listclusters`` (Slurm: each node's job)."""

    node_columns: dict[str, dict[str, str]] = field(default_factory=dict)  # node -> column -> text
    node_problems: dict[str, str] = field(default_factory=dict)  # node -> what is wrong with it
    node_states: dict[str, str] = field(default_factory=dict)  # node -> its state, where a problem says
    warnings: list[str] = field(default_factory=list)  # the cluster works, but soon may not


@dataclass(frozen=True)
class StopResult:
    stopped: int
    killed: int
    remaining: list[ProcessRecord]


def process_mark(home: Path, cluster: str, node: str | None = None) -> str:
    """What every process globular starts for ``cluster`` carries as GLOBULAR_MARK in its
    environment: ``<home id>/<cluster>/<node>`` (without a node: the prefix of every node's).
    The home id keeps clusters of the same name under other globular homes apart."""
    home_id = hashlib.sha256(str(home.resolve()).encode()).hexdigest()[:12]
    return f"{home_id}/{cluster}" + (f"/{node}" if node else "")


CHUNK = 1 << 20  # bytes per request when files go through the node programs


def display(argv: list[str]) -> str:
    """A command for messages; the process-control script is shown by name."""
    if len(argv) >= 3 and argv[1] == "-c" and argv[2] in NODE_SCRIPTS:
        argv = [argv[0], "-m", NODE_SCRIPTS[argv[2]], *argv[3:]]
    return shlex.join(argv)


class Runner(ABC):
    """Does work on one node."""

    def __init__(self, node: NodeRecord):
        self.node = node
        self.mark: str | None = None  # GLOBULAR_MARK of the processes it starts (set by its provider)

    @abstractmethod
    async def run(
        self, argv: list[str], *, input: bytes | None = None, timeout: float | None = 60.0, check: bool = True
    ) -> CommandResult:
        """Run ``argv`` on the node; with ``check``, a non-zero exit raises CommandError."""

    @abstractmethod
    async def write_file(self, path: str, data: bytes, mode: int = 0o600) -> None:
        """Write ``data`` to ``path`` on the node (atomically, with ``mode``)."""

    async def close(self) -> None:
        """Release connections."""

    async def forward_port(self, host: str, port: int, local_port: int = 0) -> tuple[str, int]:
        """An address on this machine that reaches ``host:port`` as the node sees it
        (at ``local_port`` when one is asked for and forwarding is needed).

        Local nodes need no forwarding; remote runners tunnel through their connection.
        """
        return host, port

    # -- process control, the same on every provider ---------------------

    async def nodeproc(self, verb: str, request: dict[str, Any], timeout: float = 60.0) -> Any:
        """Ask the node's ``globular.node`` (standard library only, sent with the command)
        to do ``verb`` with ``request``; its JSON answer."""
        result = await self.run(
            [self.node.python, "-c", NODE_SOURCE, verb], input=json.dumps(request).encode(), timeout=timeout
        )
        try:
            return json.loads(result.stdout)
        except ValueError:
            raise CommandError(
                self.node.name, f"globular.node {verb}", result.returncode, result.stderr, result.stdout
            ) from None

    async def spawn(self, specs: list[ProcessSpec]) -> list[ProcessRecord]:
        """Start detached processes; they outlive this runner and the globular process."""
        if not specs:
            return []
        request = {
            "procs": [{"argv": s.argv, "log": s.log, "env": s.env, "cwd": s.cwd} for s in specs],
            "mark": self.mark,
        }
        spawning = asyncio.ensure_future(self.nodeproc("spawn", request))
        try:
            started = await asyncio.shield(spawning)
        except asyncio.CancelledError:
            # interrupted while the node starts them: let it finish, and stop what it started
            # (the caller, cancelled, would never record them)
            started = await spawning
            procs = [
                ProcessRecord(pid=p["pid"], start=p["start"], role=s.role, ident=s.ident)
                for p, s in zip(started, specs)
            ]
            await self.stop(procs, timeout=5)
            raise
        return [
            ProcessRecord(pid=p["pid"], start=p["start"], role=s.role, log=s.log, ident=s.ident)
            for p, s in zip(started, specs)
        ]

    async def alive(self, procs: list[ProcessRecord]) -> list[bool]:
        if not procs:
            return []
        alive: list[bool] = await self.nodeproc("alive", {"procs": [p.model_dump() for p in procs]})
        return alive

    async def stop(self, procs: list[ProcessRecord], timeout: float = 10.0) -> StopResult:
        """SIGTERM each process group, SIGKILL after ``timeout`` s; returns what it did."""
        if not procs:
            return StopResult(0, 0, [])
        reply = await self.nodeproc(
            "stop", {"procs": [p.model_dump() for p in procs], "timeout": timeout}, timeout=timeout + 30
        )
        remaining = [ProcessRecord.model_validate(p) for p in reply["remaining"]]
        if remaining:
            pids = ", ".join(str(p.pid) for p in remaining)
            raise NodeError(self.node.name, f"processes {pids} survived SIGKILL")
        return StopResult(reply["stopped"], reply["killed"], remaining)

    # -- files in and out (``globular put`` / ``get``) ---------------------

    async def tree(
        self, root: str, skip: Sequence[str] = (), hidden: bool = True, envs: bool = True, sweep: bool = True
    ) -> dict[str, Any]:
        """What ``root`` holds on the node (:func:`globular.node.transfer.list_tree`); ``sweep``:
        first remove what killed transfers left there (:func:`globular.node.transfer.sweep_parts`)."""
        request = {"root": root, "skip": list(skip), "hidden": hidden, "envs": envs, "sweep": sweep}
        found: dict[str, Any] = await self.nodeproc("tree", request, timeout=120)
        return found

    async def upload(self, local: Path, remote: str, progress: Callable[[int], None]) -> None:
        """Copy file ``local`` to the absolute path ``remote`` on the node, under a temporary name
        renamed once whole, with ``local``'s mtime; ``progress(n)`` for every n bytes sent.  This
        default goes in chunks through the node programs (a Slurm job's helper); runners with a
        file channel of their own (SFTP) do better."""
        import base64
        import secrets

        st = local.stat()
        tag = secrets.token_hex(4)
        offset = 0
        try:
            with local.open("rb") as f:
                while True:
                    block = await asyncio.to_thread(f.read, CHUNK)
                    last = offset + len(block) >= st.st_size
                    request = {"path": remote, "tag": tag, "offset": offset, "data": base64.b64encode(block).decode(),
                               "last": last, "mtime": int(st.st_mtime), "mode": st.st_mode & 0o777}  # fmt: skip
                    await self.nodeproc("chunk_write", request, timeout=120)
                    offset += len(block)
                    progress(len(block))
                    if last:
                        return
        except BaseException:
            await asyncio.shield(self._discard(remote, tag))
            raise

    async def _discard(self, remote: str, tag: str) -> None:
        try:
            await self.nodeproc("discard_part", {"path": remote, "tag": tag}, timeout=30)
        except GlobularError:
            pass

    async def download(self, remote: str, local: Path, size: int, mtime: int, progress: Callable[[int], None]) -> None:
        """Copy file ``remote`` (``size`` bytes) of the node to ``local``, under a temporary name
        renamed once whole, with mtime ``mtime``."""
        import base64

        part = local.with_name(f".{local.name}.part-{os.getpid()}")
        local.parent.mkdir(parents=True, exist_ok=True)
        try:
            with part.open("wb") as f:
                offset = 0
                while offset < size:
                    request = {"path": remote, "offset": offset, "size": CHUNK}
                    data = base64.b64decode(await self.nodeproc("chunk_read", request, timeout=120))
                    if not data:
                        raise NodeError(self.node.name, f"{remote} shrank while it was read ({offset} of {size} bytes)")
                    await asyncio.to_thread(f.write, data)
                    offset += len(data)
                    progress(len(data))
            os.utime(part, (mtime, mtime))
            os.replace(part, local)
        finally:
            part.unlink(missing_ok=True)

    async def sha256(self, paths: list[str]) -> dict[str, str | None]:
        found: dict[str, str | None] = await self.nodeproc("sha256", {"paths": paths}, timeout=600)
        return found

    async def tail(self, path: str, nbytes: int = 4000) -> str:
        text: str = await self.nodeproc("tail", {"path": path, "bytes": nbytes})
        return text

    async def wait_files(self, paths: list[str], *, watch: list[ProcessRecord], timeout: float) -> dict[str, Any]:
        """Wait for JSON files to appear; fails with the log of a watched process that died."""
        reply = await self.nodeproc(
            "wait_files",
            {"files": paths, "watch": [p.model_dump() for p in watch], "timeout": timeout},
            timeout=timeout + 30,
        )
        if "files" in reply:
            files: dict[str, Any] = reply["files"]
            return files
        if "dead" in reply:
            dead = [p for p in watch if p.pid in {d["pid"] for d in reply["dead"]}]
            proc = dead[0] if dead else watch[0]
            log = await self.tail(proc.log) if proc.log else ""
            raise NodeError(self.node.name, f"{proc.role} (pid {proc.pid}) exited; its log ({proc.log}) ends:", log)
        names = ", ".join(paths)
        raise NodeError(self.node.name, f"timed out after {timeout:g}s waiting for {names}")


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

    def __init__(self, spec: ClusterSpec, *, cluster: str, home: Path):
        self.spec = spec
        self.settings = self.Settings.model_validate(spec.provider_settings)
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
        particular machines (providers that cannot place nodes refuse it).
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

    def shell_argv(self, node: NodeRecord, command: str | None) -> list[str] | None:
        """How ``globular sshnode`` opens a shell on ``node`` (or runs ``command`` there), if the
        provider has its own way (Slurm: ``srun --pty``); None: ssh, or a local shell."""
        return None

    async def discover(self) -> dict[str, list[NodeRecord]]:
        """Clusters this provider's account holds, whoever started them: name → nodes.
        Providers without such a record of their own return nothing."""
        return {}
