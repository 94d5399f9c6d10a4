"""Plugins used by the tests (importable through PYTHONPATH=tests)."""

from __future__ import annotations

from globular.plugins.base import Plugin
from globular.spec import Settings


class FailSettings(Settings):
    node: str = "node001"
    message: str = "boom"


class FailOnNode(Plugin):
    """Runs a command that fails on one node, like a broken setup script."""

    Settings = FailSettings

    async def run(self, cluster):
        node = cluster.record.node(self.settings.node)
        await cluster.runner(node).run(["sh", "-c", f"echo {self.settings.message} >&2; exit 3"])


class FailOnAdd(Plugin):
    """Fine at start; fails when a node joins (after ipcluster started its engines)."""

    async def on_add_node(self, cluster, node):
        await cluster.runner(node).run(["sh", "-c", "echo cannot-mount-scratch >&2; exit 5"])
