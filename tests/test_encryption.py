"""Encrypted cluster traffic (CurveZMQ), on the netns test hosts.

The engines of node001 talk to the controller on the master across the test
bridge.  A raw AF_PACKET socket on node001's port of that bridge sees every frame: with
``encryption = curve`` (the default for ssh nodes) a random marker sent to the
engines and returned by them appears in no frame; with ``encryption = none``
the same sniffer finds it, which proves that it works.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

import testhosts
from conftest import bare_hosts, share_env_cache

reason = testhosts.available()
pytestmark = [pytest.mark.cluster, pytest.mark.skipif(reason is not None, reason=reason or "")]

ETH_P_ALL = 0x0003


@pytest.fixture(scope="module")
def net(tmp_path_factory, bare_python, env_cache):
    with bare_hosts(tmp_path_factory.mktemp("curvehosts"), 2, bare_python, env_cache) as hosts:
        yield hosts


def config(net, tmp_path, *, python: str | None = None, cluster: str = "", ipcluster: str = "") -> str:
    share_env_cache(net.env_cache, tmp_path / "globular-home", tmp_path / "hosts")
    path = tmp_path / "config"
    path.write_text(
        "[global]\ndefault_template = lab\n[cluster lab]\nprovider = ssh\n"
        f"node_hosts = {', '.join(f'root@{h.address}' for h in net.hosts)}\n"
        f"ssh_key = {net.key}\nknown_hosts = {net.known_hosts}\npython = {python or net.python}\n"
        f"remote_dir = {tmp_path / 'hosts'}\ncores_per_node = 1\nconnect_timeout = 3\nplugins = ipcluster\n{cluster}"
        f"[plugin ipcluster]\nsetup_class = ipcluster\nmaster_engines = 0\n{ipcluster}"
    )
    return str(path)


class Sniffer:
    """Every frame crossing ``interface`` while it runs (a raw socket: root only)."""

    def __init__(self, interface: str):
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.sock.bind((interface, 0))
        self.sock.settimeout(0.2)
        self.frames: list[bytes] = []
        self.running = True
        self.thread = threading.Thread(target=self._read, daemon=True)

    def _read(self) -> None:
        while self.running:
            try:
                self.frames.append(self.sock.recv(65535))
            except TimeoutError:
                continue
            except OSError:
                return

    def __enter__(self) -> Sniffer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        time.sleep(0.5)  # the last replies' frames
        self.running = False
        self.thread.join(5)
        self.sock.close()

    def seen(self, marker: bytes) -> bool:
        return any(marker in frame for frame in self.frames)


def echo(marker: str) -> str:
    return marker[::-1]  # the result carries it too, reversed


echo.__module__ = "__main__"  # sent by value


@pytest.mark.parametrize("encryption", ["curve", "none"])
def test_a_marker_crosses_the_network_only_without_encryption(net, cli, home, tmp_path, encryption):
    from globular import Client

    path = config(net, tmp_path, ipcluster="" if encryption == "curve" else "encryption = none\n")
    started = cli("-c", path, "start", "sniffed", timeout=600)
    try:
        assert started.returncode == 0, started.output
        shown = "encrypted (CurveZMQ)" if encryption == "curve" else "signed, not encrypted"
        assert shown in started.stdout
        status = cli("status", "sniffed")
        assert ("traffic encrypted (CurveZMQ)" if encryption == "curve" else "traffic not encrypted") in status.stdout
        # the seed's line, with globular's Client: tunnelled through SSH, every socket with the keys
        client = Client(str(home / "ipcluster" / "sniffed-ssh.json"), sshkey=str(net.key))
        try:
            assert client._globular_tunnel is not None
            assert len(client.ids) == 1  # node001's engine: across the bridge from the controller
            marker = secrets.token_hex(16)
            # node001's side of the bridge: every frame between it and the master (frames the
            # bridge forwards from port to port never reach the bridge device itself)
            with Sniffer(net.veth(2)) as sniffer:
                answer = client[:].apply_sync(echo, marker)
                client[:].push({"payload": marker * 4}, block=True)
                pulled = client[:].pull("payload", block=True)
            assert answer == [marker[::-1]] and pulled == [marker * 4]
            assert len(sniffer.frames) > 10, "the sniffer saw nothing"
            found = (sniffer.seen(marker.encode()), sniffer.seen(marker[::-1].encode()))
            assert found == ((False, False) if encryption == "curve" else (True, True)), (encryption, found)
        finally:
            client.close()
        if encryption == "curve":
            check_curve_secret_is_nowhere(net, home, tmp_path)
            check_clients_without_the_keys_get_no_answer(home)
        assert cli("terminate", "-y", "sniffed").returncode == 0
    finally:
        if (home / "clusters" / "sniffed.json").exists():
            cli("terminate", "-y", "sniffed")


def check_curve_secret_is_nowhere(net, home: Path, tmp_path: Path) -> None:
    """The controller's secret key is in its 0600 config file on the master, and nowhere else."""
    import stat

    (config_file,) = (tmp_path / "hosts" / "sniffed" / "master").rglob("ipcontroller_config.py")
    assert stat.S_IMODE(config_file.stat().st_mode) == 0o600
    secret = next(line for line in config_file.read_text().splitlines() if "curve_secretkey" in line)
    secret = secret.split("=", 1)[1].strip()[2:-1]  # b'...'
    assert len(secret) == 40
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            for part in ("cmdline", "environ"):
                try:
                    data = Path(f"/proc/{pid}/{part}").read_bytes()
                except OSError:
                    continue
                assert secret.encode() not in data, (pid, part)
    for folder in (home, tmp_path / "hosts"):
        for path in folder.rglob("*"):
            if path.is_file() and path != config_file and not path.is_symlink():
                assert secret.encode() not in path.read_bytes(), path


