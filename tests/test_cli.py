"""The command line as users type it: options where they put them, the remote command of
sshmaster/sshnode taken whole, StarCluster's names answered, bad input one line and exit 2."""

from __future__ import annotations

import click
import pytest

from globular.cli.main import cli as root


def parsed(*words: str) -> tuple[click.Context, dict]:
    """``globular WORDS`` parsed down to its command (nothing run): the command's context and params."""
    ctx = root.make_context("globular", list(words), obj={})  # as main() makes it
    command: click.Command = root
    while isinstance(command, click.Group):
        rest = [*getattr(ctx, "_protected_args", []), *ctx.args]
        name, sub, rest = command.resolve_command(ctx, rest)
        assert sub is not None and name is not None
        ctx, command = sub.make_context(name, rest, parent=ctx), sub
    return ctx, ctx.params


@pytest.mark.parametrize(
    ("words", "name", "node", "user", "command"),
    [
        (("sshmaster", "lab", "ps", "-u", "root"), "lab", None, None, ("ps", "-u", "root")),
        (("sshmaster", "-u", "root", "lab", "ps", "aux"), "lab", None, "root", ("ps", "aux")),
        (("sshmaster", "lab", "ls", "--output", "json"), "lab", None, None, ("ls", "--output", "json")),
        (("sshmaster", "lab", "--", "ls", "-l"), "lab", None, None, ("ls", "-l")),
        (("sshnode", "c", "node001", "df", "-h"), "c", "node001", None, ("df", "-h")),
        (("sshnode", "-u", "x", "c", "node001", "ls", "-v"), "c", "node001", "x", ("ls", "-v")),
        (("sshnode", "c", "node001"), "c", "node001", None, ()),
    ],
)
def test_everything_after_the_node_is_the_remote_command(words, name, node, user, command):
    _, params = parsed(*words)
    assert params["name"] == name and params.get("node") == node and params["user"] == user
    assert params["command"] == command


def test_an_option_where_the_remote_command_goes_is_refused_with_where_it_goes():
    with pytest.raises(click.UsageError, match="globular's options go before NAME"):
        parsed("sshnode", "lab", "node002", "-u", "root")


def test_output_after_the_remote_command_is_the_commands_not_globulars():
    ctx, _ = parsed("sshmaster", "lab", "ls", "--output", "json")
    assert "output" not in (ctx.find_root().obj or {})
    ctx, _ = parsed("sshmaster", "--output", "json", "lab", "ls")
    assert ctx.find_root().obj["output"] == "json"


def test_verbose_and_output_after_any_command():
    for words in (("status", "x", "-v"), ("listclusters", "-vv"), ("config", "show", "-v"), ("env", "prune", "-v")):
        ctx, _ = parsed(*words)
        assert ctx.find_root().obj["verbose"] >= 1, words
    ctx, _ = parsed("shell", "x", "--output", "json")
    assert ctx.find_root().obj["output"] == "json"


def test_stop_says_what_globular_does_instead(cli):
    done = cli("stop", "lab")
    assert done.returncode == 2
    assert "globular has no `stop` command" in done.stderr and "globular terminate NAME" in done.stderr
    assert "Did you mean" not in done.stderr  # not click's guess (`top`)


def test_a_named_config_that_is_not_there_is_exit_2_everywhere(cli, tmp_path):
    missing = str(tmp_path / "no-such-config")
    for args in (("-c", missing, "listclusters"), ("-c", missing, "config", "show"), ("-c", missing, "start", "x")):
        done = cli(*args)
        assert done.returncode == 2 and done.stderr.strip() == f"error: {missing}: config file not found", done.output
    done = cli("listclusters", env={"GLOBULAR_CONFIG": missing})
    assert done.returncode == 2 and missing in done.stderr


@pytest.mark.parametrize("name", ["x\n", "a/b", "_x", "x" * 64, "envs"])
def test_a_bad_cluster_name_is_refused_before_anything(cli, name):
    done = cli("start", name)
    assert done.returncode == 2 and done.stderr.startswith("error: invalid cluster name"), done.output
