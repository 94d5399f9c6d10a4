"""A shell on a cluster's node, from this machine (``globular sshmaster`` / ``sshnode``)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from globular.errors import GlobularError
from globular.paths import globular_home
from globular.providers.base import NodeShell
from globular.registry import make_provider
from globular.state import StateStore


def node_shell(
    name: str,
    node_name: str = "master",
    *,
    user: str | None = None,
    command: str | None = None,
    home: Path | None = None,
) -> NodeShell:
    """The command that opens a shell on ``node_name`` of cluster ``name``, or runs ``command``
    there: the provider's (:meth:`~globular.providers.base.NodeProvider.shell_argv`)."""
    home = home or globular_home()
    record = StateStore(home).get(name)
    provider = make_provider(record.spec, cluster=record.name, home=home)
    return provider.shell_argv(record.node(node_name), command, user)


def open_shell(name: str, node_name: str, *, user: str | None = None, command: str | None = None) -> int:
    """Open a shell on a node (or run ``command`` there), here in the foreground; its exit status."""
    shell = node_shell(name, node_name, user=user, command=command)
    try:
        return subprocess.run(shell.argv, cwd=shell.cwd, env=shell.env, check=False).returncode
    except FileNotFoundError:
        raise GlobularError(f"cannot run {shell.argv[0]!r}: not found (install openssh-client)") from None


@dataclass(frozen=True)
class NodeCommand:
    """A command run on a node, and what came of it."""

    node: str
    command: str
    returncode: int
    stdout: str
    stderr: str


def run_on_node(name: str, node_name: str, *, user: str | None = None, command: str) -> NodeCommand:
    """Run ``command`` on a node (as ``sshnode`` does), its output captured: for ``--output json``."""
    shell = node_shell(name, node_name, user=user, command=command)
    try:
        done = subprocess.run(
            shell.argv,
            cwd=shell.cwd,
            env=shell.env,
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except FileNotFoundError:
        raise GlobularError(f"cannot run {shell.argv[0]!r}: not found (install openssh-client)") from None
    return NodeCommand(node_name, command, done.returncode, done.stdout, done.stderr)
