"""The ssh provider on real hosts: network namespaces with their own sshd (tests/testhosts.py).

The hosts run a bare Python (the ``bare_python`` fixture: the standard library
only), so globular builds each node's environment, as on a stranger's machine;
the tests that are not about building it share one (``share_env_cache``).  The
hosts share this machine's file system, and each test's node folders live under
its tmp_path (the leak check in conftest finds any process left running there).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import subprocess
import sys
import time

import psutil
import pytest

import testhosts
from conftest import (
    bare_hosts,
    check_notebook_forward,
    engine_python,
    read_record,
    recorded_pids,
    share_env_cache,
    wait_until,
)

reason = testhosts.available()
pytestmark = [pytest.mark.cluster, pytest.mark.skipif(reason is not None, reason=reason or "")]


@pytest.fixture(scope="module")
def net(tmp_path_factory, bare_python, env_cache):
    with bare_hosts(tmp_path_factory.mktemp("hostnet"), 4, bare_python, env_cache) as hosts:
        yield hosts


def ssh_config(
    net,
    tmp_path,
    *,
    hosts: str | None = None,
    python: str | None = None,
    extra: str = "",
    ipcluster: str = "",
    shared_env: bool = True,
) -> str:
    """A config for ``lab`` on the test hosts, with their bare Python; ``shared_env``: the
    environment (and wheelhouse) is the one the other tests use, built once."""
    hosts = hosts or ", ".join(f"root@{h.address}" for h in net.hosts[:3])
    python = python or net.python
    if shared_env:
        share_env_cache(net.env_cache, tmp_path / "globular-home", tmp_path / "hosts")
    path = tmp_path / "config"
    path.write_text(
        "[global]\ndefault_template = lab\n"
        "[cluster lab]\nprovider = ssh\n"
        f"node_hosts = {hosts}\n"
        f"ssh_key = {net.key}\nknown_hosts = {net.known_hosts}\n"
        f"python = {python}\nremote_dir = {tmp_path / 'hosts'}\n"
        f"cores_per_node = 1\nconnect_timeout = 3\nplugins = ipcluster\n{extra}"
        f"[plugin ipcluster]\nsetup_class = ipcluster\n{ipcluster}"
    )
    return str(path)


def portable(f):
    """``f``, sent by value: the hosts cannot import the tests' modules."""
    f.__module__ = "__main__"
    return f


def engine_addresses(view) -> list[str]:
    """The address each engine's host has on the test network (sorted)."""

    def address() -> str:  # defined here so that it travels by value, not as tests' module
        import socket

        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("198.18.0.1", 9))
            return s.getsockname()[0]

    return sorted(view.apply_sync(portable(address)))


def remote_processes(net, folder) -> list[str]:
    """Processes on any host whose command line mentions ``folder`` (asked over ssh)."""
    found = []
    for host in net.hosts:
        out = net.ssh(host, "ps -eo pid,args")
        assert out.returncode == 0, out.stderr
        found += [
            f"{host.name}: {line}" for line in out.stdout.splitlines() if str(folder) in line and "ps -eo" not in line
        ]
    return found


