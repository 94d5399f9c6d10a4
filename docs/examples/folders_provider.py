"""A provider in one file: each node is a folder under ``root`` on this machine.

Installed with an entry point in the ``globular.providers`` group::

    [project.entry-points."globular.providers"]
    folders = "folders_provider:FoldersProvider"

and used with ``provider = folders`` in a ``[cluster]`` section; ``root`` and ``cores`` are
its settings (``globular config reference`` lists them, type-checked like the built-ins').
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from pydantic import Field

from globular.providers.base import NodeProvider, Runner
from globular.providers.local import LocalRunner
from globular.spec import Settings
from globular.state import NodeRecord


class FoldersSettings(Settings):
    root: str = Field(description="the folder that holds a folder per node")
    cores: int = Field(default=1, ge=1, description="engines per node")


class FoldersProvider(NodeProvider):
    name = "folders"
    Settings = FoldersSettings
    settings: FoldersSettings

    @property
    def region(self) -> str:  # the connection file is ~/.globular/ipcluster/<cluster>-<region>.json
        return "folders"

    async def create_nodes(
        self,
        names: list[str],
        on_ready: Callable[[NodeRecord], None],
        *,
        existing: Sequence[NodeRecord] = (),
        hosts: list[str] | None = None,
    ) -> list[NodeRecord]:
        nodes = []
        for name in names:
            folder = Path(self.settings.root, self.cluster, name)
            folder.mkdir(parents=True, exist_ok=True)
            node = NodeRecord(
                name=name, address="127.0.0.1", workdir=str(folder), cores=self.settings.cores, python=sys.executable
            )
            on_ready(node)  # the node exists: recorded now, so a failure later still releases it
            nodes.append(node)
        return nodes

    async def terminate_nodes(self, nodes: list[NodeRecord]) -> None:
        # the node's processes were stopped by pid before this is called
        for node in nodes:
            shutil.rmtree(node.workdir, ignore_errors=True)

    def make_runner(self, node: NodeRecord) -> Runner:
        return LocalRunner(node)  # commands, files and processes on this machine
