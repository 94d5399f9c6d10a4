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
wheels, process requests) travels on stdin, never on a command line.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import posixpath
import secrets
import shlex
from abc import abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import asyncssh
import tenacity

from globular.errors import (
    BadInput,
    CommandError,
    CommandTimeout,
    ConnectionLost,
    FileFailed,
    GlobularError,
    HostUnreachable,
    NodeError,
)
from globular.fanout import each_node
from globular.paths import private_dir
from globular.providers.base import NODE_SOURCE, CommandResult, NodeProvider, Runner, display
from globular.providers.helper import HelperRunner, NodeHelper
from globular.providers.ssh_settings import (
    RemoteSettings,
    SSHHost,
    SSHOptions,
    SSHSettings,
    hosts_in_order,
)
from globular.results import size_text
from globular.spec import Settings as SettingsModel
from globular.state import NodeRecord

log = logging.getLogger(__name__)
MAX_ENGINES_PER_NODE = 1024
CONNECT_ATTEMPTS = 6  # when the host's sshd drops new connections (MaxStartups)
DEFAULT_KNOWN_HOSTS = "~/.ssh/known_hosts"


SFTP_BLOCK = 128 * 1024  # bytes per SFTP request (asyncssh's default, 16 KiB, costs a round of Python work per 16 KiB)


def _by_increments(progress: Callable[[int], None]) -> Callable[[bytes, bytes, int, int], None]:
    """asyncssh's progress handler (bytes copied so far) as ``progress(bytes since the last call)``."""
    done = 0

    def handler(_src: bytes, _dst: bytes, copied: int, _total: int) -> None:
        nonlocal done
        progress(copied - done)
        done = copied

    return handler


