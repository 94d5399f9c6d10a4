"""The ``ssh`` provider: nodes are hosts you already have, reached with asyncssh.

``node_hosts = user@host1, host2:2222, ...`` lists the hosts (the first is the
master unless ``master_host`` names another).  Connections use the user's
``~/.ssh/config`` and agent, plus ``ssh_key`` when given; host keys are checked
against ``known_hosts`` (``~/.ssh/known_hosts`` unless set), and a host not in it
is refused unless ``accept_new_host_keys`` is on.  A changed key is always refused.

On each host a node is a folder ``<remote_dir>/<cluster>/<node>`` (0700) and the
processes started in it.  The hosts need only Python (the same major.minor as
here) and sshd: globular builds the node environment in ``<remote_dir>/envs``
(see :mod:`globular.environment`) unless ``environment = system``.  Data (files,
wheels, process requests) travels on stdin, never on a command line (env_build's request is
its argument, as its wheels take stdin: a folder, a name, the installer, never a secret).
"""

from __future__ import annotations

import asyncio
import logging
import os
import posixpath
import shlex
from abc import abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import asyncssh
import tenacity

from globular.errors import (
    BadInput,
    CommandError,
    GlobularError,
    HostUnreachable,
    NodeError,
    NodeFailures,
)
from globular.fanout import each_node
from globular.paths import private_dir
from globular.providers.base import NodeProvider, NodeShell, Runner
from globular.providers.ssh_runner import SSHRunner, ssh_reason
from globular.providers.ssh_settings import (
    RemoteSettings,
    SSHHost,
    SSHOptions,
    SSHSettings,
    hosts_in_order,
)
from globular.spec import Settings as SettingsModel
from globular.state import NodeRecord

log = logging.getLogger(__name__)
CONNECT_ATTEMPTS = 6  # when the host's sshd drops new connections (MaxStartups)
DEFAULT_KNOWN_HOSTS = "~/.ssh/known_hosts"


