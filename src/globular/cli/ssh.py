"""``globular sshmaster`` and ``globular sshnode``: a shell, or a command, on a node."""

from __future__ import annotations

import click

from globular.cli.render import output, output_option
from globular.client.nodeshell import open_shell, run_on_node
from globular.errors import BadInput


@click.command(context_settings={"ignore_unknown_options": True}, short_help="A shell, or a command, on the master.")
@click.option("-u", "--user", help="Log in as USER (default: the cluster's ssh user).")
@output_option
@click.argument("name")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def sshmaster(ctx: click.Context, user: str | None, name: str, command: tuple[str, ...]) -> None:
    """Open a shell on the master of cluster NAME, or run COMMAND there.

    Uses the cluster's ssh key, port and known_hosts; on a local cluster, a
    shell in the master's folder.  Exits with COMMAND's exit status; with
    --output json (COMMAND needed), its output and status as one document.
    """
    _node_shell(ctx, name, "master", user, command)


@click.command(context_settings={"ignore_unknown_options": True}, short_help="A shell, or a command, on a node.")
@click.option("-u", "--user", help="Log in as USER (default: the cluster's ssh user).")
@output_option
@click.argument("name")
@click.argument("node")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def sshnode(ctx: click.Context, user: str | None, name: str, node: str, command: tuple[str, ...]) -> None:
    """Open a shell on NODE (master, node001, ...) of cluster NAME, or run COMMAND there.

    Exits with COMMAND's exit status; with --output json (COMMAND needed), its
    output and status as one document."""
    _node_shell(ctx, name, node, user, command)


def _node_shell(ctx: click.Context, name: str, node: str, user: str | None, command: tuple[str, ...]) -> None:
    out = output(ctx)
    if not out.json:
        ctx.exit(open_shell(name, node, user=user, command=" ".join(command) or None))
    if not command:
        raise BadInput("with --output json, give a COMMAND to run (an interactive shell is not a document)")
    done = run_on_node(name, node, user=user, command=" ".join(command))
    out.result(done, ok=done.returncode == 0, text=lambda: None)
    ctx.exit(done.returncode)
