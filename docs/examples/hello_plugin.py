"""A plugin in one file: a ``globular hello`` command, and columns in ``status``.

Installed with entry points (the ``globular.plugins`` group names the plugin for
``setup_class``; ``globular.commands`` adds commands to the CLI)::

    [project.entry-points."globular.plugins"]
    hello = "hello_plugin:Hello"
    [project.entry-points."globular.commands"]
    hello = "hello_plugin:hello"
"""

from __future__ import annotations

import click

from globular.plugins.base import Plugin, PluginStatus, StatusView


@click.command()
@click.argument("name")
def hello(name: str) -> None:
    """Greet NAME."""
    click.echo(f"hello, {name}")


class Hello(Plugin):
    async def status(self, view: StatusView) -> PluginStatus | None:
        nodes = {n.name: {"wave": f"o/ {n.name}"} for n in view.record.nodes}
        return PluginStatus(columns={"greeting": "hi"}, node_columns=nodes, data={"greeted": len(nodes)})