class SSHRunner(HelperRunner):
    """Runs commands on a node over one SSH connection (opened on first use)."""

    def __init__(self, node: NodeRecord, connect: Callable[[], Awaitable[asyncssh.SSHClientConnection]]):
        super().__init__(node)
        self._connect = connect
        self._conn: asyncssh.SSHClientConnection | None = None
        self._lock = asyncio.Lock()
        self._forwards: dict[tuple[str, int], asyncssh.SSHListener] = {}
        self._sftp: asyncssh.SFTPClient | None = None

    async def connection(self) -> asyncssh.SSHClientConnection:
        async with self._lock:
            if self._conn is None:
                self._conn = await self._connect()
            return self._conn

    async def start_helper(self) -> NodeHelper:
        conn = await self.connection()
        command = self._command([self.node.python, "-c", NODE_SOURCE, "serve"])
        log.debug("%s (%s): starting its helper", self.node.name, self.node.login)
        try:
            return await NodeHelper.start(conn, self.node.name, self.node.python, command)
        except (asyncssh.Error, OSError) as exc:
            raise ConnectionLost(self.node.name, "globular.node serve", str(exc)) from None

    def _command(self, argv: list[str]) -> str:
        return f"cd {shlex.quote(self.node.workdir)} 2>/dev/null; exec {shlex.join(argv)}"

    async def run(
        self, argv: list[str], *, input: bytes | None = None, timeout: float | None = 60.0, check: bool = True
    ) -> CommandResult:
        return await self._run(self._command(argv), display(argv), input=input, timeout=timeout, check=check)

    async def _run(
        self, command: str, shown: str, *, input: bytes | None, timeout: float | None, check: bool
    ) -> CommandResult:
        conn = await self.connection()
        log.debug("%s (%s): %s", self.node.name, self.node.login, shown)
        try:
            done = await conn.run(command, input=input, encoding=None, timeout=timeout, check=False)
        except asyncssh.TimeoutError:
            raise CommandTimeout(self.node.name, shown, timeout) from None
        except (asyncssh.Error, OSError) as exc:
            raise ConnectionLost(self.node.name, shown, f"ssh connection to {self.node.login} lost: {exc}") from None
        returncode = done.exit_status if done.exit_status is not None else 255
        out, err = done.stdout or b"", done.stderr or b""
        assert isinstance(out, bytes) and isinstance(err, bytes)  # encoding=None
        result = CommandResult(returncode, out.decode(errors="replace"), err.decode(errors="replace"))
        if check and returncode != 0:
            raise CommandError(self.node.name, shown, returncode, result.stderr, result.stdout)
        return result

    async def write_file(self, path: str, data: bytes, mode: int = 0o600) -> None:
        if not posixpath.isabs(path):
            path = posixpath.join(self.node.workdir, path)
        if self.helper_running:  # one round trip, no new shell
            await self.nodeproc("write", {"path": path, "data": base64.b64encode(data).decode(), "mode": mode})
            return
        tmp = f"{path}.tmp-{secrets.token_hex(4)}"
        q = shlex.quote
        command = (
            f"umask 077 && mkdir -p {q(posixpath.dirname(path))} && cat > {q(tmp)} "
            f"&& chmod {mode:o} {q(tmp)} && mv -f {q(tmp)} {q(path)}"
        )
        await self._run(command, f"write {path}", input=data, timeout=60, check=True)

    async def _sftp_client(self) -> asyncssh.SFTPClient:
        conn = await self.connection()
        async with self._lock:
            if self._sftp is None:
                self._sftp = await conn.start_sftp_client()
            return self._sftp

    async def upload(self, local: Path, remote: str, progress: Callable[[int], None]) -> None:
        """Over SFTP on the node's own SSH connection: to a temporary name, renamed once whole.
        Names travel as bytes: one that is not UTF-8 arrives as it is."""
        sftp = await self._sftp_client()
        target = os.fsencode(remote)
        part = posixpath.join(
            posixpath.dirname(target), b"." + posixpath.basename(target) + f".part-{secrets.token_hex(4)}".encode()
        )
        try:
            await sftp.makedirs(posixpath.dirname(target), exist_ok=True)
            await sftp.put(
                os.fsencode(local),
                part,
                preserve=True,
                block_size=SFTP_BLOCK,
                progress_handler=_by_increments(progress),
            )
            await sftp.posix_rename(part, target)
        except BaseException as exc:
            await asyncio.shield(self._remove_quietly(sftp, part))
            if isinstance(exc, asyncssh.SFTPError):  # the node's sftp-server refused (it says only "Failure")
                why = (
                    await self._no_room(sftp, target, local.stat().st_size)
                    or f"the node's SFTP server said {exc.reason!r}"
                )
                raise NodeError(self.node.name, f"cannot write {remote}: {why}") from None
            if isinstance(exc, OSError):  # this side: the file to send
                raise FileFailed("read", local, exc) from None
            if isinstance(exc, asyncssh.Error):
                raise ConnectionLost(self.node.name, f"sftp put {remote}", str(exc)) from None
            raise

    async def download(self, remote: str, local: Path, size: int, mtime: int, progress: Callable[[int], None]) -> None:
        sftp = await self._sftp_client()
        local.parent.mkdir(parents=True, exist_ok=True)
        part = local.with_name(f".{local.name}.part-{secrets.token_hex(4)}")
        try:  # no preserve: the node's mode bits are not taken (see transfer.get), its mtime is
            await sftp.get(
                os.fsencode(remote), os.fsencode(part), block_size=SFTP_BLOCK, progress_handler=_by_increments(progress)
            )
            os.utime(part, (mtime, mtime))
            os.replace(part, local)
        except asyncssh.SFTPError as exc:  # the node's sftp-server refused
            raise NodeError(self.node.name, f"cannot read {remote}: {exc.reason}") from None
        except OSError as exc:  # this side: a full disk, a folder not writable
            raise FileFailed("write", local, exc) from None
        except asyncssh.Error as exc:
            raise ConnectionLost(self.node.name, f"sftp get {remote}", str(exc)) from None
        finally:
            part.unlink(missing_ok=True)

    @staticmethod
    async def _no_room(sftp: asyncssh.SFTPClient, target: bytes, size: int) -> str:
        """``no room: 12 KB free in /x for 200 MB (a full disk)`` when that is why a write
        failed (OpenSSH's sftp-server says only "Failure"), else empty."""
        folder = posixpath.dirname(target)
        try:
            found = await sftp.statvfs(folder)
        except (asyncssh.Error, OSError):
            return ""
        free = found.bavail * found.frsize
        if free >= size:
            return ""
        return f"no room: {size_text(free)} free in {os.fsdecode(folder)} for {size_text(size)} (a full disk)"

    @staticmethod
    async def _remove_quietly(sftp: asyncssh.SFTPClient, path: bytes) -> None:
        try:
            await sftp.remove(path)
        except (asyncssh.Error, OSError):
            pass

    async def forward_port(self, host: str, port: int, local_port: int = 0) -> tuple[str, int]:
        if (host, port) not in self._forwards:
            conn = await self.connection()
            self._forwards[(host, port)] = await conn.forward_local_port("127.0.0.1", local_port, host, port)
        return "127.0.0.1", self._forwards[(host, port)].get_port()

    async def close(self) -> None:
        await self.close_helper()
        if self._sftp is not None:
            self._sftp.exit()
            self._sftp = None
        forwards, self._forwards = list(self._forwards.values()), {}
        for listener in forwards:
            listener.close()
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
            try:
                await asyncio.wait_for(conn.wait_closed(), 5)
            except (TimeoutError, OSError, asyncssh.Error):
                pass


class RemoteProvider(NodeProvider):
    """Nodes that are other machines, reached with asyncssh: connecting (host keys checked),
    a folder per node, its Python checked; the ssh and ec2 providers differ in where
    the machines come from."""

    settings: RemoteSettings
    default_environment = "managed"
    remote_nodes = True

    @abstractmethod
    def ssh_options(self) -> SSHOptions:
        """The key, known_hosts and host key policy of this provider's connections."""

    def envs_dir(self) -> str:
        return posixpath.join(self.settings.remote_dir, "envs")

    def login_key(self) -> str | None:
        key = self.ssh_options().key
        return str(Path(key).expanduser()) if key else None

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
            reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
            raise HostUnreachable(f"cannot reach {host}: {reason}") from None

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
    Settings = SSHSettings
    settings: SSHSettings

    @property
    def region(self) -> str:
        return "ssh"

    @classmethod
    def default_cluster_size(cls, settings: SettingsModel) -> int:
        assert isinstance(settings, SSHSettings)
        return len(hosts_in_order(settings))

    @classmethod
    def size_problem(cls, settings: SettingsModel, size: int) -> tuple[str, str] | None:
        assert isinstance(settings, SSHSettings)
        count = len(hosts_in_order(settings))
        if size > count:
            return "node_hosts", f"{size} nodes asked for, but there are only {count} hosts"
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
        nodes = [
            NodeRecord(
                name=name,
                address=host.host,
                workdir=self._node_dir(name),
                cores=1,
                python=self.settings.python,
                login=str(host),
                data={"host": str(host)},
            )
            for name, host in zip(names, placed)
        ]
        return await self._bring_up(nodes, on_ready)
