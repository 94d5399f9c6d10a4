"""A shell on a cluster's node, from this machine (``globular sshmaster`` / ``sshnode``)."""

from __future__ import annotations

import os
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

from globular.errors import BadInput, GlobularError
from globular.paths import globular_home
from globular.providers.base import NodeProvider
from globular.registry import make_provider
from globular.state import NodeRecord, StateStore


@dataclass(frozen=True)
class NodeShell:
    """How to open a shell on a node (or run a command there): argv, and where and how to run it."""

    argv: list[str]
    cwd: str | None = None
    env: dict[str, str] | None = None


def node_shell(
    name: str,
    node_name: str = "master",
    *,
    user: str | None = None,
    command: str | None = None,
    home: Path | None = None,
) -> NodeShell:
    """The command that opens a shell on ``node_name`` of cluster ``name``, or runs ``command`` there.

    Remote nodes: ``ssh`` with the cluster's key, port and known_hosts.  Local
    nodes: the user's shell in the node's folder.
    """
    home = home or globular_home()
    record = StateStore(home).get(name)
    node = record.node(node_name)
    provider = make_provider(record.spec, cluster=record.name, home=home)
    provider_argv = provider.shell_argv(node, command)
    if provider_argv is not None:
        if user:
            raise BadInput(f"{node.name} of {name!r} is a {record.spec.provider} node: it takes no --user")
        return NodeShell(provider_argv)
    if node.is_local:
        if user:
            raise BadInput(f"{node.name} of {name!r} is a local node: it takes no --user")
        shell = os.environ.get("SHELL") or "/bin/sh"
        argv = [shell] if command is None else ["/bin/sh", "-c", command]
        env = dict(os.environ, IPYTHONDIR=f"{node.workdir}/.ipython", GLOBULAR_NODE=node.name, GLOBULAR_CLUSTER=name)
        return NodeShell(argv, cwd=node.workdir, env=env)
    return NodeShell(_ssh_argv(provider, node, user, command))


def _ssh_argv(provider: NodeProvider, node: NodeRecord, user: str | None, command: str | None) -> list[str]:
    from globular.providers.ssh import RemoteProvider

    assert isinstance(provider, RemoteProvider)  # a node with a login is a remote provider's
    options = provider.ssh_options()
    login_user, _, rest = (node.login or "").rpartition("@")
    host, _, port = rest.rpartition(":")
    argv = ["ssh", "-p", port or "22"]
    if options.key:
        argv += ["-i", str(Path(options.key).expanduser())]
    if options.known_hosts:
        argv += ["-o", f"UserKnownHostsFile={options.known_hosts}"]
    argv += ["-o", "StrictHostKeyChecking=" + ("accept-new" if options.accept_new_host_keys else "yes")]
    argv.append(f"{user or login_user}@{host}")
    if command is not None:
        argv += ["--", f"cd {shlex.quote(node.workdir)} 2>/dev/null; {command}"]
    return argv


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