def run_laptop_client(net, tmp_path, connection_file, code: str | None = None) -> subprocess.CompletedProcess:
    """``Client(path, sshkey=key)`` in a fresh process whose ssh knows the hosts' key.

    The process runs in a private mount namespace where /etc/ssh/ssh_config
    points ssh at the test known_hosts, so nothing of this machine's ssh setup
    is touched.  It ignores SIGHUP: pyzmq's openssh tunnel backgrounds
    ``ssh -f`` under a pty that pexpect closes, and the forked ssh is killed by
    that SIGHUP before it detaches (docs/connecting.md, "Connecting from your laptop").
    """
    config = tmp_path / "ssh_config"
    config.write_text(f"Host *\n  UserKnownHostsFile {net.known_hosts}\n  StrictHostKeyChecking yes\n  BatchMode yes\n")
    code = code or (
        "import signal, sys, json\n"
        "signal.signal(signal.SIGHUP, signal.SIG_IGN)\n"
        "from ipyparallel import Client\n"
        f"rc = Client({str(connection_file)!r}, sshkey={str(net.key)!r}, timeout=20)\n"
        "out = {'ssh': rc._ssh, 'ids': rc.ids, 'squares': rc[:].map_sync(lambda x: x * x, range(10))}\n"
        "rc.close()\n"
        "print(json.dumps(out))\n"
    )
    env = dict(os.environ, GLOBULAR_LAPTOP_TEST=str(tmp_path))
    try:
        return subprocess.run(
            [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                f'mount --bind {config} /etc/ssh/ssh_config && exec {sys.executable} -c "$0"',
                code,
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
            cwd=tmp_path,
        )
    finally:  # the tunnel's `ssh -f` processes outlive the client by design: stop them by pid
        for proc in psutil.process_iter(["pid"]):
            try:
                if proc.environ().get("GLOBULAR_LAPTOP_TEST") == str(tmp_path):
                    proc.kill()
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                pass


def test_three_host_cluster_grows_shrinks_restarts_and_leaves_nothing(net, cli, home, tmp_path):

    config = ssh_config(
        net,
        tmp_path,
        hosts=", ".join(f"root@{h.address}" for h in net.hosts[:3]),
        ipcluster="controller_interface = eth0\ncontroller_ports = 20100-20140\nenable_notebook = true\n",
    )
    started = cli("-c", config, "start", "lab")
    assert started.returncode == 0, started.output
    try:
        check_lab_cluster(net, cli, home, tmp_path, config)
    finally:
        if (home / "clusters" / "lab.json").exists():
            cli("terminate", "-y", "lab")


def check_lab_cluster(net, cli, home, tmp_path, config) -> None:
    from globular import connect

    record = read_record(home, "lab")
    assert [(n["name"], n["address"]) for n in record["nodes"]] == [
        ("master", "198.18.0.11"),
        ("node001", "198.18.0.12"),
        ("node002", "198.18.0.13"),
    ]
    local_file = home / "ipcluster" / "lab-ssh.json"
    info = json.loads(local_file.read_text())
    assert stat.S_IMODE(local_file.stat().st_mode) == 0o600
    assert info["ssh"] == "root@198.18.0.11:22"
    assert info["interface"] == "tcp://198.18.0.11"  # eth0 of the master, not 0.0.0.0
    ports = [info[k] for k in ("registration", "control", "mux", "task", "iopub", "notification", "broadcast")]
    assert all(20100 <= p <= 20140 for p in ports), ports
    # nothing listens on every interface: the controller's outward ports are on
    # the master's address, in the range; its internal ones on loopback
    listening = net.ssh(net.hosts[0], "ss -ltnH")
    assert listening.returncode == 0, listening.stderr
    addresses = [line.split()[3].rsplit(":", 1) for line in listening.stdout.splitlines()]
    notebook_port = json.loads((home / "ipcluster" / "lab-ssh-notebook.json").read_text())["port"]
    outward = [(a, int(p)) for a, p in addresses if a != "127.0.0.1" and p != "22"]
    assert ("198.18.0.11", notebook_port) in outward
    outward.remove(("198.18.0.11", notebook_port))
    assert outward and all(a == "198.18.0.11" and 20100 <= p <= 20140 for a, p in outward), listening.stdout

    status = cli("status", "lab", "--output", "json")  # asked of the hosts and the controller, over ssh
    assert status.returncode == 0, status.output
    report = json.loads(status.stdout)["result"]
    assert report["ok"] and report["controller"] == "up"
    assert [(n["name"], n["state"], n["engines_registered"]) for n in report["nodes"]] == [
        ("master", "registered", 1),
        ("node001", "registered", 1),
        ("node002", "registered", 1),
    ]
    assert all("ssh" in n["steps"] for n in report["nodes"])
    assert all("env" in n["steps"] or "env cached" in n["steps"] for n in report["nodes"]), report["nodes"]

    client = connect("lab")  # tunnels over globular's own ssh connection
    try:
        assert len(client.ids) == 3
        assert engine_addresses(client[:]) == ["198.18.0.11", "198.18.0.12", "198.18.0.13"]
        assert client[:].map_sync(portable(lambda x: x**30), range(16)) == [x**30 for x in range(16)]
        # the hosts' Python is bare: the engines run from the environment globular built
        import ipyparallel

        def environment() -> tuple[str, str, str]:
            import sys

            import ipyparallel

            return sys.prefix, sys.base_prefix, ipyparallel.__version__

        envs = os.path.realpath(net.env_cache / "envs")
        for prefix, base_prefix, version in client[:].apply_sync(portable(environment)):
            assert os.path.realpath(prefix).startswith(envs + "/"), (prefix, envs)
            assert prefix != base_prefix and version == ipyparallel.__version__

        from IPython.core.interactiveshell import InteractiveShell

        shell = InteractiveShell.instance()
        client[:].activate()  # %px on this shell, through the tunnel globular.connect holds
        shell.run_cell(
            "%px import socket; probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)", store_history=False
        ).raise_error()
        shell.run_cell(
            "%px probe.connect(('198.18.0.1', 9)); here = probe.getsockname()[0]", store_history=False
        ).raise_error()
        assert sorted(client[:]["here"]) == ["198.18.0.11", "198.18.0.12", "198.18.0.13"]

        shown = cli("sshmaster", "lab", "echo $SSH_CONNECTION; pwd")
        assert shown.returncode == 0, shown.output
        assert shown.stdout.split()[2] == "198.18.0.11"
        assert shown.stdout.split()[4] == str(tmp_path / "hosts" / "lab" / "master")
        assert cli("sshnode", "lab", "node002", "exit 7").returncode == 7

        full = cli("-c", config, "addnode", "lab")
        assert full.returncode == 2, full.output  # the rule start checks its size with, before anything changes
        assert "the cluster would have 4 nodes; 4 nodes asked for, but there are only 3 hosts" in full.stderr
        assert "addnode --host" in full.stderr
        added = cli("addnode", "-H", f"root@{net.hosts[3].address}", "lab")
        assert added.returncode == 0, added.output
        assert "Added node003 to lab" in added.stdout
        assert wait_until(lambda: len(client.ids) == 4)  # the connected client sees it, no reconnect
        assert "198.18.0.14" in engine_addresses(client[:])

        removed = cli("removenode", "lab", "node001")
        assert removed.returncode == 0, removed.output
        assert wait_until(lambda: len(client.ids) == 3)
        assert engine_addresses(client[:]) == ["198.18.0.11", "198.18.0.13", "198.18.0.14"]
        assert not (tmp_path / "hosts" / "lab" / "node001").exists()

        old_ids = set(client.ids)
        old_pids = recorded_pids(read_record(home, "lab"), "ipengine")
        restarted = cli("runplugin", "ipclusterrestart", "lab")
        assert restarted.returncode == 0, restarted.output
        assert "restarting engines (nodes): 3/3" in restarted.stderr
        assert wait_until(lambda: len(client.ids) == 3 and not set(client.ids) & old_ids)
        assert not set(recorded_pids(read_record(home, "lab"), "ipengine")) & set(old_pids)
        assert client[:].map_sync(portable(lambda x: x + 1), range(6)) == list(range(1, 7))
    finally:
        client.close()

    check_notebook_forward(home, "lab", "ssh", "198.18.0.11", 3)

    pids = recorded_pids(read_record(home, "lab"))
    done = cli("terminate", "-y", "lab")
    assert done.returncode == 0, done.output
    assert not remote_processes(net, tmp_path / "hosts")
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)
    assert not (tmp_path / "hosts" / "lab").exists()
    assert not local_file.exists()
    assert not (home / "clusters" / "lab.json").exists()


