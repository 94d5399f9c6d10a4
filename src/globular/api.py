"""globular from Python: ``globular.Cluster`` and ``globular.connect``.

    import globular
    cluster = globular.Cluster.start("iptest", size=3)      # like `globular start -s 3 iptest`
    rc = cluster.connect()                                  # a ready ipyparallel.Client
    rc[:].map_sync(lambda x: x**30, range(8))
    cluster.add_nodes(2); cluster.remove_node("node002"); cluster.restart_engines()
    cluster.put("data/", "."); cluster.get("results", "here/")   # files in and out
    cluster.terminate()

    rc = globular.connect("iptest")   # from any process or notebook on the machine that started it

The methods block until done and work inside a running event loop too (Jupyter):
there they run on a thread of their own.  Progress goes to ``reporter`` (a
:class:`globular.reporting.Reporter`), silent by default.
"""

from __future__ import annotations

import builtins
from pathlib import Path
from typing import TYPE_CHECKING

from globular import operations
from globular.aio import run_sync as _run
from globular.paths import globular_home
from globular.state import ClusterRecord, StateStore

if TYPE_CHECKING:
    from ipyparallel import Client

    from globular.reporting import Reporter
    from globular.results import NodeCheck, PluginReport
    from globular.status import ClusterStatusReport
    from globular.transfer import NodeTransfer


def connect(name: str, *, home: Path | None = None, timeout: float = 10.0) -> Client:
    """A ready ``ipyparallel.Client`` for running cluster ``name`` (through SSH when the
    master is remote: globular's own connection, with the cluster's key and known_hosts)."""
    from globular.client.connect import connect as plugin_connect

    client: Client = plugin_connect(name, home=home, timeout=timeout)
    return client


class Cluster:
    """A running cluster, by name: what ``globular`` does from the command line, from Python."""

    def __init__(self, name: str, *, home: Path | None = None, reporter: Reporter | None = None):
        self.name = name
        self.home = Path(home) if home else globular_home()
        self.reporter = reporter
        self.record  # noqa: B018 - fails now (ClusterNotFound) if there is no such cluster

    def __repr__(self) -> str:
        record = self.record
        return f"<globular.Cluster {self.name!r} {record.status}, {len(record.nodes)} nodes, {record.spec.provider}>"

    @classmethod
    def start(
        cls,
        name: str,
        template: str | None = None,
        *,
        size: int | None = None,
        config: str | Path | None = None,
        home: Path | None = None,
        reporter: Reporter | None = None,
    ) -> Cluster:
        """Start cluster ``name`` from ``template`` of ``config`` (default: as the CLI finds them)."""
        from globular.config import Config

        spec = Config.load(config).cluster_spec(template, size)
        _run(operations.start(name, spec, home=home, reporter=reporter))
        return cls(name, home=home, reporter=reporter)

    @classmethod
    def list(cls, *, home: Path | None = None) -> builtins.list[Cluster]:
        records, _ = StateStore(Path(home) if home else globular_home()).list()
        return [cls(r.name, home=home) for r in records]

    @property
    def record(self) -> ClusterRecord:
        """The state record, read now."""
        return StateStore(self.home).get(self.name)

    @property
    def nodes(self) -> builtins.list[str]:
        return [n.name for n in self.record.nodes]

    def connect(self, timeout: float = 10.0) -> Client:
        return connect(self.name, home=self.home, timeout=timeout)

    def add_nodes(self, count: int = 1, *, hosts: builtins.list[str] | None = None) -> builtins.list[str]:
        """Add nodes; their engines join the running controller.  Returns the new nodes' names."""
        result = _run(operations.add_nodes(self.name, count, hosts=hosts, home=self.home, reporter=self.reporter))
        return result.nodes

    def remove_node(self, node: str) -> None:
        _run(operations.remove_node(self.name, node, home=self.home, reporter=self.reporter))

    def run_plugin(self, plugin: str) -> PluginReport | None:
        """Run ``plugin``'s ``run`` on the cluster, as ``globular runplugin PLUGIN NAME``: one of the
        cluster's own ``[plugin]`` sections, else a built-in one.  Its report, if it gives one."""
        from globular.config import Config

        spec = next((p for p in self.record.spec.plugins if p.name == plugin), None)
        spec = spec or Config.builtin().plugin_spec(plugin)
        return _run(operations.run_plugin(self.name, spec, home=self.home, reporter=self.reporter)).report

    def restart_engines(self) -> None:
        """Kill every engine and start new ones against the same controller: ``run_plugin`` of the
        built-in ipclusterrestart."""
        self.run_plugin("ipclusterrestart")

    def status(self) -> ClusterStatusReport:
        from globular.status import cluster_status

        return _run(cluster_status(self.record, self.home))

    def check(self) -> builtins.list[NodeCheck]:
        return _run(operations.check(self.name, home=self.home, reporter=self.reporter))

    def put(
        self, sources: str | Path | builtins.list[str | Path], remote: str = ".", *,
        nodes: builtins.list[str] | None = None, checksum: bool = False,
    ) -> builtins.list[NodeTransfer]:  # fmt: skip
        """Copy files and folders into folder ``remote`` of every node (``globular put``); a relative
        ``remote`` is relative to the engines' working folder.  What each node's copy did."""
        from globular import transfer

        listed = [sources] if isinstance(sources, (str, Path)) else sources
        return _run(transfer.put(self.name, listed, remote, nodes=nodes, checksum=checksum, home=self.home,
                                 reporter=self.reporter))  # fmt: skip

    def get(
        self, remote: str, local: str | Path = ".", *, nodes: builtins.list[str] | None = None, checksum: bool = False
    ) -> builtins.list[NodeTransfer]:
        """Copy ``remote`` of the master (or of ``nodes``, each under ``local/<node>/``) into ``local``."""
        from globular import transfer

        return _run(transfer.get(self.name, remote, local, nodes=nodes, checksum=checksum, home=self.home,
                                 reporter=self.reporter))  # fmt: skip

    def terminate(self, *, discard_notebooks: bool = False) -> None:
        """Stop everything and release the nodes; the master's notebooks are copied home first
        (``~/.globular/notebooks/``) unless ``discard_notebooks``."""
        _run(operations.terminate(self.name, discard=discard_notebooks, home=self.home, reporter=self.reporter))
