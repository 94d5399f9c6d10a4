"""How :class:`globular.Client` reaches a controller this machine does not reach directly: its
ports forwarded to 127.0.0.1, held by a thread of its own until the client closes.

- :class:`ProviderTunnel`: the file is a known cluster's: the cluster's own provider reaches its
  master (:meth:`~globular.providers.runner.Runner.forward_port`: an SSH connection with the
  cluster's key, user and known_hosts; a node entered by a command relays through the node
  programs).  A master reached directly needs none.
- :class:`SSHTunnel`: any other file that names an ``ssh`` server (or ``sshserver=``): one
  asyncssh connection of its own, with ``~/.ssh/known_hosts`` and the user's keys.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import asyncssh

from globular.aio import LoopThread
from globular.errors import GlobularError
from globular.ipcluster.controller import forwarded_info, reachable_info
from globular.providers.base import NodeProvider, Runner
from globular.providers.ssh_runner import refused_through, ssh_reason
from globular.providers.ssh_settings import SSHHost
from globular.state import ClusterRecord

log = logging.getLogger(__name__)

TUNNEL_ERRORS = (TimeoutError, OSError, asyncssh.Error)


class TunnelError(GlobularError, OSError):
    """The tunnel to the controller could not be opened."""


def check_key(path: Path) -> None:
    """``sshkey`` as OpenSSH takes it: a private key file, readable by its owner alone."""
    try:
        st = path.stat()
        data = path.read_bytes()
    except FileNotFoundError:
        raise TunnelError(f"sshkey {path} does not exist") from None
    except OSError as exc:
        raise TunnelError(f"sshkey {path} cannot be read: {exc.strerror}") from None
    if st.st_mode & 0o077 and st.st_uid == os.getuid():  # OpenSSH: "UNPROTECTED PRIVATE KEY FILE!"
        raise TunnelError(
            f"sshkey {path} is readable by others ({st.st_mode & 0o777:04o}), so ssh would refuse it too; chmod 600 {path}"
        )
    try:
        asyncssh.import_private_key(data)
    except asyncssh.KeyImportError:
        encrypted = b"ENCRYPTED" in data or b"bcrypt" in data
        why = (
            "it has a passphrase: load it into ssh-agent" if encrypted else "not a private key (OpenSSH, PEM or PKCS#8)"
        )
        raise TunnelError(f"sshkey {path}: {why}") from None


def key_path(sshkey: Any) -> str | None:
    """``sshkey`` (a path or None), expanded and checked."""
    if not sshkey:
        return None
    key = str(Path(sshkey).expanduser())
    check_key(Path(key))
    return key


class Tunnel:
    """The controller's ports forwarded here, on a loop in a thread of its own."""

    via = "the tunnel"  # how the client reaches the controller, in words

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.far: dict[int, tuple[str, int]] = {}  # a forwarded port here -> the controller's (host, port)
        self.thread = LoopThread("globular-client-tunnel")

    def forward(self, info: dict[str, Any]) -> dict[str, Any]:
        """``info`` with every port the client connects to forwarded here."""
        try:
            return self.thread.call(self._forward(info), self.timeout + 60)
        except TUNNEL_ERRORS as exc:
            if isinstance(exc, GlobularError):
                raise
            raise TunnelError(f"cannot forward the controller's ports through {self.via}: {exc}") from None

    async def _forward(self, info: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def far_end_refuses(self, local_url: str) -> str | None:
        """Why the controller port that ``local_url`` (a forwarded port here) stands for refuses a
        connection at the tunnel's far end (nothing listens there: the controller is not
        running), or None when it accepts, or cannot be asked."""
        far = self.far.get(int(local_url.rsplit(":", 1)[1]))
        if far is None:
            return None
        try:
            why = self.thread.call(self._refuses(*far), self.timeout)
        except TUNNEL_ERRORS:
            return None
        if why is None:
            return None
        return (
            f"nothing listens at the controller's address {far[0]}:{far[1]} ({why}): "
            "the controller is not running (`globular status` says why; `globular restart-controller` "
            "starts a new one)"
        )

    async def _refuses(self, host: str, port: int) -> str | None:
        return None

    def close(self) -> None:
        if self.thread.loop.is_closed():
            return
        try:
            self.thread.call(self._close(), 10)
        except TUNNEL_ERRORS as exc:
            log.debug("closing %s: %s", self.via, exc)
        finally:
            self.thread.close()

    async def _close(self) -> None:
        pass


class ProviderTunnel(Tunnel):
    """A known cluster's master, reached by the cluster's own provider."""

    def __init__(self, provider: NodeProvider, runner: Runner, timeout: float) -> None:
        super().__init__(timeout)
        self.provider = provider
        self.runner = runner
        login = runner.node.login
        self.via = (
            f"the SSH tunnel to {login}" if login else f"the {provider.name} provider's forward to {runner.node.name}"
        )

    @classmethod
    def reaching(cls, cluster: tuple[ClusterRecord, Path], sshkey: Any, timeout: float) -> ProviderTunnel | None:
        """The tunnel to ``cluster``'s master, or None where this machine reaches it directly."""
        from globular.registry import make_provider

        record, home = cluster
        key = key_path(sshkey)
        provider = make_provider(record.spec, cluster=record.name, home=home)
        if key:
            provider.login_with(key)
        runner = provider.runner(record.master)
        if runner.direct:
            return None
        return cls(provider, runner, timeout)

    async def _forward(self, info: dict[str, Any]) -> dict[str, Any]:
        return await reachable_info(self.runner, info, self.far)

    async def _refuses(self, host: str, port: int) -> str | None:
        return await self.runner.port_refuses(host, port)

    async def _close(self) -> None:
        await self.provider.close()


class SSHTunnel(Tunnel):
    """One asyncssh connection of its own to ``server``, for a file that is not a known cluster's."""

    def __init__(self, server: str, *, sshkey: Any, password: str | None, timeout: float) -> None:
        try:
            self.host = SSHHost.parse(server)
        except ValueError as exc:
            raise TunnelError(f"sshserver {server!r}: {exc}") from None
        self.key = key_path(sshkey)
        self.password = password
        self.conn: asyncssh.SSHClientConnection | None = None
        self.via = f"the SSH tunnel to {self.host}"
        super().__init__(timeout)

    async def _forward(self, info: dict[str, Any]) -> dict[str, Any]:
        conn = await self._connection()

        async def forward(host: str, port: int) -> int:
            listener = await conn.forward_local_port("127.0.0.1", 0, host, port)
            self.far[listener.get_port()] = (host, port)
            return listener.get_port()

        forwarded = await forwarded_info(info, forward)
        log.debug("controller %s ports forwarded through %s", info.get("interface"), self.host)
        return forwarded

    async def _refuses(self, host: str, port: int) -> str | None:
        return None if self.conn is None else await refused_through(self.conn, host, port)

    async def _connection(self) -> asyncssh.SSHClientConnection:
        """A connection of its own, for a connection file that is not a known cluster's."""
        known_hosts = Path("~/.ssh/known_hosts").expanduser()
        if not known_hosts.is_file():
            raise TunnelError(
                f"cannot trust {self.host}: {known_hosts} does not exist (ssh to it once, to check and keep its host key)"
            )
        options: dict[str, Any] = {
            "port": self.host.port,
            "known_hosts": str(known_hosts),
            "connect_timeout": self.timeout,
            "keepalive_interval": 10,
            "keepalive_count_max": 3,
        }
        if self.host.user:
            options["username"] = self.host.user
        if self.key:
            options["client_keys"] = [self.key]
        if self.password:
            options["password"] = self.password
        try:
            self.conn = await asyncssh.connect(self.host.host, **options)
        except asyncssh.HostKeyNotVerifiable as exc:
            raise TunnelError(
                f"cannot trust {self.host}: its host key is not in {known_hosts}, or does not match "
                f"(ssh to it once to check it) [{exc.reason}]"
            ) from None
        except asyncssh.PermissionDenied:
            raise TunnelError(f"{self.host} refused the login (pass sshkey=, or password=)") from None
        except (OSError, asyncssh.Error) as exc:
            raise TunnelError(f"cannot reach {self.host}: {ssh_reason(exc)}") from None
        return self.conn

    async def _close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.close()
            await conn.wait_closed()
