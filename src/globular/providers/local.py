"""The ``local`` provider: a node is a working directory plus processes on this machine.

Zero setup: the nodes use the Python that runs globular, address 127.0.0.1, and
a folder under ``~/.globular/local/<cluster>/<node>``.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import Field

from globular.errors import BadInput, CommandError, FileFailed
from globular.node import ANY_PYTHON, VERBS, Refused
from globular.node.proc import sweep
from globular.paths import landed_mode, private_dir, write_private
from globular.providers.base import CommandResult, NodeProvider, Runner, display
from globular.providers.here import run_for_node
from globular.spec import ProgramHere, Settings
from globular.spec import Settings as SettingsModel
from globular.state import NodeRecord

log = logging.getLogger(__name__)


OVERSUBSCRIBE = 8  # at most this many nodes, and engines per node, per core of this machine


def shared_cores(nodes: int) -> int:
    """Engines per node when cores_per_node is unset: this machine's cores shared by ``nodes``."""
    return max(1, (os.cpu_count() or 1) // max(1, nodes))


def local_limit() -> int:
    return OVERSUBSCRIBE * (os.cpu_count() or 1)


class LocalSettings(Settings):
    cores_per_node: int | None = Field(
        default=None, ge=1, description=f"engines per node (at most {OVERSUBSCRIBE} per core); default: cores / nodes"
    )
    python: ProgramHere = Field(
        default=None, description="interpreter for controller and engines; default: globular's own"
    )


def copy_whole(source: Path, target: Path, progress: Callable[[int], None], size: int | None = None) -> None:
    """Copy ``source`` to ``target`` under a temporary name renamed once whole, its mtime kept and
    its permission bits but setuid, setgid and sticky (then the umask's).  ``source`` is opened
    without following a link, must be a regular file once open (what was listed may have been
    swapped for a link or a FIFO since), and at most ``size`` bytes of it are read."""
    import secrets
    import stat

    try:
        fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise BadInput(f"{source}: refused, it is a link now (it was a file when listed)") from None
        raise FileFailed("read", source, exc) from None
    with os.fdopen(fd, "rb") as src:
        st = os.fstat(src.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise BadInput(f"{source}: refused, it is not a regular file now (it was when listed)")
        part = target.with_name(f".{target.name}.part-{secrets.token_hex(4)}")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            left = st.st_size if size is None else size
            with part.open("wb") as dst:
                while left > 0:
                    try:
                        block = src.read(min(1 << 20, left))
                    except OSError as exc:
                        raise FileFailed("read", source, exc) from None
                    if not block:
                        break
                    dst.write(block)
                    left -= len(block)
                    progress(len(block))
            os.chmod(part, landed_mode(stat.S_IMODE(st.st_mode)))
            os.utime(part, ns=(st.st_atime_ns, st.st_mtime_ns))
            os.replace(part, target)
        except OSError as exc:  # this side: a full disk, a folder not writable
            raise FileFailed("write", target, exc) from None
        finally:
            part.unlink(missing_ok=True)


class LocalRunner(Runner):
    async def run(
        self, argv: list[str], *, input: bytes | None = None, timeout: float | None = 60.0, check: bool = True
    ) -> CommandResult:
        shown = display(argv)
        log.debug("%s: %s", self.node.name, shown)
        # marked like every process globular starts: what it leaves behind is found by the mark
        mark = {"GLOBULAR_MARK": self.mark} if self.mark else None

        def cannot(exc: OSError) -> CommandError:
            return CommandError(self.node.name, shown, 127, exc.strerror or str(exc))

        return await run_for_node(self.node.name, argv, shown, cannot=cannot, input=input, timeout=timeout,
                                  check=check, cwd=self.node.workdir, env=mark)  # fmt: skip

    async def nodeproc(self, verb: str, request: dict[str, Any], timeout: float = 60.0) -> Any:
        """The node is this machine: a verb that any Python answers alike runs here, in a
        thread, instead of in an interpreter started for it (the same code, the same JSON)."""
        if verb not in ANY_PYTHON and os.path.realpath(self.node.python) != os.path.realpath(sys.executable):
            return await super().nodeproc(verb, request, timeout)
        log.debug("%s: nodeproc %s (in this process)", self.node.name, verb)
        call = VERBS[verb]
        try:
            async with asyncio.timeout(timeout):
                reply = await asyncio.to_thread(call, json.loads(json.dumps(request)))
        except Refused as exc:
            raise CommandError(self.node.name, f"globular.node {verb}", 3, str(exc)) from None
        except TimeoutError:
            raise CommandError(
                self.node.name, f"globular.node {verb}", None, f"no answer within {timeout:g}s"
            ) from None
        return json.loads(json.dumps(reply))

    async def upload(self, local: Path, remote: str, progress: Callable[[int], None]) -> None:
        """A plain copy (the node is this machine)."""
        await asyncio.to_thread(copy_whole, local, Path(remote).expanduser(), progress)

    async def download(self, remote: str, local: Path, size: int, mtime: int, progress: Callable[[int], None]) -> None:
        await asyncio.to_thread(copy_whole, Path(remote).expanduser(), local, progress, size)

    async def write_file(self, path: str, data: bytes, mode: int = 0o600) -> None:
        target = Path(self.node.workdir, path)
        write_private(target, data)
        os.chmod(target, mode)


class LocalProvider(NodeProvider):
    name = "local"
    where_nodes_come_from = "makes its nodes on this machine"
    Settings = LocalSettings
    settings: LocalSettings
    limit_reason = f" ({OVERSUBSCRIBE} per core here)"

    @property
    def region(self) -> str:
        return "local"

    @property
    def root(self) -> Path:
        return self.home / "local" / self.cluster

    @classmethod
    def forget(cls, home: Path, cluster: str) -> None:
        shutil.rmtree(home / "local" / cluster, ignore_errors=True)

    @classmethod
    def max_nodes(cls, settings: SettingsModel) -> int | None:
        return local_limit()

    @classmethod
    def size_problem(cls, settings: SettingsModel, size: int) -> tuple[str, str] | None:
        assert isinstance(settings, LocalSettings)
        limit = local_limit()
        if size > limit:
            return super().size_problem(settings, size)
        if settings.cores_per_node and settings.cores_per_node > limit:
            return (
                "cores_per_node",
                f"{settings.cores_per_node} engines per node; at most {limit} here ({OVERSUBSCRIBE} per core)",
            )
        return None

    def cores_per_node(self, nodes: int) -> int:
        """``cores_per_node``, else this machine's cores shared by the cluster's ``nodes``."""
        return self.settings.cores_per_node or shared_cores(nodes)

    @classmethod
    def effective_settings(cls, settings: SettingsModel, cluster_size: int) -> dict[str, str]:
        cores = os.cpu_count() or 1
        shared = f"{shared_cores(cluster_size)} (this machine's {cores} cores shared by {cluster_size} nodes)"
        return {"cores_per_node": shared, "python": sys.executable}

    async def create_nodes(
        self,
        names: list[str],
        on_ready: Callable[[NodeRecord], None],
        *,
        existing: Sequence[NodeRecord] = (),
        hosts: list[str] | None = None,
    ) -> list[NodeRecord]:
        nodes = []
        python = self.settings.python or sys.executable
        cores = self.cores_per_node(len(existing) + len(names))
        for name in names:
            workdir = private_dir(self.root / name)
            node = NodeRecord(name=name, address="127.0.0.1", workdir=str(workdir), cores=cores, python=python)
            nodes.append(node)
            self.on_step(node, "provision")
            on_ready(node)
            await asyncio.sleep(0)  # Ctrl-C and SIGTERM are heard between nodes
        return nodes

    async def terminate_nodes(self, nodes: list[NodeRecord]) -> None:
        for node in nodes:  # what a start killed between spawning and recording left (see NodeProvider)
            swept = await asyncio.to_thread(sweep, {"mark": self.mark(node.name)})
            if swept["remaining"]:
                raise CommandError(
                    node.name, "globular.node sweep", 3, f"processes {swept['remaining']} survived SIGKILL"
                )
        for node in nodes:
            workdir = self.root / node.name
            if str(workdir) == node.workdir:  # never remove anything outside our own folder
                shutil.rmtree(workdir, ignore_errors=True)
        try:
            self.root.rmdir()
        except OSError:
            pass

    def make_runner(self, node: NodeRecord) -> Runner:
        return LocalRunner(node)
