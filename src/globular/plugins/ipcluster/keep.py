"""Notebooks kept when the cluster goes: the master's notebook folder copied home.

``terminate`` copies it before it releases anything (``globular notebook --save NAME`` does
the same on demand) into ``~/.globular/notebooks/<cluster>-<region>/<time>/``: what JupyterLab
shows (hidden names and ``.ipynb_checkpoints`` left out), the files of the last copy linked in
first so that only what changed travels (each copy is whole; unchanged files share their
bytes with the copy before).  Over ``notebook_save_limit`` nothing is copied and terminate
refuses, saying the size.  On the local provider the folder is this machine's already.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from globular.errors import GlobularError
from globular.plugins.ipcluster.notebook import notebook_folder
from globular.plugins.ipcluster.settings import IPClusterSettings
from globular.providers.base import Runner
from globular.state import NodeRecord
from globular.transfer import TooBig, fetch


class NotebooksNotSaved(GlobularError):
    """The notebook folder could not be copied home: nothing was released."""


@dataclass
class SavedNotebooks:
    folder: Path  # the copy, here
    files: int  # files in it
    copied: int  # of them, sent this time (the rest were unchanged since the last copy)
    bytes: int
    source: str  # the master's folder


def notebooks_home(home: Path, cluster: str, region: str) -> Path:
    return home / "notebooks" / f"{cluster}-{region}"


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


async def save_notebooks(
    cluster: str, region: str, master: NodeRecord, runner: Runner, settings: IPClusterSettings, home: Path
) -> SavedNotebooks:
    """Copy the master's notebook folder home (see the module's doc)."""
    base = notebooks_home(home, cluster, region)
    base.mkdir(parents=True, exist_ok=True, mode=0o700)
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
            skip=(".ipynb_checkpoints",), hidden=False, max_bytes=settings.notebook_save_limit, into_name=False,
        )  # fmt: skip
        present = set(done.present)
        for rel in _files(part) - present:  # gone from the master: gone from this copy
            (part / rel).unlink()
        if last is not None and done.sent == 0 and present == _files(last):
            shutil.rmtree(part)
            return SavedNotebooks(last, len(present), 0, 0, done.source)
        target = base / stamp
        suffix = 1
        while target.exists():
            suffix += 1
            target = base / f"{stamp}-{suffix}"
        os.replace(part, target)
        return SavedNotebooks(target, len(present), done.sent, done.bytes, done.source)
    finally:
        shutil.rmtree(part, ignore_errors=True)


def not_saved(name: str, exc: GlobularError) -> NotebooksNotSaved:
    why = str(exc)
    if isinstance(exc, TooBig):
        why += " (notebook_save_limit)"
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
        (IPClusterSettings.model_validate(spec.settings) for spec in record.spec.plugins
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