LAPTOP_CHECKS = """
import json, signal, threading, psutil
out = {"map": view.map_sync(lambda x: x**30, range(8)), "tunnelled": rc._globular_tunnel is not None}
rc.close()
again = Client(PATH)  # no key given: the cluster's own, from its record
out["again"] = again[:].apply_sync(lambda: 7)
again.close()
me = psutil.Process()
out["left"] = {
    "threads": sorted(t.name for t in threading.enumerate() if t is not threading.main_thread()),
    "children": [c.pid for c in me.children(recursive=True)],
    "listening": [c.laddr.port for c in me.net_connections() if c.status == psutil.CONN_LISTEN],
}
print(json.dumps(out))
"""


def connect_lines(output: str) -> list[str]:
    """The lines `start` printed under "Connect with:"."""
    lines = output.splitlines()
    start = lines.index("Connect with:") + 1
    return [line.strip() for line in lines[start:] if line.startswith("  ")]


def test_the_line_start_prints_connects_from_a_laptop_every_time_encrypted(net, cli, home, tmp_path):
    """The exact lines under "Connect with:" (``from globular import Client``, the seed's
    ``Client(path, sshkey=...)``), in a fresh Python 20 times in a row, default encryption
    (curve): each connects through globular's own SSH tunnel and leaves nothing behind (no
    thread, no child process, no listener).  A file that is not globular's works through
    ``sshserver=`` with ~/.ssh/known_hosts, and an unknown host key there is refused."""
    config = ssh_config(net, tmp_path, hosts=", ".join(f"root@{h.address}" for h in net.hosts[:2]))
    started = cli("-c", config, "start", "lab")
    try:
        assert started.returncode == 0, started.output
        assert "encrypted (CurveZMQ)" in started.stdout
        path = home / "ipcluster" / "lab-ssh.json"
        printed = connect_lines(started.stdout)
        assert printed[:2] == ["from globular import Client", f"rc = Client({str(path)!r}, sshkey={str(net.key)!r})"]
        # SIGHUP as a fresh terminal's Python has it (a CI runner may hand it down ignored):
        # nothing here protects against pyzmq's ssh tunnel race, which globular's Client avoids
        code = "import signal\nsignal.signal(signal.SIGHUP, signal.SIG_DFL)\n"
        code += "\n".join(line for line in printed if not line.startswith("#"))
        code += f"\nPATH = {str(path)!r}\n" + LAPTOP_CHECKS
        expected = [x**30 for x in range(8)]
        for attempt in range(20):
            run = subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path
            )
            assert run.returncode == 0, (attempt, run.stderr[-3000:])
            seen = json.loads(run.stdout.strip().splitlines()[-1])
            assert seen["map"] == expected and seen["tunnelled"] and seen["again"] == [7, 7], (attempt, seen)
            assert seen["left"] == {"threads": [], "children": [], "listening": []}, (attempt, seen["left"])
        # a plain ipcontroller's file (no cluster named): sshserver=, ~/.ssh/known_hosts of the user
        foreign = json.loads(path.read_text())
        del foreign["globular_cluster"]
        foreign_file = tmp_path / "foreign.json"
        foreign_file.write_text(json.dumps(foreign))
        laptop_home = tmp_path / "laptop-home"
        (laptop_home / ".ssh").mkdir(parents=True)
        known = laptop_home / ".ssh" / "known_hosts"
        code = (
            "from globular import Client\n"
            f"rc = Client({str(foreign_file)!r}, sshserver='root@{net.hosts[0].address}', sshkey={str(net.key)!r})\n"
            "print(rc[:].apply_sync(lambda: 5)); rc.close()\n"
        )
        env = dict(os.environ, HOME=str(laptop_home))
        known.write_text(net.known_hosts.read_text())
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
        assert run.returncode == 0 and run.stdout.strip() == "[5, 5]", run.stderr[-3000:]
        known.write_text("")
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
        assert run.returncode == 1
        assert f"TunnelError: cannot trust root@{net.hosts[0].address}: its host key is not in {known}" in run.stderr
        # ipyparallel's own Client cannot tunnel an encrypted cluster: it fails at once, it does
        # not hang (the file keeps the server key where that Client does not look)
        plain = (
            "import signal, time\n"
            "signal.signal(signal.SIGHUP, signal.SIG_IGN)\n"  # its tunnel's own race is not what this checks
            "from ipyparallel import Client\n"
            "began = time.monotonic()\n"
            "try:\n"
            f"    Client({str(path)!r}, sshkey={str(net.key)!r}, timeout=5)\n"
            "except TimeoutError as exc:\n"
            "    print('failed', round(time.monotonic() - began), exc)\n"
        )
        run = run_laptop_client(net, tmp_path, path, code=plain)
        assert run.returncode == 0 and run.stdout.startswith("failed"), run.stdout + run.stderr[-3000:]
        assert int(run.stdout.split()[1]) < 30 and "Hub connection request timed out" in run.stdout
        assert cli("terminate", "-y", "lab").returncode == 0
    finally:
        if (home / "clusters" / "lab.json").exists():
            cli("terminate", "-y", "lab")


