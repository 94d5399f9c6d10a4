"""Files in and out of a running cluster: ``globular put`` / ``get``, ``Cluster.put`` / ``get``.

``put`` sends files and folders to every node at once (or to the nodes named); ``get`` brings
a file or folder back from the master (or the nodes named: each node's copy under
``LOCAL/<node>/``).  A relative REMOTE is relative to the engines' working folder on each node
(the plugins say which: :meth:`~globular.plugins.base.Plugin.working_folder`), so what you put
is where your engines' ``open("data.csv")`` looks.  REMOTE (for ``put``) and LOCAL (for ``get``)
are folders, made if missing; what is copied goes inside, by its own name, as ``cp -r`` does.

Only what changed is sent: a file whose size and modification time (to the second) match is
left alone, or whose SHA-256 matches with ``checksum``.  Each file goes to a temporary name
beside its own and is renamed once whole: an interrupted copy never leaves a file that looks
complete.  The runner decides how bytes travel (SFTP on the node's SSH connection, a plain
copy for local nodes, the job's helper on Slurm).  Links out of the tree and special files
(fifos, sockets, devices) are refused by name, as is any received name that climbs out (``..``).
"""

from __future__ import annotations

import asyncio
import os
import posixpath
import stat
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from globular.errors import BadInput, FileFailed, GlobularError, NodeError, NodeFailures
from globular.fanout import each_node
from globular.node.transfer import sweep_parts
from globular.paths import globular_home, landed_mode
from globular.providers.base import Runner
from globular.registry import make_provider, resolve_plugin
from globular.reporting import NullReporter, Reporter
from globular.results import size_text
from globular.state import ClusterRecord, NodeRecord, StateStore


@dataclass
class NodeTransfer:
    """What one node's copy did."""

    node: str
    target: str  # where the files went: a folder on the node (put), or here (get)
    sent: int = 0  # files copied
    skipped: int = 0  # files already there, unchanged
    bytes: int = 0
    seconds: float = 0.0
    files: list[str] = field(default_factory=list)  # the files copied, relative to target
    present: list[str] = field(default_factory=list)  # get: every file the source holds, relative to target
    source: str = ""  # get: the file or folder copied, on the node (its real path)
    left_out: list[str] = field(default_factory=list)  # get: what the source holds and was not copied, "rel (why)"


@dataclass(frozen=True)
class LocalFile:
    path: Path
    rel: str  # where it goes, relative to REMOTE
    size: int
    mtime: int
    mode: int = 0o644  # get: the node's permission bits (what lands here is landed_mode of them)


def local_files(sources: Sequence[Path]) -> list[LocalFile]:
    """The files ``sources`` name, each with the name it has under REMOTE; BadInput names a
    source that is missing, a link out of its folder, or a special file."""
    found: dict[str, LocalFile] = {}

    def add(path: Path, rel: str) -> None:
        try:
            st = path.stat()
        except OSError as exc:
            raise FileFailed("read", path, exc) from None
        if not stat.S_ISREG(st.st_mode):
            raise BadInput(f"{path}: not a regular file (a fifo, socket or device): refused")
        if rel in found:
            raise BadInput(f"{path} and {found[rel].path} would both be {rel}")
        found[rel] = LocalFile(path, rel, st.st_size, int(st.st_mtime))

    for named in sources:
        source = Path(named).expanduser()
        if not source.exists():
            raise BadInput(f"{source}: no such file or folder")
        if not source.is_dir():
            add(source, source.name)
            continue
        top = source.resolve()
        own_name = Path(os.path.abspath(source)).name or top.name  # a link named: its own name, as cp -r keeps it
        for folder, dirs, files in os.walk(source, onerror=_unreadable):
            dirs.sort()
            for name in [*sorted(files), *(d for d in dirs if Path(folder, d).is_symlink())]:
                path = Path(folder, name)
                rel = f"{own_name}/{path.relative_to(source).as_posix()}"
                if path.is_symlink():
                    target = path.resolve()
                    if not target.is_relative_to(top):
                        raise BadInput(f"{path}: a link out of {source} (to {os.readlink(path)}): refused")
                    if target.is_dir():
                        continue  # its files are sent where they are in the tree
                add(path, rel)
    return sorted(found.values(), key=lambda f: f.rel)


def _unreadable(exc: OSError) -> None:
    """A folder ``put`` cannot list: named, never silently left out."""
    raise FileFailed("read", exc.filename, exc)


def safe_rel(rel: str, where: str) -> str:
    """``rel`` if it stays inside the folder it is relative to (a name a node sent back)."""
    parts = PurePosixPath(rel).parts
    if not parts or PurePosixPath(rel).is_absolute() or ".." in parts:
        raise NodeError(where, f"refusing the name {rel!r}: it would be written outside the folder")
    return rel