def check_clients_without_the_keys_get_no_answer(home: Path) -> None:
    """Straight to the controller (the test machine is on the bridge): a client that has the
    session key but not the server's public key, or a wrong one, or the right one and a wrong
    session key, gets no answer."""
    import zmq
    from ipyparallel import Client

    info = json.loads((home / "ipcluster" / "sniffed-ssh.json").read_text())
    assert "curve_serverkey" not in info  # kept where ipyparallel's own tunnelling Client cannot use it
    info["curve_serverkey"] = info.pop("globular_curve_serverkey")
    info["ssh"] = ""
    no_curve = {k: v for k, v in info.items() if k != "curve_serverkey"}
    wrong_curve = dict(info, curve_serverkey=zmq.curve_keypair()[0].decode())
    wrong_key = dict(info, key=secrets.token_hex(32))
    for bad in (no_curve, wrong_curve, wrong_key):
        with pytest.raises(TimeoutError):
            Client(bad, timeout=4)
    good = Client(info, timeout=10)  # and the real file works from here too
    try:
        assert len(good.ids) == 1
    finally:
        good.close()


def test_a_node_whose_pyzmq_cannot_encrypt_is_named(net, cli, home, tmp_path):
    """node001's Python imports a pyzmq without CURVE (a stand-in first on its path)."""
    shadow = tmp_path / "shadow" / "zmq"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("def has(feature):\n    return False\n")
    wrapper = tmp_path / "python"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'case "$(ip -4 -o addr show dev eth0 2>/dev/null)" in *{net.hosts[1].address}/*) export PYTHONPATH={shadow.parent} ;; esac\n'
        f'exec {sys.executable} "$@"\n'
    )
    wrapper.chmod(0o755)
    path = config(net, tmp_path, python=str(wrapper), cluster="environment = system\n")
    result = cli("-c", path, "start", "nocurve", timeout=300)
    assert result.returncode == 1, result.output
    assert "node001: encryption = curve needs pyzmq with CURVE support" in result.stderr
    assert "master:" not in result.stderr
    assert not (home / "clusters" / "nocurve.json").exists()
