"""No third party's warning reaches a user's screen: every command's help, the commands that load
every provider (and so asyncssh, boto3), a shell on a running cluster and the Python API, each in
a fresh process, print nothing with ``Warning`` on stderr.  Run by ``./scripts/test --latest``
too, against the newest versions pyproject.toml allows: that is where a new release of a library
shows up first (cryptography 51 made asyncssh warn five times at import)."""

from __future__ import annotations

import subprocess
import sys

import click
import pytest

from globular.cli.main import cli as globular_cli

SSH_CONFIG = """
[cluster lab]
provider = ssh
node_hosts = gpu1.example.org
plugins = ipcluster
"""


def command_paths(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command of the CLI, as the words that name it (``("env", "prune")``)."""
    found = [prefix]
    ctx = click.Context(group)
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        if isinstance(command, click.Group):
            found += command_paths(command, (*prefix, name))
        elif command is not None:
            found.append((*prefix, name))
    return found


def assert_quiet(what: str, stderr: str) -> None:
    assert "Warning" not in stderr, f"{what} printed a warning:\n{stderr}"


def test_the_walk_finds_every_command():
    paths = command_paths(globular_cli)
    assert {("start",), ("shell",), ("top",), ("config", "reference"), ("env", "prune"), ("sshnode",)} <= set(paths)


def test_no_command_help_prints_a_warning(cli):
    for path in command_paths(globular_cli):
        result = cli(*path, "--help")
        assert result.returncode == 0, result.output
        assert_quiet(f"globular {' '.join(path)} --help", result.stderr)


def test_commands_that_load_every_provider_print_no_warning(cli, write_config):
    reference = cli("config", "reference")  # imports every installed provider and plugin
    assert reference.returncode == 0, reference.output
    assert_quiet("globular config reference", reference.stderr)
    config = str(write_config(SSH_CONFIG))
    shown = cli("-c", config, "config", "show", "lab")  # the ssh provider: asyncssh
    assert shown.returncode == 0, shown.output
    assert_quiet("globular config show (ssh)", shown.stderr)


def test_the_python_api_prints_no_warning(tmp_path):
    code = "import globular; globular.Client; globular.connect; globular.Cluster"
    ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    assert_quiet("import globular; globular.Client", ran.stderr)


def test_but_the_users_own_warnings_still_show(tmp_path):
    code = (
        "import globular, warnings; globular.Client\n"
        "from cryptography.utils import CryptographyDeprecationWarning\n"
        "warnings.warn('mine', CryptographyDeprecationWarning)\n"
        "warnings.warn('also mine', DeprecationWarning)\n"
    )
    ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    assert "CryptographyDeprecationWarning: mine" in ran.stderr
    assert "DeprecationWarning: also mine" in ran.stderr  # __main__'s deprecations show by default


@pytest.mark.cluster
def test_a_shell_on_a_running_cluster_prints_no_warning(cli, home):
    started = cli("start", "-s", "1", "quiet")
    try:
        assert started.returncode == 0, started.output
        assert_quiet("globular start", started.stderr)
        shell = cli("shell", "quiet", "-c", "print(len(ipclient.ids))")
        assert shell.returncode == 0, shell.output
        assert shell.stdout.strip().splitlines()[-1] == "1"
        assert_quiet("globular shell -c", shell.stderr)
    finally:
        stopped = cli("terminate", "-y", "quiet")
    assert stopped.returncode == 0, stopped.output
    assert_quiet("globular terminate", stopped.stderr)
