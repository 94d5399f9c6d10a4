"""The commands that change a running cluster: ``addnode`` and ``removenode`` (its node set,
brought to the record's desired set by one reconcile), ``runplugin`` (a plugin's ``run``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click
from rich.markup import escape

from globular.cli.group import Later, load_config, run
from globular.cli.render import output, output_option
from globular.paths import globular_home

if TYPE_CHECKING:
    from globular import operations, state
else:  # imported by the commands that use them, when they run
    operations, state = Later("globular.operations"), Later("globular.state")


@click.command(short_help="Add nodes; their engines join live.")
@click.option(
    "-n",
    "--num-nodes",
    "count",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="How many nodes to add.",
)
@click.option(
    "-H",
    "--host",
    "hosts",
    multiple=True,
    metavar="[USER@]HOST[:PORT]",
    help="Where to put a new node (repeat for several): a host (ssh provider; default: the next unused "
    "of node_hosts) or a Slurm node (slurm; default: the one Slurm picks).",
)
@click.argument("name")
@output_option
@click.pass_context
def addnode(ctx: click.Context, count: int, hosts: tuple[str, ...], name: str) -> None:
    """Add nodes to running cluster NAME.

    New nodes run every plugin's on_add_node: with ipcluster, their engines
    register with the running controller, and clients already connected see
    them without reconnecting.  If anything fails, the new nodes are removed.
    """
    out = output(ctx)
    with out.reporter() as reporter:
        result = run(operations.add_nodes(name, count, hosts=list(hosts) or None, reporter=reporter))
    out.warnings(result.checks)

    def text() -> None:
        out.say(f"Added {escape(', '.join(result.nodes))} to [bold]{escape(name)}[/] in {result.elapsed:.1f} s")
        for report in result.reports:
            out.report(report)

    out.result({"name": name, "nodes": result.nodes, "elapsed": result.elapsed, "reports": result.reports}, text=text)


@click.command(short_help="Remove a node; its engines leave live.")
@click.argument("name")
@click.argument("node")
@output_option
@click.pass_context
def removenode(ctx: click.Context, name: str, node: str) -> None:
    """Remove NODE (e.g. node002) from running cluster NAME.

    Every plugin's on_remove_node runs (in reverse order; ipcluster shuts its
    engines down), its processes are stopped by pid, and the node is released.
    """
    out = output(ctx)
    with out.reporter() as reporter:
        result = run(operations.remove_node(name, node, reporter=reporter))
    out.result(
        {"name": name, "nodes": result.nodes, "elapsed": result.elapsed},
        text=lambda: out.say(f"Removed {escape(node)} from [bold]{escape(name)}[/] in {result.elapsed:.1f} s"),
    )


@click.command(short_help="Run a plugin (e.g. ipclusterrestart).")
@click.argument("plugin")
@click.argument("name")
@output_option
@click.pass_context
def runplugin(ctx: click.Context, plugin: str, name: str) -> None:
    """Run PLUGIN's `run` on cluster NAME (e.g. ipclusterrestart, ipclusterstop).

    PLUGIN is a [plugin PLUGIN] section of the config, or a built-in plugin.
    """
    out = output(ctx)
    record = state.StateStore(globular_home()).get(name)
    spec = next((p for p in record.spec.plugins if p.name == plugin), None)
    if spec is None:
        spec = load_config(ctx).plugin_spec(plugin)
    with out.reporter() as reporter:
        result = run(operations.run_plugin(name, spec, reporter=reporter))

    def text() -> None:
        out.say(f"Plugin [bold]{escape(plugin)}[/] ran on {escape(name)} in {result.elapsed:.1f} s")
        if result.report:
            out.report(result.report)

    out.result({"plugin": plugin, "name": name, "elapsed": result.elapsed, "report": result.report}, text=text)