def remote_base(record: ClusterRecord, remote: str) -> Callable[[NodeRecord], str]:
    """Where ``remote`` is on each node: as it is when absolute (or ``~``), else inside the
    engines' working folder there (the first plugin's that names one, else the node's folder).
    The plugins are made once, not once a node."""
    if posixpath.isabs(remote) or remote == "~" or remote.startswith("~/"):
        return lambda node: remote
    plugins = [resolve_plugin(spec.setup_class)[1].from_spec(spec) for spec in record.spec.plugins]

    def base(node: NodeRecord) -> str:
        folder = next((f for f in (p.working_folder(node) for p in plugins) if f), None)
        return posixpath.join(folder or node.workdir, remote)

    return base


def _nodes(record: ClusterRecord, names: Sequence[str] | None, default: list[NodeRecord]) -> list[NodeRecord]:
    return [record.node(n) for n in dict.fromkeys(names)] if names else default


async def _same(runner: Runner, wanted: list[tuple[LocalFile, str]]) -> set[str]:
    """Which of ``wanted`` (a local file, its path there) have the same SHA-256 on the node."""
    import hashlib

    if not wanted:
        return set()
    theirs = await runner.sha256([remote for _, remote in wanted])

    def digest(path: Path) -> str:
        h = hashlib.sha256()
        with path.open("rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        return h.hexdigest()

    return {f.rel for f, remote in wanted if theirs.get(remote) == await asyncio.to_thread(digest, f.path)}


async def _copy_each(
    done: NodeTransfer,
    files: list[LocalFile],
    copy: Callable[[LocalFile, Callable[[int], None]], Awaitable[None]],
    reporter: Reporter,
    key: str,
    label: str,
) -> None:
    """Copy ``files`` in turn with ``copy`` (given a progress callback), as one progress bar of
    their bytes, counting each in ``done`` as it lands."""
    if not files:
        return
    reporter.begin(key, label, sum(f.size for f in files))
    try:
        for f in files:
            await copy(f, lambda n: reporter.advance(key, n))
            done.sent, done.bytes = done.sent + 1, done.bytes + f.size
            done.files.append(f.rel)
    finally:
        reporter.end(key)


async def put(
    name: str,
    sources: Sequence[str | Path],
    remote: str = ".",
    *,
    nodes: Sequence[str] | None = None,
    checksum: bool = False,
    home: Path | None = None,
    reporter: Reporter | None = None,
) -> list[NodeTransfer]:
    """Copy ``sources`` into folder ``remote`` of every node of cluster ``name`` (or ``nodes``)."""
    home = home or globular_home()
    reporter = reporter or NullReporter()
    record = StateStore(home).get(name)
    targets = _nodes(record, nodes, record.nodes)
    files = local_files([Path(s) for s in sources])
    where = remote_base(record, remote)
    provider = make_provider(record.spec, cluster=record.name, home=home)

    async def one(node: NodeRecord) -> NodeTransfer:
        started = time.monotonic()
        runner = provider.runner(node)
        listing = await runner.tree(where(node))
        if listing["kind"] == "file":
            raise NodeError(node.name, f"{listing['root']} is a file: the place to put into must be a folder")
        root, there = listing["root"], listing["files"]
        done = NodeTransfer(node.name, root)
        maybe = [f for f in files if (t := there.get(f.rel)) and t[0] == f.size and (checksum or t[1] == f.mtime)]
        if checksum:  # the same size: the same only if the SHA-256 says so
            unchanged = await _same(runner, [(f, posixpath.join(root, f.rel)) for f in maybe])
        else:
            unchanged = {f.rel for f in maybe}
        send = [f for f in files if f.rel not in unchanged]
        done.skipped = len(files) - len(send)

        async def upload(f: LocalFile, progress: Callable[[int], None]) -> None:
            await runner.upload(f.path, posixpath.join(root, f.rel), progress)

        await _copy_each(done, send, upload, reporter, f"put:{node.name}", f"{node.name}: bytes sent")
        done.seconds = round(time.monotonic() - started, 3)
        return done

    try:
        results = await each_node(targets, one)
    finally:
        await provider.close()
    return [results[n.name] for n in targets]


async def get(
    name: str,
    remote: str,
    local: str | Path = ".",
    *,
    nodes: Sequence[str] | None = None,
    checksum: bool = False,
    home: Path | None = None,
    reporter: Reporter | None = None,
) -> list[NodeTransfer]:
    """Copy file or folder ``remote`` of the master (or of ``nodes``: each under ``local/<node>/``)
    into folder ``local``."""
    home = home or globular_home()
    record = StateStore(home).get(name)
    targets = _nodes(record, nodes, [record.master])
    provider = make_provider(record.spec, cluster=record.name, home=home)
    try:
        return await fetch(
            targets, provider.runner, remote_base(record, remote), Path(local),
            checksum=checksum, reporter=reporter,
        )  # fmt: skip
    finally:
        await provider.close()


class TooBig(GlobularError):
    """What would be copied is over the bound asked for (refused: exit 1, like any operation
    that could not be done; the user chooses what to copy)."""


Selection = Callable[[str, dict[str, Any]], tuple[dict[str, list[int]], list[str]]]
"""Given a node's name and its listing (:func:`globular.node.transfer.list_tree`): the files to
copy (rel -> [size, mtime, mode]) and what is left out, each ``"rel (why)"``; may raise
:class:`TooBig`.  The default refuses any link or special file, and the whole copy over ``max_bytes``."""


async def fetch(
    targets: list[NodeRecord],
    runner_of: Callable[[NodeRecord], Runner],
    remote_of: Callable[[NodeRecord], str],
    local: Path,
    *,
    checksum: bool = False,
    skip: Sequence[str] = (),
    hidden: bool = True,
    max_bytes: int | None = None,
    into_name: bool = True,
    select: Selection | None = None,
    envs: bool = True,
    reporter: Reporter | None = None,
) -> list[NodeTransfer]:
    """:func:`get` from ``targets``, through ``runner_of`` (a plugin's context's runners), of
    the file or folder ``remote_of(node)``.

    ``skip``: folder names left out; ``hidden=False``: dot-names left out; ``envs=False``: Python
    environments left out; ``max_bytes``: over it, :class:`TooBig` and nothing copied;
    ``into_name=False``: a folder's files go straight into ``local`` (not into ``local/<its
    name>/``); ``select``: what of the listing is copied (see :data:`Selection`)."""
    reporter = reporter or NullReporter()
    local = local.expanduser()
    if local.exists() and not local.is_dir():
        raise BadInput(f"{local} is a file: the place to get into must be a folder")

    async def one(node: NodeRecord) -> NodeTransfer:
        started = time.monotonic()
        runner = runner_of(node)
        listing = await runner.tree(remote_of(node), skip, hidden, envs)
        if listing["kind"] is None:
            raise NodeError(node.name, f"{listing['root']}: no such file or folder")
        files, left_out = (select or _whole(max_bytes))(node.name, listing)
        root = listing["root"]
        into = local / node.name if len(targets) > 1 else local
        if listing["kind"] == "dir":
            into = into / posixpath.basename(root.rstrip("/")) if into_name else into
            sources = {rel: posixpath.join(root, rel) for rel in files}
        else:
            sources = {posixpath.basename(root): root}
        if into.is_dir():  # what a get of the same, killed here, left
            await asyncio.to_thread(sweep_parts, str(into), None if listing["kind"] == "dir" else set(sources))
        done = NodeTransfer(node.name, str(into), present=sorted(sources), source=root, left_out=left_out)
        plan = []
        for rel, path in sorted(sources.items()):
            size, mtime, *mode = files[rel]  # a node program of before the mode: none
            mine = into / safe_rel(rel, node.name)
            same = mine.is_file() and mine.stat().st_size == size and (checksum or int(mine.stat().st_mtime) == mtime)
            plan.append((LocalFile(mine, rel, size, mtime, *mode), path, same))
        if checksum:
            unchanged = await _same(runner, [(f, path) for f, path, same in plan if same])
            plan = [(f, path, same and f.rel in unchanged) for f, path, same in plan]
        remote_path = {f.rel: path for f, path, _ in plan}
        done.skipped = sum(same for _, _, same in plan)

        async def download(f: LocalFile, progress: Callable[[int], None]) -> None:
            await runner.download(remote_path[f.rel], f.path, f.size, f.mtime, progress)
            os.chmod(f.path, landed_mode(f.mode))  # the node's bits: never setuid, setgid, sticky

        wanted = [f for f, _, same in plan if not same]
        await _copy_each(done, wanted, download, reporter, f"get:{node.name}", f"{node.name}: bytes received")
        done.seconds = round(time.monotonic() - started, 3)
        return done

    try:
        results = await each_node(targets, one)
    except NodeFailures as exc:
        too_big = [e for e in exc.failures.values() if isinstance(e, TooBig)]
        if too_big and len(exc.failures) == 1:
            raise too_big[0] from None  # the one reason, as it is: the user chooses
        raise
    return [results[n.name] for n in targets]


def _whole(max_bytes: int | None) -> Selection:
    """``get``'s rule: every file, or nothing (a link or a special file refused, by name; over ``max_bytes``)."""

    def select(node: str, listing: dict[str, Any]) -> tuple[dict[str, list[int]], list[str]]:
        refused = [*(f"{rel} (a link to {to})" for rel, to in listing["links"].items()), *listing["special"]]
        if refused:
            raise NodeError(node, "refused (links and special files are not copied): " + ", ".join(refused))
        total = sum(entry[0] for entry in listing["files"].values())
        if max_bytes is not None and total > max_bytes:
            raise TooBig(f"{node}: {listing['root']} holds {size_text(total)}, over the {size_text(max_bytes)} bound")
        return listing["files"], []

    return select


def summary(transfers: list[NodeTransfer]) -> dict[str, Any]:
    """Totals over the nodes, for a one-line report."""
    return {
        "nodes": len(transfers),
        "sent": sum(t.sent for t in transfers),
        "skipped": sum(t.skipped for t in transfers),
        "bytes": sum(t.bytes for t in transfers),
        "seconds": max((t.seconds for t in transfers), default=0.0),
    }
