"""Connecting to a running cluster's controller from this machine."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from globular.errors import GlobularError
from globular.paths import globular_home
from globular.plugins.ipcluster import DATA_KEY
from globular.plugins.ipcluster import connect as connect_file
from globular.state import StateStore

if TYPE_CHECKING:
    from ipyparallel import Client


def connection_file(name: str, *, home: Path | None = None) -> Path:
    """The client connection file of cluster ``name`` (0600, in ``~/.globular/ipcluster``)."""
    record = StateStore(home or globular_home()).get(name)
    data = record.plugin_data.get(DATA_KEY) or {}
    path = data.get("connection_file")
    if not path:
        raise GlobularError(f"cluster {name!r} has no IPython controller running (status: {record.status})")
    if not Path(path).exists():
        raise GlobularError(f"the connection file of cluster {name!r} is missing: {path}")
    return Path(path)


def connect(name: str, *, home: Path | None = None, timeout: float = 10.0) -> Client:
    """A ready ``ipyparallel.Client`` for cluster ``name``."""
    return connect_file(str(connection_file(name, home=home)), timeout=timeout)