def test_a_laptop_client_through_ipyparallels_own_ssh_tunnel(net, cli, home, tmp_path):
    """``Client(path, sshkey=...)``: ipyparallel tunnels each socket with ssh itself.  Its tunnel
    does not give the tunnelled sockets the CURVE keys (ipyparallel's Client._connect), so this
    path needs encryption = none (docs/connecting.md, "Connecting from your laptop")."""
    config = ssh_config(
        net, tmp_path, hosts=", ".join(f"root@{h.address}" for h in net.hosts[:2]), ipcluster="encryption = none\n"
    )
    started = cli("-c", config, "start", "lab")
    try:
        assert started.returncode == 0, started.output
        laptop = run_laptop_client(net, tmp_path, home / "ipcluster" / "lab-ssh.json")
        assert laptop.returncode == 0, laptop.stderr
        seen = json.loads(laptop.stdout.strip().splitlines()[-1])
        assert seen["ssh"] is True and len(seen["ids"]) == 2
        assert seen["squares"] == [x * x for x in range(10)]
        assert cli("terminate", "-y", "lab").returncode == 0
    finally:
        if (home / "clusters" / "lab.json").exists():
            cli("terminate", "-y", "lab")


def test_unreachable_host_fails_start_in_bounded_time_and_cleans_the_others(net, cli, home, tmp_path):
    config = ssh_config(
        net, tmp_path, hosts=f"root@{net.hosts[0].address}, root@198.18.0.99, root@{net.hosts[1].address}"
    )
    started = time.monotonic()
    result = cli("-c", config, "start", "bad")
    elapsed = time.monotonic() - started
    assert result.returncode == 1
    assert "node001" in result.stderr and "198.18.0.99" in result.stderr
    assert elapsed < 20, elapsed  # connect_timeout = 3
    assert not remote_processes(net, tmp_path / "hosts")
    assert not (tmp_path / "hosts" / "bad").exists()
    assert not (home / "clusters" / "bad.json").exists()


