"""``from globular import Client``: ipyparallel's ``Client``, whose SSH tunnel works, encrypted.

    from globular import Client
    rc = Client('~/.globular/ipcluster/lab-ssh.json', sshkey='~/.ssh/id_lab')
    rc[:].map_sync(lambda x: x**30, range(8))

It *is* an ``ipyparallel.Client`` (a subclass), with the same arguments.  Where
ipyparallel would tunnel (the file names an ``ssh`` server, or ``sshserver=``,
``sshkey=`` or ``password=`` is given), ipyparallel's own tunnel has two faults:
its ``Client._connect`` gives the CURVE keys to no socket it tunnels (against a
cluster with ``encryption = curve`` it connects, then waits for ever), and
pyzmq's ``ssh -f`` tunnel can be killed by the SIGHUP of the pty it closes at once
("Hub connection request timed out").  This class forwards the controller's
ports through one SSH connection of its own instead (asyncssh, in this process:
no ``ssh`` subprocess, nothing that SIGHUP can kill), then hands ipyparallel a
connection dict on 127.0.0.1, to which it connects every socket directly, with
the CURVE keys.  The tunnel closes with the client.

Whose key and known_hosts: ``sshkey`` when given; for a file that globular wrote
(it names its cluster, and the cluster's record holds the same session key),
otherwise the cluster's own key, user and known_hosts, as ``globular.connect``
uses; for any other file (a plain ipcontroller's), ``~/.ssh/config``, your agent
and default keys, and ``~/.ssh/known_hosts``.  A host key that is not known is
refused.

A client that fails to connect says why: a CURVE handshake the controller
refused (a stale file: another server key), no answer at the address, or a
controller that accepted the connection but did not answer in ``timeout``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import asyncssh
import ipyparallel

from globular.aio import LoopThread
from globular.errors import GlobularError
from globular.ipcluster.controller import (
    CLUSTER_KEY,
    PORT_KEYS,
    forwarded_info,
    reachable_info,
    record_data,
    with_serverkey,
)
from globular.ipcluster.watch import ControllerWatch, HandshakeWatch, watch_controller
from globular.paths import globular_home
from globular.providers.base import Runner
from globular.providers.ssh_settings import SSHHost
from globular.state import ClusterRecord, StateStore

log = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "localhost", "::1")


class TunnelError(GlobularError, OSError):
    """The SSH tunnel to the controller could not be opened."""


class ConnectionFileError(GlobularError, OSError):
    """A connection file that is missing, unreadable, or not a client connection file."""


REQUIRED_KEYS = ("interface", "registration", "key")  # what a client cannot connect without


class Client(ipyparallel.Client):  # type: ignore[misc]  # ipyparallel has no type hints
    """``ipyparallel.Client``, tunnelled through globular's own SSH connection when the
    controller is remote, with the CURVE keys on every socket (see the module's doc)."""

    def __init__(
        self,
        connection_info: str | os.PathLike[str] | dict[str, Any] | None = None,
        *,
        sshserver: str | None = None,
        sshkey: str | os.PathLike[str] | None = None,
        password: str | None = None,
        paramiko: bool | None = None,  # accepted for ipyparallel's signature; asyncssh tunnels
        timeout: float = 10,
        _globular_cluster: tuple[ClusterRecord, Path] | None = None,  # globular.connect's
        **kwargs: Any,
    ) -> None:
        self._globular_tunnel: _Tunnel | None = None
        self._globular_watch: ControllerWatch | None = None
        if connection_info is None and not (sshserver or sshkey or password):
            super().__init__(timeout=timeout, **kwargs)  # the profile's file, as ipyparallel finds it
            return
        if connection_info is None:
            connection_info = _profile_file(kwargs)
        info = _load(connection_info)
        cluster = _globular_cluster or _cluster_of(info, connection_info)
        info.pop(CLUSTER_KEY, None)
        record = cluster[0] if cluster else None
        server = _ssh_server(info, sshserver, sshkey, password)
        # ipyparallel connects to a controller it reaches directly (here, or through the tunnel's
        # ports on 127.0.0.1): every socket gets the CURVE keys
        if server is None:
            super().__init__(info, timeout=timeout, **kwargs)
        else:
            tunnel = _Tunnel(server, sshkey=sshkey, password=password, cluster=cluster, timeout=timeout)
            self._globular_tunnel = tunnel
            try:
                super().__init__(tunnel.forward(info), timeout=timeout, **kwargs)
            except BaseException:
                tunnel.close()
                raise
        if record is not None:
            self._globular_watch = watch_controller(self, record.name)

    def _connect(self, sshserver: Any, ssh_kwargs: Any, timeout: float) -> None:
        # the query socket is connected, its request not yet sent: watch its handshake from now
        # on, and say what it saw if no answer comes (before ipyparallel closes the client)
        watch = HandshakeWatch()
        watch.attach(self._query_socket)
        try:
            super()._connect(sshserver, ssh_kwargs, timeout)
        except TimeoutError as exc:
            tunnel = getattr(self, "_globular_tunnel", None)
            why = watch.why(self._config["registration"], self.curve_serverkey)
            if tunnel is not None:  # its local end always accepts: ask whether the far end does
                closed = tunnel.far_end_refuses(self._config["registration"])
                if closed:
                    why = closed
            via = f" (through the SSH tunnel to {tunnel.host})" if tunnel is not None else ""
            raise TimeoutError(f"{exc} after {timeout:g} s{via}: {why}") from None
        finally:
            watch.close()

    def gpu_engines(self) -> dict[int, str]:
        """Engine id -> the UUID of the GPU it holds (``gpu_engines``); CPU engines are left out."""
        from globular.ipcluster.gpus import gpu_engines

        return gpu_engines(self)

    def gpu_view(self) -> Any:
        """A DirectView over the GPU engines only: ``rc.gpu_view().map_sync(train, shards)``."""
        from globular.ipcluster.gpus import gpu_view

        return gpu_view(self)

    def close(self, linger: int | None = None) -> None:
        watch, self._globular_watch = getattr(self, "_globular_watch", None), None
        if watch is not None:
            watch.stop()
        try:
            super().close(linger)
        finally:
            tunnel, self._globular_tunnel = getattr(self, "_globular_tunnel", None), None
            if tunnel is not None:
                tunnel.close()


def connect(name: str, *, home: Path | None = None, timeout: float = 10.0) -> Client:
    """A ready :class:`Client` for running cluster ``name`` (``globular.connect``)."""
    from globular.ipcluster.controller import connection_info

    home = home or globular_home()
    record = StateStore(home).get(name)
    return Client(connection_info(record_data(record), record.name), timeout=timeout, _globular_cluster=(record, home))


# -- what the connection file says -------------------------------------------------


def _profile_file(kwargs: dict[str, Any]) -> Path:
    """The controller's client file of the profile ``Client()`` would read."""
    from IPython.core.profiledir import ProfileDir
    from IPython.paths import get_ipython_dir

    if kwargs.get("profile_dir"):
        folder = Path(kwargs["profile_dir"]).expanduser()
    else:
        profile = ProfileDir.find_profile_dir_by_name(  # type: ignore[no-untyped-call]
            kwargs.get("ipython_dir") or get_ipython_dir(), kwargs.get("profile") or "default"
        )
        folder = Path(profile.location)
    cluster_id = kwargs.get("cluster_id")
    return (
        folder / "security" / (f"ipcontroller-{cluster_id}-client.json" if cluster_id else "ipcontroller-client.json")
    )


def _load(connection_info: str | os.PathLike[str] | dict[str, Any]) -> dict[str, Any]:
    """A connection file's content (or a dict of it), checked: the keys a client needs, each
    port a port; a file readable by others (it holds the key that runs code on every engine)
    is used with a warning, as OpenSSH warns of a world-readable config."""
    if isinstance(connection_info, dict):
        return with_serverkey(_checked(dict(connection_info), "the connection info"))
    path = Path(connection_info).expanduser()
    fix = "a client connection file is ~/.globular/ipcluster/<cluster>-<region>.json, or the controller's ipcontroller-client.json"
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConnectionFileError(f"connection file {path} not found. Is a controller running?") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConnectionFileError(
            f"connection file {path} cannot be read: {getattr(exc, 'strerror', None) or exc}"
        ) from None
    try:
        info = json.loads(text)
    except ValueError as exc:
        raise ConnectionFileError(f"connection file {path} is not JSON ({exc}); {fix}") from None
    if not isinstance(info, dict):
        raise ConnectionFileError(f"connection file {path} holds no connection info; {fix}")
    mode = path.stat().st_mode & 0o777
    if mode & 0o077 and path.stat().st_uid == os.getuid():
        log.warning(
            "connection file %s is readable by others (%04o): its key runs code on every engine; chmod 600 %s",
            path, mode, path,
        )  # fmt: skip
    return with_serverkey(_checked(info, f"connection file {path}", fix))


def _checked(info: dict[str, Any], what: str, fix: str = "") -> dict[str, Any]:
    missing = [key for key in REQUIRED_KEYS if key not in info]
    if missing:
        raise ConnectionFileError(
            f"{what} has no {', '.join(missing)}: not a client connection file" + (f"; {fix}" if fix else "")
        )
    for key in PORT_KEYS:
        value = info.get(key)
        if key in info and not (isinstance(value, int) and not isinstance(value, bool) and 0 < value < 65536):
            raise ConnectionFileError(f"{what}: {key} is {value!r}, not a port number (1-65535)")
    if not isinstance(info["interface"], str) or "://" not in info["interface"]:
        raise ConnectionFileError(f"{what}: interface is {info['interface']!r}, not an address like tcp://10.0.0.5")
    return info


def _cluster_of(info: dict[str, Any], source: Any) -> tuple[ClusterRecord, Path] | None:
    """The record (and globular home) of the cluster whose file this is, when globular wrote
    it and the cluster still runs with the same session key; else None."""
    name = info.get(CLUSTER_KEY)
    if not isinstance(name, str):
        return None
    homes = []
    if not isinstance(source, dict):
        path = Path(source).expanduser()
        if path.parent.name == "ipcluster":
            homes.append(path.parent.parent)
    homes.append(globular_home())
    for home in dict.fromkeys(homes):
        if not (home / "clusters" / f"{name}.json").exists():
            continue
        try:
            record = StateStore(home).get(name)
            data = record_data(record)
            recorded = json.loads(Path(data["connection_file"]).read_text())
        except (GlobularError, OSError, ValueError, KeyError, TypeError):
            continue
        if recorded.get("key") == info.get("key"):
            return record, home
    return None


def _ssh_server(info: dict[str, Any], sshserver: str | None, sshkey: Any, password: str | None) -> str | None:
    """The ssh server ipyparallel would tunnel through (its rules), or None: no tunnel."""
    ssh = sshserver or None
    addr = str(info.get("interface", "tcp://127.0.0.1")).split("://", 1)[-1]
    if not ssh and info.get("ssh"):
        location = info.get("location")
        if addr in LOOPBACK and location:
            from ipyparallel.util import ip_for_host, is_local_ip

            if not is_local_ip(ip_for_host(location)):
                ssh = info["ssh"]
        else:
            ssh = info["ssh"]
    if not ssh and (sshkey or password):
        ssh = addr  # ipyparallel's default: ssh to the controller's own address
    return ssh or None


# -- the tunnel ---------------------------------------------------------------------


def _check_key(path: Path) -> None:
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


class _Tunnel:
    """The controller's ports forwarded to 127.0.0.1 through one asyncssh connection, held
    by a thread of its own until :meth:`close`."""

    def __init__(
        self,
        server: str,
        *,
        sshkey: Any,
        password: str | None,
        cluster: tuple[ClusterRecord, Path] | None,
        timeout: float,
    ) -> None:
        try:
            self.host = SSHHost.parse(server)
        except ValueError as exc:
            raise TunnelError(f"sshserver {server!r}: {exc}") from None
        self.key = str(Path(sshkey).expanduser()) if sshkey else None
        if self.key:
            _check_key(Path(self.key))
        self.password = password
        self.cluster = cluster
        self.timeout = timeout
        self.provider: Any = None
        self.runner: Runner | None = None  # the master's, when the cluster is known: its provider reaches it
        self.conn: asyncssh.SSHClientConnection | None = None
        self.far: dict[int, tuple[str, int]] = {}  # a forwarded port here -> the controller's (host, port)
        self.thread = LoopThread("globular-client-tunnel")

    def forward(self, info: dict[str, Any]) -> dict[str, Any]:
        """``info`` with every port the client connects to forwarded here."""
        try:
            return self.thread.call(self._forward(info), self.timeout + 60)
        except (TimeoutError, OSError, asyncssh.Error) as exc:
            if isinstance(exc, GlobularError):
                raise
            raise TunnelError(f"cannot forward the controller's ports through {self.host}: {exc}") from None

    def far_end_refuses(self, local_url: str) -> str | None:
        """Why the controller port that ``local_url`` (a forwarded port here) stands for refuses a
        connection at the tunnel's far end (nothing listens there: the controller is not
        running), or None when it accepts, or cannot be asked."""
        try:
            return self.thread.call(self._far_end_refuses(local_url), self.timeout)
        except (TimeoutError, OSError, asyncssh.Error):
            return None

    async def _far_end_refuses(self, local_url: str) -> str | None:
        port = int(local_url.rsplit(":", 1)[1])
        far = self.far.get(port)
        if far is None:
            return None
        if self.runner is not None:
            why = await self.runner.port_refuses(*far)
        elif self.conn is not None:
            try:
                _, writer = await self.conn.open_connection(*far)
            except asyncssh.ChannelOpenError as exc:
                why = exc.reason or "refused"
            else:
                writer.close()
                why = None
        else:
            return None
        if why is None:
            return None
        return (
            f"nothing listens at the controller's address {far[0]}:{far[1]} on {self.host} ({why}): "
            "the controller is not running (`globular status` says why; `globular restart-controller` "
            "starts a new one)"
        )

    async def _forward(self, info: dict[str, Any]) -> dict[str, Any]:
        if self.cluster is not None:  # the cluster's own provider reaches its master: its key, user and known_hosts
            from globular.registry import make_provider

            record, home = self.cluster
            self.provider = make_provider(record.spec, cluster=record.name, home=home)
            if self.key:
                self.provider.login_with(self.key)
            self.runner = self.provider.runner(record.master)
            return await reachable_info(self.runner, info, self.far)
        conn = await self._connection()

        async def forward(host: str, port: int) -> int:
            listener = await conn.forward_local_port("127.0.0.1", 0, host, port)
            self.far[listener.get_port()] = (host, port)
            return listener.get_port()

        forwarded = await forwarded_info(info, forward)
        log.debug("controller %s ports forwarded through %s", info.get("interface"), self.host)
        return forwarded

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
            reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
            raise TunnelError(f"cannot reach {self.host}: {reason}") from None
        return self.conn

    def close(self) -> None:
        if self.thread.loop.is_closed():
            return
        try:
            self.thread.call(self._close(), 10)
        except (TimeoutError, OSError, asyncssh.Error) as exc:
            log.debug("closing the tunnel to %s: %s", self.host, exc)
        finally:
            self.thread.close()

    async def _close(self) -> None:
        conn, self.conn = self.conn, None
        if self.provider is not None:
            await self.provider.close()
        if conn is not None:
            conn.close()
            await conn.wait_closed()