class RemoteProvider(NodeProvider):
    """Nodes that are other machines, reached with asyncssh: connecting (host keys checked),
    a folder per node, its Python checked; the ssh and ec2 providers differ in where
    the machines come from."""

    settings: RemoteSettings
    default_environment = "managed"
    remote_nodes = True
    _key_given: str | None = None  # login_with's

    @abstractmethod
    def ssh_options(self) -> SSHOptions:
        """The key, known_hosts and host key policy of this provider's connections."""

    def envs_dir(self) -> str:
        return posixpath.join(self.settings.remote_dir, "envs")

    def login_key(self) -> str | None:
        key = self.ssh_options().key
        return str(Path(key).expanduser()) if key else None

    def login_with(self, key: str) -> None:
        self._key_given = key

    def shell_argv(self, node: NodeRecord, command: str | None, user: str | None = None) -> NodeShell:
        """``ssh`` with the cluster's key, port and known_hosts (OpenSSH's own client: a terminal
        that behaves as the user's ``ssh`` does); a command runs in the node's folder."""
        options = self.ssh_options()
        host = SSHHost.parse(node.login) if node.login else self._host(node)  # the user it logged in as
        argv = ["ssh", "-p", str(host.port)]
        if options.key:
            argv += ["-i", str(Path(options.key).expanduser())]
        if options.known_hosts:
            argv += ["-o", f"UserKnownHostsFile={options.known_hosts}"]
        argv += ["-o", "StrictHostKeyChecking=" + ("accept-new" if options.accept_new_host_keys else "yes")]
        argv.append(f"{user or host.user or self.settings.user or ''}@{host.host}".removeprefix("@"))
        if command is not None:
            argv += ["--", f"cd {shlex.quote(node.workdir)} 2>/dev/null; {command}"]
        return NodeShell(argv)

    # -- connecting ------------------------------------------------------------

    def _host(self, node: NodeRecord) -> SSHHost:
        return SSHHost.parse(node.data["host"])

    def _options(self, host: SSHHost, key: str | None = None) -> dict[str, Any]:
        # a host that stops answering is noticed after 3 missed keepalives: 3 x connect_timeout
        ssh = self.ssh_options()
        options: dict[str, Any] = {
            "port": host.port,
            "connect_timeout": self.settings.connect_timeout,
            "keepalive_interval": self.settings.connect_timeout,
            "keepalive_count_max": 3,
        }
        user = host.user or self.settings.user
        if user:
            options["username"] = user
        if key or ssh.key:
            options["client_keys"] = [str(Path(key or ssh.key or "").expanduser())]
        # no known_hosts file: nothing is trusted
        options["known_hosts"] = str(ssh.known_hosts) if ssh.known_hosts.exists() else ([], [], [])
        return options

    async def connect(self, host: SSHHost, *, key: str | None = None) -> asyncssh.SSHClientConnection:
        """An authenticated connection to ``host``, its host key checked; errors name the host
        (:class:`HostUnreachable` when it does not answer).  ``key``: a private key file to
        log in with instead of the provider's."""
        ssh = self.ssh_options()
        key = key or self._key_given
        if not key and ssh.key and not Path(ssh.key).expanduser().is_file():
            raise GlobularError(f"{ssh.key_setting} {ssh.key} does not exist")
        limit = self.settings.connect_timeout

        # sshd drops new connections beyond its MaxStartups (10:30:100): many at once from here
        # (a big cluster's nodes on one host, many clients) are retried, with growing pauses
        @tenacity.retry(
            retry=tenacity.retry_if_exception_type((asyncssh.ConnectionLost, ConnectionResetError)),
            wait=tenacity.wait_random_exponential(multiplier=0.2, max=3),
            stop=tenacity.stop_after_attempt(CONNECT_ATTEMPTS),
            reraise=True,
        )
        async def attempt() -> asyncssh.SSHClientConnection:
            async with asyncio.timeout(limit + 5):
                return await asyncssh.connect(host.host, **self._options(host, key))

        try:
            try:
                return await attempt()
            except asyncssh.HostKeyNotVerifiable:
                if not ssh.accept_new_host_keys or self._host_is_known(host):
                    raise
            await self._accept_host_key(host)
            return await attempt()
        except asyncssh.HostKeyNotVerifiable as exc:
            if self._host_is_known(host):
                why = f"its host key does not match the one in {ssh.known_hosts} (if the host was reinstalled, remove that line)"
            else:
                why = f"its host key is not in {ssh.known_hosts} (ssh to it once, or set accept_new_host_keys = true)"
            raise GlobularError(f"cannot trust {host}: {why} [{exc.reason}]") from None
        except asyncssh.PermissionDenied:
            which = f"the key {key}" if key else ssh.key_setting
            raise GlobularError(f"{host} refused the login (check user, {which} and your agent)") from None
        except TimeoutError:
            raise HostUnreachable(f"cannot reach {host}: no answer within {limit:g}s") from None
        except (asyncssh.ConnectionLost, ConnectionResetError):
            raise HostUnreachable(
                f"cannot reach {host}: its sshd dropped the connection {CONNECT_ATTEMPTS} times "
                "(it refuses new connections beyond its MaxStartups: too many at once?)"
            ) from None
        except (OSError, asyncssh.Error) as exc:
            raise HostUnreachable(f"cannot reach {host}: {ssh_reason(exc)}") from None

    def _host_is_known(self, host: SSHHost) -> bool:
        path = self.ssh_options().known_hosts
        if not path.exists():
            return False
        matches = asyncssh.read_known_hosts(str(path)).match(host.host, host.host, host.port)
        return any(matches[:4])

    async def _accept_host_key(self, host: SSHHost) -> None:
        key = await asyncio.wait_for(
            asyncssh.get_server_host_key(host.host, host.port), self.settings.connect_timeout + 5
        )
        if key is None:
            raise GlobularError(f"{host} offered no host key")
        path = self.ssh_options().known_hosts
        private_dir(path.parent)
        name = host.host if host.port == 22 else f"[{host.host}]:{host.port}"
        with open(path, "a", opener=lambda p, f: os.open(p, f, 0o600)) as f:
            f.write(f"{name} {key.export_public_key('openssh').decode().strip()}\n")

    def make_runner(self, node: NodeRecord) -> Runner:
        host = self._host(node)
        return SSHRunner(node, lambda: self.connect(host))

    # -- nodes -------------------------------------------------------------------

    def _node_dir(self, name: str) -> str:
        return posixpath.join(self.settings.remote_dir, self.cluster, name)

    async def _bring_up(self, nodes: list[NodeRecord], on_ready: Callable[[NodeRecord], None]) -> list[NodeRecord]:
        """Connect to each node, make its folder, check its Python; ``on_ready`` each that works."""

        async def bring_up(node: NodeRecord) -> NodeRecord:
            host = self._host(node)
            runner = self.runner(node)
            assert isinstance(runner, SSHRunner)
            try:
                conn = await runner.connection()
                self.on_step(node, "ssh")
                node.address = conn.get_extra_info("peername")[0]
                node.login = f"{conn.get_extra_info('username')}@{host.host}:{host.port}"
                # what the node's Python must have is the plugins' to ask, in the preflight
                try:
                    facts = await runner.nodeproc("prepare", {"dir": node.workdir})
                except CommandError as exc:
                    raise NodeError(
                        node.name, f"{host}: cannot run {self.settings.python} ({exc.stderr.strip() or exc})"
                    ) from None
                node.workdir = facts["workdir"]
                node.cores = self.settings.cores_per_node or facts["cpus"]
            except BaseException:
                self._runners.pop(node.name, None)
                await runner.close()
                raise
            on_ready(node)
            return node

        # each_node names the node in every failure, and lets the others finish
        await each_node(nodes, bring_up)
        return nodes

    async def _remove_dir(self, node: NodeRecord, sweep: bool = False) -> None:
        request = {
            "root": self.settings.remote_dir,
            "path": node.workdir,
            "mark": self.mark(node.name) if sweep else None,
        }
        await self.runner(node).nodeproc("remove_dir", request)

    async def terminate_nodes(self, nodes: list[NodeRecord]) -> None:
        async def release(node: NodeRecord) -> None:
            try:
                await self._remove_dir(node, sweep=True)
            finally:
                runner = self._runners.pop(node.name, None)
                if runner is not None:
                    await runner.close()

        await each_node(nodes, release)