def test_a_node_that_dies_during_start_fails_it_and_terminate_cleans_up_after(net, cli, home, tmp_path):
    """node002's network goes down a second after its engine starts (the host is gone
    as far as anyone can tell): start fails naming it, within keepalive time; the
    processes it cannot reach stay recorded, and once the host is back `terminate`
    stops every one of them."""
    wrapper = engine_python(
        tmp_path, 'if [ "$GLOBULAR_NODE" = node002 ]; then sleep 1; ip link set eth0 down; exec sleep 300; fi'
    )
    config = ssh_config(
        net, tmp_path, python=str(wrapper), extra="environment = system\n", ipcluster="engine_timeout = 120\n"
    )
    victim = net.hosts[2]
    started = time.monotonic()
    try:
        result = cli("-c", config, "start", "-s", "3", "dies", timeout=240)
        elapsed = time.monotonic() - started
        assert result.returncode == 1, result.output
        assert "node002" in result.stderr, result.stderr
        assert elapsed < 90, elapsed  # keepalive: 3 x connect_timeout (3 s), then the cleanup's tries
        record = read_record(home, "dies")  # kept: node002's processes could not be stopped
        assert record["status"] == "failed"
        assert "globular terminate dies" in result.stderr
        stranded = next(n for n in record["nodes"] if n["name"] == "node002")["processes"]
        assert stranded, record
        listing = cli("-c", config, "listclusters")
        assert "dies" in listing.stdout and "failed" in listing.stdout
    finally:
        testhosts.sh("ip", "-n", victim.netns, "link", "set", "eth0", "up")
    stopped = cli("-c", config, "terminate", "-y", "dies")
    assert stopped.returncode == 0, stopped.output
    assert not remote_processes(net, tmp_path / "hosts")
    assert not (home / "clusters" / "dies.json").exists()


def test_a_host_without_the_python_named_fails_with_the_host_named(net, cli, home, tmp_path):
    config = ssh_config(net, tmp_path, python="/nonexistent/python3")
    result = cli("-c", config, "start", "nopy")
    assert result.returncode == 1
    assert "cannot run /nonexistent/python3" in result.stderr
    assert "root@198.18.0.11" in result.stderr
    assert not (home / "clusters" / "nopy.json").exists()


