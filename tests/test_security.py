"""Security: private files, secrets never on a command line or in a log, a wrong key
runs nothing, and the controller cannot be reached from another network."""

from __future__ import annotations

import json
import secrets
import socket
import stat
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

import testhosts
from conftest import read_record, recorded_pids, wait_until

pytestmark = pytest.mark.cluster

CONFIG = (
    "[global]\ndefault_template = t\n"
    "[cluster t]\ncluster_size = 2\ncores_per_node = 1\nplugins = ipcluster\n"
    "[plugin ipcluster]\nsetup_class = ipcluster\nmaster_engines = 1\n{extra}"
)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def all_cmdlines() -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                found.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
            except OSError:
                continue
    return found


def test_private_files_and_no_secret_on_a_command_line_or_in_a_log(cli, home, write_config):
    config = str(write_config(CONFIG.format(extra="enable_notebook = True\n")))
    started = cli("-c", config, "start", "sec")
    assert started.returncode == 0, started.output
    try:
        record = read_record(home, "sec")
        conn = home / "ipcluster" / "sec-local.json"
        notebook = home / "ipcluster" / "sec-local-notebook.json"
        key = json.loads(conn.read_text())["key"]
        password = json.loads(notebook.read_text())["password"]
        assert len(key) >= 32 and len(password) >= 12
        # the one line that hands the password to the user
        assert sum(password in line for line in started.stdout.splitlines()) == 1
        assert key not in started.output

        master = Path(record["nodes"][0]["workdir"])
        private = [
            home / "clusters" / "sec.json",
            conn,
            notebook,
            master / ".ipython" / "profile_default" / "security" / "globular-session.key",
            master / ".ipython" / "profile_default" / "security" / "ipcontroller-client.json",
            master / ".ipython" / "profile_default" / "security" / "ipcontroller-engine.json",
            master / "security" / "ipcontroller-engine.json",
            master / "jupyter" / "config" / "jupyter_server_config.json",
            master / "jupyter" / "tls" / "key.pem",
        ]
        for path in private:
            assert mode(path) == 0o600, path

        leaks = [c for c in all_cmdlines() if key in c or password in c]
        assert not leaks, leaks
        logs = [p for p in home.rglob("*") if p.is_file() and (p.suffix == ".log" or "logs" in p.parts)]
        assert any(p.name == "controller.log" for p in logs) and any(p.name == "notebook.log" for p in logs)
        for path in logs:
            text = path.read_text(errors="replace")
            assert key not in text and password not in text, path
    finally:
        stopped = cli("-c", config, "terminate", "-y", "sec")
    assert stopped.returncode == 0, stopped.output


def test_a_client_with_the_wrong_key_cannot_run_code(cli, home, tmp_path, write_config):
    import ipyparallel as ipp

    config = str(write_config(CONFIG.format(extra="")))
    assert cli("-c", config, "start", "keyed").returncode == 0
    try:
        conn = home / "ipcluster" / "keyed-local.json"
        info = json.loads(conn.read_text())
        forged = tmp_path / "forged.json"
        forged.write_text(json.dumps({**info, "key": secrets.token_hex(32)}))
        marker = tmp_path / "ran"
        with pytest.raises((TimeoutError, ipp.error.TimeoutError, OSError)):
            rc = ipp.Client(str(forged), timeout=5)
            try:  # if a connection were made at all, the code must still not run
                rc[:].apply_async(Path.touch, marker).get(5)
            finally:
                rc.close()
        assert not marker.exists()
        rc = ipp.Client(str(conn), timeout=20)  # the right key works
        try:
            assert wait_until(lambda: len(rc.ids) == 2, timeout=30)
        finally:
            rc.close()
    finally:
        stopped = cli("-c", config, "terminate", "-y", "keyed")
    assert stopped.returncode == 0, stopped.output


