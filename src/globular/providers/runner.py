"""A runner does work on one node: commands, files, and process control built on them (start
detached, check, stop by pid), the same for every provider.  Part of the provider interface
(:mod:`globular.providers.base`, which names these too)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shlex
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from globular import node
from globular.errors import CommandError, GlobularError, NodeError
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


@dataclass(frozen=True)
class NodeShell:
    """A shell on a node, or a command run there, as a program run here: its ``argv``, the
    folder it starts in and its environment (None: this process's)."""

    argv: list[str]
    cwd: str | None = None
    env: dict[str, str] | None = None


class Runner(ABC):
    """Does work on one node."""

    # this machine reaches the node's addresses as they are (the node is this machine, or a
    # Slurm job's node seen from the login node); else :meth:`forward_port` reaches them
    direct: ClassVar[bool] = True

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
        (at ``local_port`` when one is asked for and forwarding is needed), until :meth:`close`.

        A :attr:`direct` runner's nodes need no forwarding (this default); the others tunnel
        through their connection (SSH) or relay through the node programs
        (:class:`~globular.providers.exec_runner.ExecRunner`).
        """
        return host, port

    async def port_refuses(self, host: str, port: int) -> str | None:
        """Why a connection to ``host:port``, as the node sees it, is refused there (nothing
        listens: the far end's reason, as ``Connection refused``), or None when it is accepted or
        this runner cannot tell: what a client told "no answer" through a forwarded port asks
        (its local end always accepts)."""
        return None

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
        remove, on the way, what killed transfers left there (:func:`globular.node.transfer.stale_part`)."""
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
