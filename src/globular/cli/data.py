"""``globular put`` and ``globular get``: files in and out of a running cluster."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click
from rich.markup import escape

from globular.cli.group import Later, run
from globular.cli.render import Output, output, output_option
from globular.errors import BadInput
from globular.results import size_text

if TYPE_CHECKING:
    from globular import transfer
else:  # imported by the commands that use them, when they run
    transfer = Later("globular.transfer")


def _show(out: Output, verb: str, transfers: list[transfer.NodeTransfer]) -> None:
    def text() -> None:
        table = out.table("node", "where", "files " + verb, "unchanged", "bytes", "seconds")
        for t in transfers:
            table.add_row(t.node, escape(t.target), str(t.sent), str(t.skipped), size_text(t.bytes), f"{t.seconds:.1f}")
        out.print(table)

    out.result({"nodes": transfers, **transfer.summary(transfers)}, text=text)


@click.command(short_help="Copy files and folders to the nodes.")
@click.option(
    "-n", "--node", "nodes", multiple=True, metavar="NODE", help="Only to NODE (repeatable); default: every node."
)
@click.option("--checksum", is_flag=True, help="Compare SHA-256 rather than size and modification time.")
@click.argument("name")
@click.argument("paths", nargs=-1, required=True, metavar="LOCAL... REMOTE")
@output_option
@click.pass_context
def put(ctx: click.Context, nodes: tuple[str, ...], checksum: bool, name: str, paths: tuple[str, ...]) -> None:
    """Copy LOCAL files and folders into folder REMOTE of every node of cluster NAME.

    A relative REMOTE is relative to the engines' working folder, so what you
    put is where your engines' open("data.csv") looks (`.` is that folder).
    Each LOCAL goes inside REMOTE by its own name, as `cp -r` does; only what
    changed is sent (size and modification time, or --checksum); every file is
    renamed into place once whole, so an interrupted put never leaves a file
    that looks complete.  Links out of a folder and special files are refused.
    """
    if len(paths) < 2:
        raise BadInput("put needs LOCAL... and REMOTE: `globular put NAME data.csv .`")
    out = output(ctx)
    with out.reporter() as reporter:
        done = run(transfer.put(name, paths[:-1], paths[-1], nodes=nodes or None, checksum=checksum, reporter=reporter))
    _show(out, "sent", done)


@click.command(short_help="Copy a file or folder back from the nodes.")
@click.option("-n", "--node", "nodes", multiple=True, metavar="NODE", help="From NODE (repeatable; default: the master); "
              "from several nodes, each node's copy goes under LOCAL/NODE/.")  # fmt: skip
@click.option("--checksum", is_flag=True, help="Compare SHA-256 rather than size and modification time.")
@click.argument("name")
@click.argument("remote")
@click.argument("local", default=".")
@output_option
@click.pass_context
def get(ctx: click.Context, nodes: tuple[str, ...], checksum: bool, name: str, remote: str, local: str) -> None:
    """Copy file or folder REMOTE of cluster NAME's master (or --node) into folder LOCAL.

    A relative REMOTE is relative to the engines' working folder.  Only what
    changed is copied; names that would climb out of LOCAL, links and special
    files are refused.
    """
    out = output(ctx)
    with out.reporter() as reporter:
        done = run(transfer.get(name, remote, local, nodes=nodes or None, checksum=checksum, reporter=reporter))
    _show(out, "received", done)
