"""Notebooks kept when the cluster goes: the master's notebook folder copied home.

``terminate`` copies it before it releases anything (``globular notebook --save NAME`` does
the same on demand) into ``~/.globular/notebooks/<cluster>-<region>/<time>/``: what JupyterLab
shows (hidden names and ``.ipynb_checkpoints`` left out), the files of the last copy linked in
first so that only what changed travels (each copy is whole; unchanged files share their
bytes with the copy before, so every kept file is read-only: a copy is a snapshot, and an edit
in place could never change an older one).

The folder may be a whole home (``notebook_directory`` unset): what is kept is the notebooks
(``*.ipynb``) and the files beside them, the smallest first, up to ``notebook_save_limit``.
Left out, and named in the report: links and special files, Python environments (a folder
holding ``pyvenv.cfg`` or ``conda-meta``), and the files over the limit.  Only notebooks that
alone are over the limit stop terminate (nothing released; the user chooses).  On the local
provider the folder is this machine's already.
"""

from __future__ import annotations

import os
import shutil
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from globular.errors import GlobularError
from globular.ipcluster.notebook import notebook_folder
from globular.ipcluster.settings import IPClusterSettings
from globular.node.proc import pid_alive
from globular.providers.base import Runner
from globular.results import size_text
from globular.state import NodeRecord
from globular.transfer import Selection, TooBig, fetch


class NotebooksNotSaved(GlobularError):
    """The notebook folder could not be copied home: nothing was released."""


@dataclass
class SavedNotebooks:
    folder: Path  # the copy, here
    files: int  # files in it
    copied: int  # of them, sent this time (the rest were unchanged since the last copy)
    bytes: int
    source: str  # the master's folder
    left_out: list[str] = field(default_factory=list)  # what it holds and was not kept, "rel (why)"


def notebooks_home(home: Path, cluster: str, region: str) -> Path:
    return home / "notebooks" / f"{cluster}-{region}"


def keep_within(limit: int) -> Selection:
    """The notebooks, then the other files smallest first, up to ``limit`` bytes; links,
    special files, environments and what is over the limit left out (see the module's doc)."""

    def select(node: str, listing: dict[str, Any]) -> tuple[dict[str, list[int]], list[str]]:
        files: dict[str, list[int]] = listing["files"]
        left = [
            *(f"{rel} (a link to {to})" for rel, to in listing["links"].items()),
            *(f"{rel} (not a regular file)" for rel in listing["special"]),
            *(f"{rel}/ (a Python environment)" for rel in listing.get("envs", [])),
        ]
        notebooks = {rel: entry for rel, entry in files.items() if rel.endswith(".ipynb")}
        total = sum(entry[0] for entry in notebooks.values())
        if total > limit:
            raise TooBig(
                f"{node}: the notebooks of {listing['root']} alone hold {size_text(total)}, "
                f"over notebook_save_limit ({size_text(limit)})"
            )
        chosen = dict(notebooks)
        for rel, entry in sorted(
            ((r, e) for r, e in files.items() if r not in notebooks), key=lambda x: (x[1][0], x[0])
        ):
            if total + entry[0] <= limit:
                chosen[rel] = entry
                total += entry[0]
            else:
                left.append(f"{rel} ({size_text(entry[0])}: over notebook_save_limit)")
        return chosen, left

    return select


def _sweep(base: Path) -> None:
    """Copies of an earlier save that was killed (``kill -9``) before it could clean up."""
    for stale in base.glob(".*.part-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def _read_only(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            mode = stat.S_IMODE(path.stat().st_mode)
            if mode & 0o222:
                path.chmod(mode & ~0o222)


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


async def save_notebooks(
    cluster: str, region: str, master: NodeRecord, runner: Runner, settings: IPClusterSettings, home: Path
) -> SavedNotebooks:
    """Copy the master's notebook folder home (see the module's doc)."""
    base = notebooks_home(home, cluster, region)
    base.mkdir(parents=True, exist_ok=True, mode=0o700)
    _sweep(base)
    copies = sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    last = copies[-1] if copies else None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    part = base / f".{stamp}.part-{os.getpid()}"
    shutil.rmtree(part, ignore_errors=True)
    part.mkdir(mode=0o700)
    try:
        if last is not None:  # the last copy's files, linked: only what changed travels
            for rel in _files(last):
                (part / rel).parent.mkdir(parents=True, exist_ok=True)
                os.link(last / rel, part / rel)
        [done] = await fetch(
            [master], lambda node: runner, lambda node: notebook_folder(settings), part,
            skip=(".ipynb_checkpoints",), hidden=False, envs=False, into_name=False,
            select=keep_within(settings.notebook_save_limit),
        )  # fmt: skip
        present = set(done.present)
        for rel in _files(part) - present:  # gone from the master (or left out now): gone from this copy
            (part / rel).unlink()
        _read_only(part)
        if last is not None and done.sent == 0 and present == _files(last):
            shutil.rmtree(part)
            return SavedNotebooks(last, len(present), 0, 0, done.source, done.left_out)
        target = base / stamp
        suffix = 1
        while target.exists():
            suffix += 1
            target = base / f"{stamp}-{suffix}"
        os.replace(part, target)
        return SavedNotebooks(target, len(present), done.sent, done.bytes, done.source, done.left_out)
    finally:
        shutil.rmtree(part, ignore_errors=True)


def left_out_text(left: list[str], shown: int = 5) -> str:
    """``; left out: a (a link to /etc), b/ (a Python environment) and 3 more`` (empty: nothing)."""
    if not left:
        return ""
    more = f" and {len(left) - shown} more (--output json lists them)" if len(left) > shown else ""
    return "; left out: " + ", ".join(left[:shown]) + more


def not_saved(name: str, exc: GlobularError) -> NotebooksNotSaved:
    why = str(exc)
    return NotebooksNotSaved(
        f"the notebooks of {name} were not copied home: {why}; nothing was released. "
        f"`globular get {name} ...` what you need, or `globular terminate --discard-notebooks {name}` goes on without them"
    )


async def save_cluster_notebooks(name: str, home: Path) -> SavedNotebooks | None:
    """``globular notebook --save NAME``: the copy terminate makes, now (None: the folder is this
    machine's already: the local provider)."""
    from globular.registry import make_provider, resolve_plugin
    from globular.state import StateStore

    record = StateStore(home).get(name)
    settings = next(
        (spec.typed_settings(IPClusterSettings) for spec in record.spec.plugins
         if resolve_plugin(spec.setup_class)[1].Settings is IPClusterSettings),
        None,
    )  # fmt: skip
    if settings is None or not settings.enable_notebook:
        raise GlobularError(f"cluster {name!r} runs no notebook server (enable_notebook = true starts one)")
    provider = make_provider(record.spec, cluster=record.name, home=home)
    try:
        if not provider.remote_nodes:
            return None
        return await save_notebooks(
            record.name, record.region, record.master, provider.runner(record.master), settings, home
        )
    finally:
        await provider.close()