@pytest.mark.skipif(testhosts.available() is not None, reason=testhosts.available() or "")
def test_the_controller_is_not_reachable_from_another_network(cli, home, write_config):
    """An outside host (a netns routed to this machine through 198.18.0.249) reaches a
    listener on every interface here, but none of the controller's ports."""
    config = str(write_config(CONFIG.format(extra="")))
    assert cli("-c", config, "start", "walled").returncode == 0
    tag = secrets.token_hex(2)
    netns, veth = f"glbout{tag}", f"gvout{tag}"
    control = socket.socket()
    try:
        controller = psutil.Process(recorded_pids(read_record(home, "walled"), "ipcontroller")[0])
        procs = [controller, *controller.children(recursive=True)]
        listening = {c.laddr for p in procs for c in p.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
        assert listening and {addr.ip for addr in listening} == {"127.0.0.1"}, listening

        testhosts.sh("ip", "netns", "add", netns)
        testhosts.sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
        testhosts.sh("ip", "addr", "add", "198.18.0.249/30", "dev", veth)
        testhosts.sh("ip", "link", "set", veth, "up")
        testhosts.sh("ip", "-n", netns, "addr", "add", "198.18.0.250/30", "dev", "eth0")
        testhosts.sh("ip", "-n", netns, "link", "set", "eth0", "up")
        testhosts.sh("ip", "-n", netns, "route", "add", "default", "via", "198.18.0.249")

        control.bind(("0.0.0.0", 0))
        control.listen()
        ports = [control.getsockname()[1], *sorted(a.port for a in listening)]
        probe = (
            "import socket, sys, json\nout = []\n"
            "for port in map(int, sys.argv[1:]):\n"
            "    s = socket.socket(); s.settimeout(2)\n"
            "    out.append(s.connect_ex(('198.18.0.249', port)) == 0); s.close()\n"
            "print(json.dumps(out))\n"
        )
        done = subprocess.run(
            ["ip", "netns", "exec", netns, sys.executable, "-c", probe, *map(str, ports)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        reached = json.loads(done.stdout)
        assert reached[0] is True  # the outside host does reach this machine
        assert not any(reached[1:]), dict(zip(ports[1:], reached[1:]))
    finally:
        control.close()
        testhosts.sh("ip", "netns", "del", netns, check=False)
        testhosts.sh("ip", "link", "del", veth, check=False)
        stopped = cli("-c", config, "terminate", "-y", "walled")
    assert stopped.returncode == 0, stopped.output


def test_a_client_is_told_what_is_wrong_with_its_connection_file_or_key(tmp_path, caplog):
    """Each error names the file and what to do, in globular's words (no bare ValueError, no
    KeyImportError, no blame on known_hosts for an empty file); a key others can read is
    refused as OpenSSH refuses it; a connection file others can read is used, with a warning."""
    import logging
    import os

    import asyncssh

    from globular import Client
    from globular.ipcluster.client import ConnectionFileError, TunnelError

    good = {"interface": "tcp://127.0.0.1", "registration": 1, "key": "k", "ssh": ""}

    def written(content, mode=0o600) -> Path:
        path = tmp_path / f"conn-{secrets.token_hex(3)}.json"
        path.write_text(content if isinstance(content, str) else json.dumps(content))
        path.chmod(mode)
        return path

    for content, said in [
        ({**good, "registration": "not-a-port"}, "registration is 'not-a-port', not a port number (1-65535)"),
        ({}, "has no interface, registration, key: not a client connection file; a client connection file is"),
        ([1, 2], "holds no connection info"),
        ("{not json", "is not JSON"),
        ({**good, "interface": "10.0.0.5"}, "interface is '10.0.0.5', not an address like tcp://10.0.0.5"),
    ]:
        path = written(content)
        with pytest.raises(ConnectionFileError) as caught:
            Client(str(path), sshkey=str(tmp_path / "whatever"), timeout=1)
        assert str(path) in str(caught.value) and said in str(caught.value), caught.value
    with pytest.raises(ConnectionFileError, match="not found. Is a controller running"):
        Client(str(tmp_path / "missing.json"), sshkey=str(tmp_path / "whatever"), timeout=1)

    key = tmp_path / "id_test"
    key.write_text(asyncssh.generate_private_key("ssh-ed25519").export_private_key().decode())
    key.chmod(0o644)
    passwd = tmp_path / "passwd"
    passwd.write_text(Path("/etc/passwd").read_text())
    passwd.chmod(0o600)
    locked = tmp_path / "id_locked"
    locked.write_bytes(asyncssh.generate_private_key("ssh-ed25519").export_private_key("pkcs8-pem", passphrase="p"))
    locked.chmod(0o600)
    conn = written(good)
    for sshkey, said in [
        (key, f"sshkey {key} is readable by others (0644), so ssh would refuse it too; chmod 600 {key}"),
        (passwd, f"sshkey {passwd}: not a private key (OpenSSH, PEM or PKCS#8)"),
        (locked, f"sshkey {locked}: it has a passphrase: load it into ssh-agent"),
        (tmp_path / "nokey", f"sshkey {tmp_path / 'nokey'} does not exist"),
    ]:
        with pytest.raises(TunnelError) as caught:
            Client(str(conn), sshserver="root@198.18.0.99", sshkey=str(sshkey), timeout=1)
        assert str(caught.value) == said

    shared = written(good, 0o644)
    caplog.set_level(logging.WARNING)
    with pytest.raises(TunnelError):  # read, with a warning, then the (refused) key
        Client(str(shared), sshserver="root@198.18.0.99", sshkey=str(key), timeout=1)
    assert f"connection file {shared} is readable by others (0644)" in caplog.text
    assert os.stat(shared).st_mode & 0o777 == 0o644  # told, not changed