def test_preflight_names_each_node_that_cannot_run_engines_and_starts_nothing(net, cli, home, tmp_path):
    """node001's Python has ipyparallel 7.1.0 (a fake, first on its path); node002's lacks
    msgpack (packer = msgpack). `check` and `start` say so, one line a node; nothing runs."""
    fake = tmp_path / "fake-site"
    (fake / "ipyparallel").mkdir(parents=True)
    (fake / "ipyparallel" / "__init__.py").write_text("__version__ = '7.1.0'\n")
    (fake / "ipyparallel-7.1.0.dist-info").mkdir()
    (fake / "ipyparallel-7.1.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: ipyparallel\nVersion: 7.1.0\n"
    )
    (fake / "ipyparallel-7.1.0.dist-info" / "RECORD").write_text("")
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "msgpack.py").write_text("raise ImportError('No module named msgpack (test shadow)')\n")
    wrapper = tmp_path / "python"
    wrapper.write_text(
        "#!/bin/sh\n"
        "me=$(ip -4 -o addr show dev eth0 2>/dev/null)\n"
        f'case "$me" in *{net.hosts[1].address}/*) export PYTHONPATH={fake} ;; *{net.hosts[2].address}/*) export PYTHONPATH={shadow} ;; esac\n'
        f'exec {sys.executable} "$@"\n'
    )
    wrapper.chmod(0o755)
    config = ssh_config(
        net, tmp_path, python=str(wrapper), extra="environment = system\n", ipcluster="packer = msgpack\n"
    )
    checked = cli("-c", config, "check", "pre", "--output", "json")
    assert checked.returncode == 1, checked.output
    checks = {c["node"]: c for c in json.loads(checked.stdout)["result"]["checks"]}
    assert checks["master"]["ok"] and checks["master"]["controller_reachable"] is True
    assert checks["node001"]["modules"]["ipyparallel"] == "7.1.0"
    assert any("ipyparallel 7.1.0 there" in p and "major versions differ" in p for p in checks["node001"]["problems"])
    assert any("packer = msgpack needs the msgpack package" in p for p in checks["node002"]["problems"])
    assert not (home / "clusters" / "pre.json").exists()

    result = cli("-c", config, "start", "pre")
    assert result.returncode == 1, result.output
    assert "preflight failed, nothing was started" in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith(("node001:", "node002:", "master:"))]
    assert [line.split(":")[0] for line in lines] == ["node001", "node002"], result.stderr
    assert not remote_processes(net, tmp_path / "hosts")
    assert not (home / "clusters" / "pre.json").exists()


def test_preflight_finds_a_controller_address_the_nodes_cannot_reach(net, cli, home, tmp_path):
    config = ssh_config(net, tmp_path, ipcluster="controller_interface = 127.0.0.1\n")
    result = cli("-c", config, "start", "-s", "2", "lo")
    assert result.returncode == 1, result.output
    assert "node001: cannot reach the controller's address 127.0.0.1:" in result.stderr
    assert "master:" not in result.stderr  # the master reaches its own loopback
    assert not remote_processes(net, tmp_path / "hosts")
    assert not (home / "clusters" / "lo.json").exists()


def test_with_environment_system_a_host_whose_python_lacks_ipyparallel_is_named(net, cli, home, tmp_path):
    config = ssh_config(net, tmp_path, extra="environment = system\n")  # the bare Python, used as it is
    result = cli("-c", config, "start", "bare")
    assert result.returncode == 1, result.output
    assert "ipyparallel is not installed" in result.stderr and "master" in result.stderr
    assert "drop environment = system" in result.stderr
    assert not remote_processes(net, tmp_path / "hosts")


def provider(net, tmp_path, **settings):
    from globular.providers.ssh import SSHProvider
    from globular.spec import ClusterSpec

    values = {"node_hosts": [f"root@{net.hosts[0].address}"], "ssh_key": str(net.key), "connect_timeout": 3, **settings}
    spec = ClusterSpec(template="t", cluster_size=1, provider="ssh", provider_settings=values)
    return SSHProvider(spec, cluster="keys", home=tmp_path)


def connect_once(prov) -> str:
    from globular.providers.ssh_settings import SSHHost

    async def go():
        conn = await prov.connect(SSHHost.parse(prov.settings.node_hosts[0]))
        conn.close()
        return "ok"

    return asyncio.run(go())


def test_host_keys_unknown_refused_accept_new_learns_changed_always_refused(net, tmp_path):
    from globular.errors import GlobularError

    known = tmp_path / "known_hosts"
    with pytest.raises(GlobularError, match="host key is not in .*accept_new_host_keys"):
        connect_once(provider(net, tmp_path, known_hosts=str(known)))
    assert not known.exists()

    assert connect_once(provider(net, tmp_path, known_hosts=str(known), accept_new_host_keys=True)) == "ok"
    learned = known.read_text()
    assert learned.startswith(f"{net.hosts[0].address} ssh-ed25519 ")
    assert learned.split()[1:3] == (net.workdir / "host_ed25519.pub").read_text().split()[:2]
    assert stat.S_IMODE(known.stat().st_mode) == 0o600
    assert connect_once(provider(net, tmp_path, known_hosts=str(known))) == "ok"  # now known

    other = tmp_path / "otherkey"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    known.write_text(f"{net.hosts[0].address} {' '.join(other.with_suffix('.pub').read_text().split()[:2])}\n")
    with pytest.raises(GlobularError, match="does not match"):
        connect_once(provider(net, tmp_path, known_hosts=str(known), accept_new_host_keys=True))
    assert len(known.read_text().splitlines()) == 1  # a changed key is never added


