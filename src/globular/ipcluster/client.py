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

How it gets there (:mod:`globular.ipcluster.tunnel`): for a file that globular wrote (it
names its cluster, and the cluster's record holds the same session key), the cluster's own
provider reaches the master, as ``globular.connect`` does: over SSH with ``sshkey`` when given,
else the cluster's own key, user and known_hosts; a node entered by a command through the node
programs; a master this machine reaches directly, directly.  For any other file (a plain
ipcontroller's), an SSH connection with ``~/.ssh/config``, your agent and default keys, and
``~/.ssh/known_hosts``.  A host key that is not known is refused.

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

import ipyparallel

from globular.errors import GlobularError
from globular.ipcluster.controller import CLUSTER_KEY, PORT_KEYS, record_data, with_serverkey
from globular.ipcluster.tunnel import ProviderTunnel, SSHTunnel, Tunnel, TunnelError
from globular.ipcluster.watch import ControllerWatch, HandshakeWatch, watch_controller
from globular.paths import globular_home
from globular.state import ClusterRecord, StateStore

log = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "localhost", "::1")


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
        self._globular_tunnel: Tunnel | None = None
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
        tunnel: Tunnel | None = None
        if cluster is not None:  # its own provider reaches its master: with its key, user and known_hosts
            tunnel = ProviderTunnel.reaching(cluster, sshkey, timeout)
        else:
            server = _ssh_server(info, sshserver, sshkey, password)
            if server is not None:
                tunnel = SSHTunnel(server, sshkey=sshkey, password=password, timeout=timeout)
        # ipyparallel connects to a controller it reaches directly (here, or through the tunnel's
        # ports on 127.0.0.1): every socket gets the CURVE keys
        if tunnel is None:
            super().__init__(info, timeout=timeout, **kwargs)
        else:
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
            via = f" (through {tunnel.via})" if tunnel is not None else ""
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


__all__ = ["Client", "ConnectionFileError", "TunnelError", "connect"]
