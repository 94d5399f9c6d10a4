"""ipyparallel's JupyterLab "Clusters" panel lists running globular clusters.

The panel (ipyparallel's server extension, :class:`ipyparallel.cluster.ClusterManager`)
finds clusters in the ``security/cluster-*.json`` files of the IPython profiles of the
Jupyter server's ``IPYTHONDIR``.  A file whose ``cluster.class`` names another Cluster class
is read by that class; globular writes ``cluster-globular-<name>.json`` naming
:class:`GlobularCluster`, which reads the cluster's globular record:

- the panel lists it as running, with its engine count, while the record says so;
- its "connect" code (``ipp.Cluster.from_file(...).connect_client_sync()``) gets
  ``globular.connect(name)``: a client through globular's own tunnel where the master is remote;
- stopping or starting it from the panel is refused with what to run instead: the cluster is
  managed by globular (a panel's Stop that killed processes behind globular's back would leave a
  record that lies).

Where: this machine's default profile (``$IPYTHONDIR``, else ``~/.ipython``), so a JupyterLab
here lists the clusters globular runs; and, for a local provider's master (this machine,
globular's own Python), the master's profile, so the notebook globular starts lists its own
cluster.  A remote master's notebook does not list it (globular is not installed there);
``Client()`` in it connects as before.  The files go when the cluster does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from globular.ipcluster.roles import DATA_KEY, local_ipython_dir, master_is_here, profile_dir
from globular.plugins.base import PluginContext

PREFIX = "globular-"  # the cluster_id of globular's clusters in ipyparallel's cluster files
CLASS = "globular.ipcluster.labcluster.GlobularCluster"  # imported by ipyparallel only


def default_profile() -> Path:
    """This machine's default IPython profile (``$IPYTHONDIR``, else ``~/.ipython``)."""
    return local_ipython_dir() / "profile_default"


def cluster_files(ctx: PluginContext) -> list[Path]:
    """Where ``ctx``'s cluster is written for the panel (see the module's doc)."""
    folders = [default_profile()]
    if master_is_here(ctx):
        folders.append(Path(profile_dir(ctx.master)))
    return [folder / "security" / f"cluster-{PREFIX}{ctx.name}.json" for folder in folders]


def write_cluster_files(ctx: PluginContext) -> None:
    import json

    from globular.paths import write_private

    for path in cluster_files(ctx):
        model = panel_model(ctx.name, str(ctx.home), str(path.parent.parent), ctx.plugin_data(DATA_KEY))
        write_private(path, json.dumps(model, indent=1).encode())


def remove_cluster_files(ctx: PluginContext) -> None:
    for path in cluster_files(ctx):
        path.unlink(missing_ok=True)


def panel_model(name: str, home: str, profile: str, data: dict[str, Any] | None) -> dict[str, Any]:
    """What ipyparallel's cluster file holds for globular cluster ``name`` (``data``: IPCluster's
    part of its record; None when it is not running)."""
    engines = int(data.get("engines", 0)) if data else 0
    model: dict[str, Any] = {
        "cluster": {"class": CLASS, "cluster_id": PREFIX + name, "profile_dir": profile, "n": engines},
        "globular": {"name": name, "home": home},
        "engines": {
            "class": "ipyparallel.cluster.launcher.LocalEngineSetLauncher",
            "sets": {"globular": {"n": engines}} if data else {},
        },
    }
    if data:
        model["controller"] = {
            "class": "ipyparallel.cluster.launcher.LocalControllerLauncher",
            "state": {"state": "running", "managed_by": "globular", "connection_file": data.get("connection_file")},
        }
    return model