def test_wrong_key_is_refused_by_name(net, tmp_path):
    from globular.errors import GlobularError

    other = tmp_path / "otherkey"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    with pytest.raises(GlobularError, match="198.18.0.11 refused the login"):
        connect_once(provider(net, tmp_path, known_hosts=str(net.known_hosts), ssh_key=str(other)))
    with pytest.raises(GlobularError, match="ssh_key .* does not exist"):
        connect_once(provider(net, tmp_path, known_hosts=str(net.known_hosts), ssh_key=str(tmp_path / "missing")))


def test_many_connections_at_once_get_through_sshds_maxstartups(net, tmp_path):
    """sshd drops unauthenticated connections beyond MaxStartups (10:30:100 by default): 40 at
    once to one host (a big cluster's helpers, many clients) must all get through, retried."""
    from globular.providers.ssh_settings import SSHHost

    known = tmp_path / "known_hosts"
    prov = provider(net, tmp_path, known_hosts=str(known), accept_new_host_keys=True)
    assert connect_once(prov) == "ok"  # the host key, learned once

    async def many() -> list[str]:
        async def one() -> str:
            conn = await prov.connect(SSHHost.parse(prov.settings.node_hosts[0]))
            await asyncio.sleep(0.5)  # held open, as a node's connection is
            conn.close()
            return "ok"

        outcomes = await asyncio.gather(*(one() for _ in range(40)), return_exceptions=True)
        return [o if isinstance(o, str) else repr(o) for o in outcomes]

    outcomes = asyncio.run(many())
    assert outcomes == ["ok"] * 40, [o for o in outcomes if o != "ok"]


SILENT = """
import sys, time
from globular import Client
began = time.monotonic()
try:
    Client(sys.argv[1], sshkey=sys.argv[2], timeout=3)
except TimeoutError as exc:
    print(round(time.monotonic() - began), exc)
"""


def test_a_frozen_or_dead_controller_behind_the_tunnel_is_not_called_a_stale_key(net, cli, home, tmp_path):
    """globular's Client through its SSH tunnel, whose local end always accepts: a frozen
    controller (SIGSTOP) is said to be frozen, a dead one (nothing listens on the master) to be
    not running; neither is blamed on the connection file's key."""
    config = ssh_config(net, tmp_path, hosts=f"root@{net.hosts[0].address}")
    started = cli("-c", config, "start", "lab")
    assert started.returncode == 0, started.output
    path = str(home / "ipcluster" / "lab-ssh.json")
    [controller] = recorded_pids(read_record(home, "lab"), "ipcontroller")
    try:
        os.kill(controller, signal.SIGSTOP)
        frozen = subprocess.run([sys.executable, "-c", SILENT, path, str(net.key)], capture_output=True, text=True,
                                timeout=120, cwd=tmp_path)  # fmt: skip
        os.kill(controller, signal.SIGCONT)
        # dead, with its schedulers (forked: they hold its listening sockets, which would still accept)
        os.killpg(controller, signal.SIGKILL)
        assert wait_until(lambda: not psutil.pid_exists(controller) or psutil.Process(controller).status() == "zombie")
        dead = subprocess.run([sys.executable, "-c", SILENT, path, str(net.key)], capture_output=True, text=True,
                              timeout=120, cwd=tmp_path)  # fmt: skip
    finally:
        stopped = cli("terminate", "-y", "lab")
    for run in (frozen, dead):
        assert run.returncode == 0 and run.stdout, run.stderr[-3000:]
        assert "stale" not in run.stdout and "curve_serverkey" not in run.stdout, run.stdout
    assert "through the SSH tunnel" in frozen.stdout and "never answered the CURVE handshake" in frozen.stdout, (
        frozen.stdout
    )
    assert "nothing listens at the controller's address" in dead.stdout and "not running" in dead.stdout, dead.stdout
    assert stopped.returncode == 0, stopped.output


