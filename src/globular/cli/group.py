"""The shape of the ``globular`` command line: the root group (a StarCluster command that
globular has not gets what to type instead), and the options every command takes, before or
after its name: ``--output`` and ``-v``."""

from __future__ import annotations

import importlib
import logging
import sys
from typing import TYPE_CHECKING, Any

import click

from globular.cli.render import output_option
from globular.logs import FORMAT, LOGGER

if TYPE_CHECKING:
    from globular.config import Config


class Later:
    """A module imported on first use: the CLI imports what a command needs when it runs, so
    that ``--help`` and a quick command do not pay for every library (pydantic, asyncssh, the
    environment builder).  For mypy, each user imports the module itself under TYPE_CHECKING."""

    def __init__(self, module: str) -> None:
        self._module = module

    def __getattr__(self, name: str) -> Any:
        return getattr(importlib.import_module(self._module), name)


def run(coro: Any) -> Any:
    """Run a library coroutine; SIGTERM cancels it like Ctrl-C does, so the library's
    cleanup runs (a half-started cluster is undone)."""
    from globular.aio import run_sync

    return run_sync(coro, sigterm_cancels=True)


def load_config(ctx: click.Context) -> Config:
    """The config the command line names (``-c``), else the default one."""
    from globular.config import Config

    return Config.load(ctx.find_root().obj["config"])


# StarCluster's commands that globular has under another name, or not at all: what to type instead
INSTEAD = {
    "stop": "StarCluster's `stop` kept an EBS-backed cluster's nodes for a later `start`; globular keeps no "
    "stopped nodes. `globular terminate NAME` stops every process and releases the nodes (a remote master's "
    "notebooks are copied home first); `globular runplugin ipclusterstop NAME` stops the engines and the "
    "controller and keeps the nodes",
    "sshinstance": "use `globular sshnode NAME NODE`",
    "listinstances": "use `globular status NAME` (every node) or `globular listclusters`",
}


class GlobularGroup(click.Group):
    """The root group: a StarCluster command that globular has not gets what to type instead
    (click alone would suggest the nearest name: `stop` -> `top`).  Installed plugins' commands
    (the ``globular.commands`` entry points) are listed by name and loaded when one runs (or
    ``--help`` lists them), so that other commands do not pay for their imports."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        from globular.registry import command_names

        return sorted({*self.commands, *command_names()})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        found = self.commands.get(cmd_name)
        if found is None:
            from globular.registry import command

            found = command(cmd_name)
            if found is not None:
                takes_output_and_verbose(found)
                self.add_command(found, cmd_name)
        return found

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        if args and args[0] in INSTEAD and self.get_command(ctx, args[0]) is None:
            raise click.UsageError(f"globular has no `{args[0]}` command: {INSTEAD[args[0]]}.", ctx)
        return super().resolve_command(ctx, args)


VERBOSITY_HELP = "Log what globular does to stderr (-vv: every command it runs); also after the command."


def log_to_stderr(obj: dict[str, Any], more: int) -> None:
    """Log to stderr at the verbosity asked for so far (``-v`` before and after the command add up)."""
    verbose = obj["verbose"] = obj.get("verbose", 0) + more
    handler = obj.get("log_handler")
    if handler is None:
        handler = obj["log_handler"] = logging.StreamHandler(sys.stderr)
        LOGGER.addHandler(handler)
        LOGGER.setLevel(logging.DEBUG)
        LOGGER.propagate = False
    handler.setFormatter(logging.Formatter(FORMAT if verbose else "%(levelname)s: %(message)s"))
    handler.setLevel({0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG))


def _more_verbose(ctx: click.Context, param: click.Parameter, value: int) -> None:
    if value:
        log_to_stderr(ctx.find_root().ensure_object(dict), value)


def verbose_option(command: click.Command) -> click.Command:
    """``-v``/``--verbose`` after a command (``globular status lab -v``), as before it."""
    return click.option("-v", "--verbose", count=True, expose_value=False, callback=_more_verbose, help=VERBOSITY_HELP)(
        command
    )


def takes_output_and_verbose(command: click.Command) -> None:
    """``--output`` and ``-v`` on ``command`` (on each command of a group) where it lacks them."""
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            takes_output_and_verbose(sub)
        return
    names = {name for param in command.params for name in getattr(param, "opts", ())}
    if "--output" not in names:
        output_option(command)
    if "-v" not in names:
        verbose_option(command)


def every_command_takes_output_and_verbose(group: click.Group) -> None:
    """``--output`` and ``-v`` on every command of ``group`` (and of its groups) that lacks them."""
    for command in group.commands.values():
        takes_output_and_verbose(command)
