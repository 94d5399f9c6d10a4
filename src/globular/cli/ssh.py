"""``globular sshmaster`` and ``globular sshnode``: a shell, or a command, on a node."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from globular.cli.group import Later
from globular.cli.render import output, output_option
from globular.errors import BadInput

if TYPE_CHECKING:
    from globular.client import nodeshell
else:  # imported by the commands that use it, when they run
    nodeshell = Later("globular.client.nodeshell")

# Everything after the cluster (and the node) is the remote command, its options included, as with
# `ssh HOST COMMAND`: globular's own options go before NAME.
REMOTE_COMMAND = {"ignore_unknown_options": True, "allow_interspersed_args": False}


def _remote_command(ctx: click.Context, param: click.Parameter, words: tuple[str, ...]) -> tuple[str, ...]:
    """COMMAND as given; one that starts with an option (``sshnode lab node002 -u root``) is
    globular's option in the wrong place, not a command: said at once (``--`` first runs it)."""
    if words and words[0].startswith("-") and words[0] != "--":
        before = "NAME NODE" if ctx.command.name == "sshnode" else "NAME"
        raise click.UsageError(
            f"{' '.join(words)!r} is not a command: everything after {before} is the command to run; "
            f"globular's options go before NAME (`globular {ctx.command.name} {words[0]} ... {before}`)",
            ctx,
        )
    return words[1:] if words[:1] == ("--",) else words  # `-- ls -l`: the separator is not part of it


@click.command(context_settings=REMOTE_COMMAND, short_help="A shell, or a command, on the master.")
@click.option("-u", "--user", help="Log in as USER (default: the cluster's ssh user).")
@output_option
@click.argument("name")
@click.argument("command", nargs=-1, type=click.UNPROCESSED, callback=_remote_command)
@click.pass_context
def sshmaster(ctx: click.Context, user: str | None, name: str, command: tuple[str, ...]) -> None:
    """Open a shell on the master of cluster NAME, or run COMMAND there.

    Uses the cluster's ssh key, port and known_hosts; on a local cluster, a
    shell in the master's folder.  Exits with COMMAND's exit status; with
    --output json (COMMAND needed), its output and status as one document.

    Everything after NAME is COMMAND, its options included; globular's own
    options (-u, --output, -v) go before NAME:

    \b
    globular sshmaster lab ps -u root         runs `ps -u root` on the master
    globular sshmaster -u root lab ps aux     logs in as root, runs `ps aux`
    globular sshmaster --output json lab df -h
    """
    _node_shell(ctx, name, "master", user, command)


@click.command(context_settings=REMOTE_COMMAND, short_help="A shell, or a command, on a node.")
@click.option("-u", "--user", help="Log in as USER (default: the cluster's ssh user).")
@output_option
@click.argument("name")
@click.argument("node")
@click.argument("command", nargs=-1, type=click.UNPROCESSED, callback=_remote_command)
@click.pass_context
def sshnode(ctx: click.Context, user: str | None, name: str, node: str, command: tuple[str, ...]) -> None:
    """Open a shell on NODE (master, node001, ...) of cluster NAME, or run COMMAND there.

    Exits with COMMAND's exit status; with --output json (COMMAND needed), its
    output and status as one document.  Everything after NODE is COMMAND, its
    options included; globular's own options (-u, --output, -v) go before NAME:

    \b
    globular sshnode lab node001 df -h
    globular sshnode -u root lab node001 ls -la /tmp
    """
    _node_shell(ctx, name, node, user, command)


def _node_shell(ctx: click.Context, name: str, node: str, user: str | None, command: tuple[str, ...]) -> None:
    out = output(ctx)
    if not out.json:
        ctx.exit(nodeshell.open_shell(name, node, user=user, command=" ".join(command) or None))
    if not command:
        raise BadInput("with --output json, give a COMMAND to run (an interactive shell is not a document)")
    done = nodeshell.run_on_node(name, node, user=user, command=" ".join(command))
    out.result(done, ok=done.returncode == 0, text=lambda: None)
    ctx.exit(done.returncode)
