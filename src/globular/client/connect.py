"""A client for a running cluster, from the plugin that started its service.

The core names no plugin: it asks each plugin of the cluster's spec, in order, through
:meth:`globular.plugins.base.Plugin.client_for`; ipcluster answers with a ready
``globular.Client`` (ipyparallel's, tunnelled with the CURVE keys when the master is remote).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from globular.errors import GlobularError
from globular.paths import globular_home
from globular.registry import plugin_classes, resolve_plugin
from globular.state import StateStore


def connect(name: str, *, home: Path | None = None, timeout: float = 10.0) -> Any:
    """A ready client for running cluster ``name`` (an ``ipyparallel.Client`` for ipcluster)."""
    home = home or globular_home()
    record = StateStore(home).get(name)
    for spec in record.spec.plugins:
        _, cls = resolve_plugin(spec.setup_class)
        client = cls.client_for(record, home, timeout)
        if client is not None:
            return client
    raise GlobularError(
        f"cluster {name!r} runs no plugin that makes a client (its plugins: "
        f"{', '.join(p.name for p in record.spec.plugins) or 'none'})"
    )


def client_class() -> type:
    """The client class of the installed plugins (``globular.Client``: ipcluster's)."""
    for cls in plugin_classes():
        found = cls.client_class()
        if found is not None:
            return found
    raise ImportError("no installed globular plugin provides a Client (is globular's ipcluster plugin installed?)")
