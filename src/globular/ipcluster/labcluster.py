"""The Cluster class ipyparallel's ClusterManager (the JupyterLab panel) makes of a globular
cluster's cluster file (see :mod:`globular.ipcluster.labpanel`).  Imported by
ipyparallel only: globular itself never imports it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ipyparallel import Cluster
from ipyparallel.cluster.launcher import NotRunning

from globular.ipcluster.labpanel import panel_model
from globular.ipcluster.roles import DATA_KEY

GONE, UNREADABLE = "gone", "unreadable"


class _Managed:
    """Stands for the controller globular runs (ipyparallel's ClusterManager forgets a cached
    cluster only once it had a controller and is no longer running)."""

    state = "running"
    running = True


class GlobularCluster(Cluster):  # type: ignore[misc]
    """A globular cluster as ipyparallel's ClusterManager (the Lab panel) sees it."""

    globular_name = ""
    globular_home = ""

    @classmethod
    def from_dict(cls, d: dict[str, Any], **kwargs: Any) -> GlobularCluster:
        kwargs.setdefault("shutdown_atexit", False)
        info = d["cluster"]
        self = cls(profile_dir=info["profile_dir"], cluster_id=info["cluster_id"], **kwargs)
        self.globular_name = d["globular"]["name"]
        self.globular_home = d["globular"]["home"]
        record = self._record()
        if record == GONE:  # terminated elsewhere, or its record removed: forget the file
            if self.cluster_file:
                Path(self.cluster_file).unlink(missing_ok=True)
            raise NotRunning(f"globular cluster {self.globular_name} is gone")
        if record == UNREADABLE:  # being written, or damaged: not listed now, its file kept
            raise NotRunning(f"globular cluster {self.globular_name}: its record cannot be read now")
        if self._data() is None:  # still starting, or stopping
            raise NotRunning(f"globular cluster {self.globular_name} is {record.status}")
        self.controller = _Managed()
        return self

    def _record(self) -> Any:
        """The record; GONE when there is none (only then), UNREADABLE when it cannot be read."""
        from globular.errors import ClusterNotFound, GlobularError
        from globular.state import StateStore

        try:
            return StateStore(Path(self.globular_home)).get(self.globular_name)
        except ClusterNotFound:
            return GONE
        except (GlobularError, OSError, ValueError):
            return UNREADABLE

    def _data(self) -> dict[str, Any] | None:
        """IPCluster's part of the record while the cluster runs; None otherwise."""
        record = self._record()
        if record in (GONE, UNREADABLE) or record.status != "running":
            return None
        data: dict[str, Any] | None = record.plugin_data.get(DATA_KEY)
        return data

    def _is_running(self) -> bool:
        if self._record() == UNREADABLE:
            return True  # not known to have stopped: listed as it was
        return self._data() is not None

    def to_dict(self) -> dict[str, Any]:
        return panel_model(self.globular_name, self.globular_home, self.profile_dir, self._data())

    def _managed(self, what: str) -> Exception:
        """The refusal: an HTTP 409 with the message, which the panel shows (and Python raises)."""
        from tornado.web import HTTPError

        verb = "terminate" if what == "stop" else "start"
        message = f"cluster {self.globular_name} is managed by globular: {what} it with `globular {verb} {self.globular_name}`"
        return HTTPError(409, message.replace("%", "%%"))

    async def start_cluster(self, n: int | None = None) -> None:
        raise self._managed("start")

    async def stop_cluster(self) -> None:
        raise self._managed("stop")

    async def connect_client(self, **client_kwargs: Any) -> Any:
        import asyncio

        from globular.ipcluster.client import connect

        return await asyncio.to_thread(connect, self.globular_name, home=Path(self.globular_home))
