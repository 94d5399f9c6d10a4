"""Where IPCluster's things are: process roles, its part of the state record, a node's IPython folders."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from globular.errors import GlobularError
from globular.state import NodeRecord

if TYPE_CHECKING:
    from globular.plugins.base import PluginContext

CONTROLLER = "ipcontroller"
ENGINE = "ipengine"
SUPERVISOR = "engine-supervisor"  # restart_dead_engines: keeps a node's engines running
IDLE_WATCHER = "idle-watcher"  # idle_shutdown
DATA_KEY = "ipcluster"  # where IPCluster keeps its part of the state record


def ipython_dir(node: NodeRecord) -> str:
    return f"{node.workdir}/.ipython"


def profile_dir(node: NodeRecord) -> str:
    return f"{ipython_dir(node)}/profile_default"


def local_ipython_dir() -> Path:
    """This machine's IPython folder, as IPython finds it (``$IPYTHONDIR``, else ``~/.ipython``),
    without importing IPython (ipyparallel's import may be under way in another thread)."""
    return Path(os.environ.get("IPYTHONDIR") or "~/.ipython").expanduser()


def local_profile(name: str) -> Path:
    """The folder of profile ``name`` here: a folder, or ``profile_NAME`` in IPython's folder."""
    folder = Path(name).expanduser()
    if folder.is_dir():
        return folder
    if "/" in name:
        raise GlobularError(f"profile = {name}: no such folder")
    folder = local_ipython_dir() / f"profile_{name}"
    if not folder.is_dir():
        raise GlobularError(f"profile = {name}: there is no {folder} (ipython profile create {name} makes one)")
    return folder


def master_is_here(ctx: PluginContext) -> bool:
    """The master is this machine (the local provider): its folders and this machine's are one,
    and what runs there finds globular and this machine's records."""
    return ctx.runner(ctx.master).direct and not ctx.remote_nodes
