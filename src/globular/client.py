"""Reaching a running cluster from this machine: its Client, and a shell on its nodes."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from globular.errors import BadInput, GlobularError
from globular.paths import globular_home
from globular.plugins.ipcluster import DATA_KEY, reachable_info
from globular.registry import provider_class
from globular.state import ClusterRecord, NodeRecord, StateStore

if TYPE_CHECKING:
    from ipyparallel import Client


def connection_file(name: str, *, home: Path | None = None) -> Path:
    """The client connection file of cluster ``name`` (0600, in ``~/.globular/ipcluster``)."""
    return _connection_file(StateStore(home or globular_home()).get(name))


def _connection_file(record: ClusterRecord) -> Path:
    data = record.plugin_data.get(DATA_KEY) or {}
    path = data.get("connection_file")
    if not path:
        raise GlobularError(f"cluster {record.name!r} has no IPython controller running (status: {record.status})")
    if not Path(path).exists():
        raise GlobularError(f"the connection file of cluster {record.name!r} is missing: {path}")
    return Path(path)


class _Tunnel:
    """An event loop in a thread that holds the SSH connection forwarding the controller's ports."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="globular-ssh-tunnel", daemon=True)
        self.thread.start()
        self.provider = None

    def call(self, coro, timeout: float):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        if self.loop.is_closed():
            return
        provider, self.provider = self.provider, None
        if provider is not None:
            try:
                self.call(provider.close(), 10)
            except Exception:
                pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        if not self.loop.is_running():
            self.loop.close()


def connect(name: str, *, home: Path | None = None, timeout: float = 10.0) -> Client:
    """A ready ``ipyparallel.Client`` for cluster ``name``.

    When the master is reached by ssh, the controller's ports are forwarded over
    globular's own SSH connection (same key, known_hosts and user as the
    cluster's config), held by a thread until the client is closed.
    """
    from ipyparallel import Client

    home = home or globular_home()
    record = StateStore(home).get(name)
    path = _connection_file(record)
    info = json.loads(path.read_text())
    if record.master.login is None:
        return Client(info, timeout=timeout)
    tunnel = _Tunnel()
    try:
        provider = provider_class(record.spec.provider)(record.spec, cluster=record.name, home=home)
        tunnel.provider = provider
        info = tunnel.call(reachable_info(provider.runner(record.master), info), timeout + 30)
        client = Client(info, timeout=timeout)
    except BaseException:
        tunnel.close()
        raise
    close = client.close

    def close_with_tunnel(*args, **kwargs):
        try:
            return close(*args, **kwargs)
        finally:
            tunnel.close()

    client.close = close_with_tunnel  # type: ignore[method-assign]
    return client


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
    record = StateStore(home or globular_home()).get(name)
    node = record.node(node_name)
    if node.login is None:
        if user:
            raise BadInput(f"{node.name} of {name!r} is a local node: it takes no --user")
        shell = os.environ.get("SHELL") or "/bin/sh"
        argv = [shell] if command is None else ["/bin/sh", "-c", command]
        env = dict(os.environ, IPYTHONDIR=f"{node.workdir}/.ipython", GLOBULAR_NODE=node.name, GLOBULAR_CLUSTER=name)
        return NodeShell(argv, cwd=node.workdir, env=env)
    return NodeShell(_ssh_argv(record, node, user, command, home or globular_home()))


def _ssh_argv(record: ClusterRecord, node: NodeRecord, user: str | None, command: str | None, home: Path) -> list[str]:
    provider = provider_class(record.spec.provider)(record.spec, cluster=record.name, home=home)
    login_user, _, rest = node.login.rpartition("@")  # type: ignore[union-attr]
    host, _, port = rest.rpartition(":")
    argv = ["ssh", "-p", port or "22"]
    key = getattr(provider, "_ssh_key", lambda: None)()
    if key:
        argv += ["-i", str(Path(key).expanduser())]
    known = getattr(provider, "_known_hosts", lambda: None)()
    if known:
        argv += ["-o", f"UserKnownHostsFile={known}"]
    accept = getattr(provider, "_accept_new_host_keys", lambda: False)()
    argv += ["-o", "StrictHostKeyChecking=" + ("accept-new" if accept else "yes")]
    argv.append(f"{user or login_user}@{host}")
    if command is not None:
        argv += ["--", f"cd {shlex.quote(node.workdir)} 2>/dev/null; {command}"]
    return argv


def notebook(name: str, *, home: Path | None = None) -> dict:
    """The notebook server of cluster ``name``: url, port, directory, fingerprint, and the
    password when globular made it up (it is kept on this machine only, 0600)."""
    from globular.plugins.notebook import saved_notebook

    home = home or globular_home()
    record = StateStore(home).get(name)
    return saved_notebook(home, record.name, record.region)


async def forward_notebook(name: str, local_port: int = 0, *, home: Path | None = None, ready=None) -> None:
    """Forward ``127.0.0.1:local_port`` to the notebook server on the master over ssh,
    until cancelled; ``ready(url)`` is called once it listens."""
    home = home or globular_home()
    record = StateStore(home).get(name)
    info = notebook(name, home=home)
    if record.master.login is None:
        raise BadInput(f"the master of {name!r} is on this machine: open {info['url']} directly")
    provider = provider_class(record.spec.provider)(record.spec, cluster=record.name, home=home)
    try:
        host, port = await provider.runner(record.master).forward_port(info["address"], info["port"], local_port)
        if ready is not None:
            ready(f"https://{host}:{port}/")
        await asyncio.Event().wait()
    finally:
        await provider.close()
