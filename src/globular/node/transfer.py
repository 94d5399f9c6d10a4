"""Files in and out of a node (``globular put`` / ``get``), the node's side: a folder's listing,
checksums, and a file written or read in chunks, for runners without a file channel of their
own (a Slurm job's helper; SSH nodes use SFTP, local nodes a plain copy).

A file being received is written to a temporary name beside it (``.NAME.part-XXXX``) and renamed
once whole: an interrupted transfer never leaves a file that looks complete.
"""

from __future__ import annotations

import os
import stat
from typing import Any

from globular.node.protocol import Refused, Request, verb

PART = ".part-"  # temporary names: .NAME.part-XXXXXXXX
STALE_PART = 600.0  # s: a temporary name untouched this long was left by a transfer that was killed


def part_name(path: str, tag: str) -> str:
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}{PART}{tag}")


ENV_MARKS = ("pyvenv.cfg", "conda-meta")  # a folder holding one of these is a Python environment


def stale_part(path: str, name: str, now: float) -> bool:
    """Whether ``path`` is a transfer's temporary file untouched for :data:`STALE_PART` (a live
    transfer writes its own all the time; ``kill -9`` of one leaves it for ever)."""
    if not (name.startswith(".") and PART in name):
        return False
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and now - st.st_mtime > STALE_PART


def remove_stale_part(path: str, name: str, now: float) -> bool:
    """Remove ``path`` if it is a stale temporary file (:func:`stale_part`); whether it went."""
    if not stale_part(path, name, now):
        return False
    try:
        os.unlink(path)
    except OSError:
        return False
    return True


def sweep_parts(root: str, only: set[str] | None = None) -> list[str]:
    """Remove the stale temporary files under ``root`` (see :func:`stale_part`), or only those
    of the files named ``only`` directly in it; what was removed."""
    import time

    removed, now = [], time.time()
    for folder, dirs, files in os.walk(root):
        if only is not None:
            dirs[:] = []
        for name in files:
            path = os.path.join(folder, name)
            if only is not None and not any(name.startswith(f".{mine}{PART}") for mine in only):
                continue
            if remove_stale_part(path, name, now):
                removed.append(os.path.relpath(path, root))
    return removed


def list_tree(
    root: str, skip: tuple[str, ...] = (), hidden: bool = True, envs: bool = True, sweep: bool = False
) -> dict[str, Any]:
    """What ``root`` holds, never following a link: ``{"root": real path, "kind": "dir" | "file" |
    None, "files": {rel: [size, mtime, mode]}, "links": {rel: target}, "special": [rel], "envs":
    [rel]}`` (``skip``: names of folders left out, as ``.ipynb_checkpoints``; ``hidden=False``:
    names starting with a dot left out, as JupyterLab hides them; ``envs=False``: Python
    environments (a venv, a conda install) left out and named in ``envs``; temporary names are
    always left out, and with ``sweep`` the stale ones met on the way removed: see
    :func:`stale_part`)."""
    import time

    now = time.time()
    root = os.path.abspath(os.path.expanduser(root))
    found: dict[str, Any] = {"root": root, "kind": None, "files": {}, "links": {}, "special": [], "envs": []}
    try:
        top = os.lstat(root)
    except FileNotFoundError:
        return found

    def note(rel: str, st: os.stat_result, path: str) -> None:
        if stat.S_ISREG(st.st_mode):
            found["files"][rel] = [st.st_size, int(st.st_mtime), stat.S_IMODE(st.st_mode)]
        elif stat.S_ISLNK(st.st_mode):
            found["links"][rel] = os.readlink(path)
        elif not stat.S_ISDIR(st.st_mode):
            found["special"].append(rel)

    if not stat.S_ISDIR(top.st_mode):
        found["kind"] = "file"
        note(os.path.basename(root), top, root)
        return found
    found["kind"] = "dir"
    for folder, dirs, files in os.walk(root):  # a link to a folder is listed, never entered
        kept = []
        for name in sorted(dirs):
            path = os.path.join(folder, name)
            if not hidden and name.startswith("."):
                continue
            if os.path.islink(path):
                note(os.path.relpath(path, root), os.lstat(path), path)
            elif name in skip:
                continue
            elif not envs and any(os.path.lexists(os.path.join(path, mark)) for mark in ENV_MARKS):
                found["envs"].append(os.path.relpath(path, root))
            else:
                kept.append(name)
        dirs[:] = kept
        for name in sorted(files):
            path = os.path.join(folder, name)
            if sweep:
                remove_stale_part(path, name, now)
            if name.startswith(".") and (PART in name or not hidden):
                continue  # a transfer's temporary name, or hidden
            note(os.path.relpath(path, root), os.lstat(path), path)
    return found


@verb(any_python=True)
def tree(req: Request) -> Any:
    """:func:`list_tree` of ``req["root"]`` (``~`` is the node user's home); with ``req["sweep"]``
    the stale temporary files of killed transfers it meets are removed in the same walk."""
    return list_tree(
        req["root"],
        tuple(req.get("skip", ())),
        bool(req.get("hidden", True)),
        bool(req.get("envs", True)),
        bool(req.get("sweep", False)),
    )


@verb(any_python=True)
def sha256(req: Request) -> Any:
    """The SHA-256 of each file of ``req["paths"]`` (None: not a file)."""
    import hashlib

    found: dict[str, str | None] = {}
    for path in req["paths"]:
        digest = hashlib.sha256()
        try:
            with open(os.path.expanduser(path), "rb") as f:
                while block := f.read(1 << 20):
                    digest.update(block)
            found[path] = digest.hexdigest()
        except OSError:
            found[path] = None
    return found


@verb(any_python=True)
def chunk_write(req: Request) -> Any:
    """Write ``req["data"]`` (base64) at ``req["offset"]`` of the temporary name of ``req["path"]``
    (``req["tag"]``); with ``req["last"]``, give it ``req["mtime"]`` and its final name."""
    import base64

    path = os.path.expanduser(req["path"])
    if ".." in path.split(os.sep):
        raise Refused(f"refusing to write {path}: it climbs out with '..'")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    part = part_name(path, req["tag"])
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if req["offset"] == 0 else 0)
    fd = os.open(part, flags, 0o600)
    try:
        os.lseek(fd, int(req["offset"]), os.SEEK_SET)
        os.write(fd, base64.b64decode(req["data"]))
    finally:
        os.close(fd)
    if req.get("last"):
        os.chmod(part, int(req.get("mode", 0o644)))
        os.utime(part, (int(req["mtime"]), int(req["mtime"])))
        os.replace(part, path)
    return True


@verb(any_python=True)
def chunk_read(req: Request) -> Any:
    """``req["size"]`` bytes of ``req["path"]`` from ``req["offset"]``, base64."""
    import base64

    with open(os.path.expanduser(req["path"]), "rb") as f:
        f.seek(int(req["offset"]))
        return base64.b64encode(f.read(int(req["size"]))).decode()


@verb(any_python=True)
def discard_part(req: Request) -> Any:
    """Remove the temporary name of ``req["path"]`` (``req["tag"]``): a transfer that stopped."""
    try:
        os.unlink(part_name(os.path.expanduser(req["path"]), req["tag"]))
    except FileNotFoundError:
        return False
    return True