class SSHProvider(RemoteProvider):
    """Nodes on the hosts of ``node_hosts``, one node a host."""

    name = "ssh"
    places_nodes = True
    Settings = SSHSettings
    settings: SSHSettings

    @property
    def region(self) -> str:
        return "ssh"

    @classmethod
    def default_cluster_size(cls, settings: SettingsModel) -> int:
        return cls.max_nodes(settings) or 0  # every host of node_hosts

    @classmethod
    def max_nodes(cls, settings: SettingsModel) -> int | None:
        """One node a host of ``node_hosts`` (``addnode --host`` may name more)."""
        assert isinstance(settings, SSHSettings)
        return len(hosts_in_order(settings))

    @classmethod
    def size_problem(cls, settings: SettingsModel, size: int) -> tuple[str, str] | None:
        assert isinstance(settings, SSHSettings)
        count = len(hosts_in_order(settings))
        if size > count:
            return "node_hosts", (
                f"{size} nodes asked for, but there are only {count} hosts in node_hosts "
                "(add hosts there, or name a new one with addnode --host)"
            )
        return None

    def ssh_options(self) -> SSHOptions:
        known = Path(self.settings.known_hosts or DEFAULT_KNOWN_HOSTS).expanduser()
        return SSHOptions(self.settings.ssh_key, known, self.settings.accept_new_host_keys, "ssh_key")

    def _place(self, names: list[str], existing: list[NodeRecord], hosts: list[str] | None) -> list[SSHHost]:
        used = {self._host(n).key: n.name for n in existing}
        if hosts:
            if len(hosts) != len(names):
                raise BadInput(f"{len(names)} nodes to add but {len(hosts)} hosts named")
            chosen = []
            for text in hosts:
                try:
                    host = SSHHost.parse(text)
                except ValueError as exc:
                    raise BadInput(str(exc)) from None
                if host.key in used:
                    raise BadInput(f"{host} is already node {used[host.key]} of cluster {self.cluster!r}")
                used[host.key] = "(being added)"
                chosen.append(host)
            return chosen
        free = [h for h in hosts_in_order(self.settings) if h.key not in used]
        if len(free) < len(names):
            total = len(hosts_in_order(self.settings))
            raise GlobularError(
                f"{len(names)} more node{'s' if len(names) > 1 else ''} asked for, but only {len(free)} of the {total} hosts in node_hosts "
                "are unused; add hosts to node_hosts, or name one with --host"
            )
        return free[: len(names)]

    async def create_nodes(
        self,
        names: list[str],
        on_ready: Callable[[NodeRecord], None],
        *,
        existing: Sequence[NodeRecord] = (),
        hosts: list[str] | None = None,
    ) -> list[NodeRecord]:
        placed = self._place(names, list(existing), hosts)
        if hosts:
            return await self._bring_up([self._node(n, h) for n, h in zip(names, placed)], on_ready)
        # hosts picked here: one that does not answer gives its place to the next free host
        used = {self._host(n).key for n in existing} | {h.key for h in placed}
        spare = [h for h in hosts_in_order(self.settings) if h.key not in used]
        made: list[NodeRecord] = []
        todo = list(zip(names, placed))
        while True:
            nodes = [self._node(n, h) for n, h in todo]
            try:
                await self._bring_up(nodes, on_ready)
                return made + nodes
            except NodeFailures as exc:
                silent = [n for n in nodes if isinstance(exc.failures.get(n.name), HostUnreachable)]
                if len(silent) != len(exc.failures) or len(spare) < len(silent):
                    raise
                made += [n for n in nodes if n.name not in exc.failures]
                todo = [(n.name, spare.pop(0)) for n in silent]
                for node, (_, host) in zip(silent, todo):
                    log.warning("%s: %s does not answer; trying %s", node.name, self._host(node), host)

    def _node(self, name: str, host: SSHHost) -> NodeRecord:
        return NodeRecord(
            name=name,
            address=host.host,
            workdir=self._node_dir(name),
            cores=1,
            python=self.settings.python,
            login=str(host),
            data={"host": str(host)},
        )