def test_a_node_cut_off_past_the_heartbeat_window_gets_its_engine_back(net, cli, home, tmp_path):
    """node001's link goes down for 20 s (a real partition: its network namespace's eth0).  The
    controller drops its engine after 8 s and would ignore it for good once the link is back;
    the engine gives up first (6.3 s without a heartbeat), the supervisor starts it again, and
    it registers as soon as the controller can be reached: the cluster is whole again, and
    listclusters says ok only then."""
    from globular import connect

    victim = net.hosts[1]
    config = ssh_config(
        net, tmp_path, hosts=f"root@{net.hosts[0].address}, root@{victim.address}",
        ipcluster="restart_dead_engines = True\n",
    )  # fmt: skip
    started = cli("-c", config, "start", "-s", "2", "cut", timeout=240)
    assert started.returncode == 0, started.output
    record = read_record(home, "cut")
    node001 = next(n for n in record["nodes"] if n["name"] == "node001")
    [supervisor] = [psutil.Process(p["pid"]) for p in node001["processes"] if p["role"] == "engine-supervisor"]
    [engine] = supervisor.children()
    rc = connect("cut")
    try:
        assert wait_until(lambda: len(rc.ids) == 2, timeout=30)
        first = set(rc.ids)
        testhosts.sh("ip", "-n", victim.netns, "link", "set", "eth0", "down")
        try:
            cut = time.monotonic()
            assert wait_until(lambda: not engine.is_running(), timeout=15), "the engine outlived the partition"
            gave_up = time.monotonic() - cut
            assert wait_until(lambda: len(rc.ids) == 1, timeout=15)  # the controller dropped it
            assert 5 < gave_up < 10, gave_up
            listing = cli("-c", config, "listclusters")
            assert "cut" in listing.stdout and " ok" not in next(
                line for line in listing.stdout.splitlines() if line.split()[:1] == ["cut"]
            ), listing.output
            time.sleep(max(0.0, 20 - (time.monotonic() - cut)))
        finally:
            testhosts.sh("ip", "-n", victim.netns, "link", "set", "eth0", "up")
        assert wait_until(lambda: len(rc.ids) == 2, timeout=60), rc.ids
        assert set(rc.ids) != first  # a new engine, with a new id
        assert rc[:].apply_sync(portable(lambda: 1)) == [1, 1]
    finally:
        rc.close()
    listing = cli("-c", config, "listclusters")
    assert " ok" in next(line for line in listing.stdout.splitlines() if line.split()[:1] == ["cut"]), listing.output
    stopped = cli("-c", config, "terminate", "-y", "cut")
    assert stopped.returncode == 0, stopped.output
    assert not remote_processes(net, tmp_path / "hosts")


def test_the_balancer_replaces_a_host_cut_off_with_a_free_one(net, cli, home, tmp_path):
    """min_nodes 2 of 3 hosts; node001's host loses its link: silent three polls, it is lost, it
    leaves the record (what cannot be done on it is logged) and a new node001 comes up on the
    free host; the map runs on the cluster whole again."""
    from globular import connect

    victim, free = net.hosts[1], net.hosts[2]
    hosts = ", ".join(f"root@{h.address}" for h in net.hosts[:3])
    config = ssh_config(net, tmp_path, hosts=hosts, extra="min_nodes = 2\npolling_interval = 1s\nkill_after = 10m\n")
    started = cli("-c", config, "start", "heal", timeout=240)
    assert started.returncode == 0, started.output

    def node001() -> dict:
        return next((n for n in read_record(home, "heal")["nodes"] if n["name"] == "node001"), {})

    assert node001()["address"] == victim.address
    testhosts.sh("ip", "-n", victim.netns, "link", "set", "eth0", "down")
    try:
        assert wait_until(lambda: node001().get("address") == free.address and node001().get("processes"), timeout=120)
    finally:
        testhosts.sh("ip", "-n", victim.netns, "link", "set", "eth0", "up")
    log = (home / "logs" / "heal.balancer.log").read_text()
    assert "lost node001: it has not answered 3 polls in a row" in log, log
    assert wait_until(lambda: "registered" in node001().get("steps", {}), timeout=60)  # its join done
    rc = connect("heal")
    try:  # the lost host's engine dropped by the controller (its heartbeat window), the new one in
        assert wait_until(lambda: len(rc.ids) == 2, timeout=60), rc.ids
        assert rc[:].map_sync(portable(lambda x: x * x), range(6)) == [x * x for x in range(6)]
    finally:
        rc.close()
    stopped = cli("-c", config, "terminate", "-y", "heal")
    assert stopped.returncode == 0, stopped.output
    # the lost host's engine gives up without its controller's heartbeat, its helper with its connection
    assert wait_until(lambda: not remote_processes(net, tmp_path / "hosts"), timeout=30), remote_processes(
        net, tmp_path / "hosts"
    )
