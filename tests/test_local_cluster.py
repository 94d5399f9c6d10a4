"""A real local cluster: real ipyparallel controller and engines, through the real CLI."""

from __future__ import annotations

import json
import stat
import sys

import pytest

from conftest import gone, local_config, never_registering_python, read_record, recorded_pids, wait_until

pytestmark = pytest.mark.cluster

SEED = [x**30 for x in range(8)]
MAP = "print(ipview.map_async(lambda x: x**30, range(8)).get())"


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_start_map_terminate_leaves_nothing(cli, home):
    result = cli("start", "-s", "3", "demo")
    assert result.returncode == 0, result.output
    assert "Cluster demo is running: 3 nodes" in result.stdout
    conn = home / "ipcluster" / "demo-local.json"
    assert f"rc = Client('{conn}')" in result.stdout
    assert "engines registered: 3/3" in result.stderr  # progress: one line per finished step when piped

    record = read_record(home, "demo")
    assert record["status"] == "running"
    assert [n["name"] for n in record["nodes"]] == ["master", "node001", "node002"]
    pids = recorded_pids(record)
    assert len(recorded_pids(record, "ipcontroller")) == 1
    engines = recorded_pids(record, "ipengine")
    assert len(engines) >= 3
    assert not any(gone(pid) for pid in pids)
    assert mode(conn) == 0o600 and mode(home / "clusters" / "demo.json") == 0o600
    logged = home / "logs" / "demo.log"  # the operation's log, debug and up
    assert mode(logged) == 0o600 and "cluster demo is running" in logged.read_text()
    assert "master: nodeproc spawn" in logged.read_text()
    verbose = cli("-vv", "status", "demo")  # -vv: every command globular runs, on stderr
    assert verbose.returncode == 0 and "master: nodeproc facts" in verbose.stderr, verbose.output
    assert "nodeproc facts" not in cli("status", "demo").stderr
    master = record["nodes"][0]["workdir"]
    security = f"{master}/.ipython/profile_default/security"
    assert mode(__import__("pathlib").Path(security, "ipcontroller-client.json")) == 0o600
    assert json.loads(conn.read_text())["key"]
    # no ERROR in the controller's log: not even the engines' iopub greetings (see QUIET_WELCOMES)
    controller_log = __import__("pathlib").Path(master, "logs", "controller.log").read_text()
    assert " ERROR " not in controller_log and "Hub listening" in controller_log, controller_log

    listing = cli("listclusters")
    assert listing.returncode == 0
    row = next(line for line in listing.stdout.splitlines() if " demo " in line)
    assert "running" in row and "local" in row

    shell = cli("shell", "--ipcluster=demo", "-c", MAP)
    assert shell.returncode == 0, shell.output
    assert shell.stdout.strip() == str(SEED)
    nodes = cli(
        "shell",
        "--ipcluster=demo",
        "-c",
        "import os; print(sorted(set(ipview.apply_sync(lambda: __import__('os').environ['GLOBULAR_NODE']))))",
    )
    assert nodes.stdout.strip() == "['master', 'node001', 'node002']"

    interactive = cli(
        "shell", "--ipcluster=demo", input="print('engines:', len(ipclient.ids), type(ipview).__name__)\nexit\n"
    )
    assert interactive.returncode == 0, interactive.output
    assert f"engines: {len(engines)} DirectView" in interactive.stdout

    again = cli("start", "demo")
    assert again.returncode == 1 and "already exists (running)" in again.stderr

    ended = cli("terminate", "--yes", "demo")
    assert ended.returncode == 0, ended.output
    assert f"3 nodes released, {len(pids)} processes stopped" in ended.stdout  # the controller and every engine
    assert wait_until(lambda: all(gone(pid) for pid in pids), timeout=5), [p for p in pids if not gone(p)]
    assert not conn.exists()
    assert not (home / "clusters" / "demo.json").exists()
    assert not (home / "local" / "demo").exists()
    assert "No clusters." in cli("listclusters").stdout
    assert cli("terminate", "--yes", "demo").returncode == 1


def test_terminate_asks_for_confirmation(cli, home):
    assert cli("start", "-s", "1", "ask").returncode == 0
    refused = cli("terminate", "ask", input="n\n")
    assert refused.returncode == 1 and (home / "clusters" / "ask.json").exists()
    accepted = cli("terminate", "ask", input="y\n")
    assert accepted.returncode == 0 and not (home / "clusters" / "ask.json").exists()


def test_restart_engines_keeps_connected_client_working(cli, home, write_config):
    config = write_config(
        "[global]\ndefault_template = two\n"
        "[cluster two]\ncluster_size = 2\ncores_per_node = 2\nplugins = ipcluster\n"
        "[plugin ipcluster]\nsetup_class = starcluster.plugins.ipcluster.IPCluster\nmaster_engines = 1\n"
    )
    assert cli("-c", str(config), "start", "rs").returncode == 0
    from ipyparallel import Client

    client = Client(str(home / "ipcluster" / "rs-local.json"))
    try:
        old_ids = set(client.ids)
        assert len(old_ids) == 3  # master keeps a core: 1 + 2
        old_pids = recorded_pids(read_record(home, "rs"), "ipengine")
        result = cli("-c", str(config), "runplugin", "ipclusterrestart", "rs")
        assert result.returncode == 0, result.output
        assert "restarting engines (nodes): 2/2" in result.stderr
        assert all(gone(pid) for pid in old_pids)
        new_pids = recorded_pids(read_record(home, "rs"), "ipengine")
        assert len(new_pids) == 3 and not set(new_pids) & set(old_pids)
        assert wait_until(lambda: len(set(client.ids) - old_ids) == 3 and not set(client.ids) & old_ids)
        assert client[:].map_sync(lambda x: x**30, range(8)) == SEED
    finally:
        client.close()
    stop = cli("-c", str(config), "runplugin", "ipclusterstop", "rs")
    assert stop.returncode == 0, stop.output
    record = read_record(home, "rs")
    assert recorded_pids(record) == [] and not record["plugin_data"].get("ipcluster")
    assert cli("terminate", "--yes", "rs").returncode == 0


def test_ipcluster_again_after_ipclusterstop_records_the_live_engines(cli, home, write_config):
    """`runplugin ipcluster` on a running cluster is refused (no second engine set); after
    `ipclusterstop` it starts engines again, forked (engine_fork), and the record holds the
    pids of the engines that run, not those of the stopped ones."""
    import psutil

    config = str(write_config(
        "[global]\ndefault_template = f\n[cluster f]\ncluster_size = 1\ncores_per_node = 2\nplugins = ipcluster\n"
        "[plugin ipcluster]\nsetup_class = ipcluster\nmaster_engines = 2\n"
    ))  # fmt: skip
    assert cli("-c", config, "start", "again").returncode == 0
    first = recorded_pids(read_record(home, "again"), "ipengine")
    twice = cli("-c", config, "runplugin", "ipcluster", "again")
    assert twice.returncode == 2, twice.output
    assert "runs its controller and engines already" in twice.stderr
    assert recorded_pids(read_record(home, "again"), "ipengine") == first
    assert cli("-c", config, "runplugin", "ipclusterstop", "again").returncode == 0
    assert all(gone(pid) for pid in first)
    stopped = cli("-c", config, "listclusters")  # not `ok`: nothing runs to connect to
    assert "no controller and no engines: `globular runplugin ipcluster again` starts them" in stopped.stdout
    assert cli("-c", config, "runplugin", "ipcluster", "again").returncode == 0
    recorded = recorded_pids(read_record(home, "again"), "ipengine")
    live = sorted(p.pid for p in psutil.process_iter(["name"]) if p.info["name"] == "ipengine"
                  and p.environ().get("GLOBULAR_HOME") == str(home))  # fmt: skip
    assert len(recorded) == 2 and sorted(recorded) == live and not set(recorded) & set(first)
    listing = cli("-c", config, "listclusters")
    assert "2/2" in listing.stdout and " ok" in listing.stdout, listing.stdout
    assert cli("terminate", "--yes", "again").returncode == 0


def test_plugin_failure_stops_start_and_leaves_nothing(cli, home, write_config):
    config = write_config(
        "[global]\ndefault_template = t\n"
        "[cluster t]\ncluster_size = 3\nplugins = ipcluster, broken\n"
        "[plugin ipcluster]\nsetup_class = ipcluster\n"
        "[plugin broken]\nsetup_class = globular_test_plugins.FailOnNode\nmessage = disk-full-on-node001\n"
    )
    result = cli("-c", str(config), "start", "bad")
    assert result.returncode == 1
    assert "plugin 'broken' failed in run: node001:" in result.stderr
    assert "disk-full-on-node001" in result.stderr
    assert "Everything it started was stopped and removed." in result.stderr
    assert not (home / "clusters" / "bad.json").exists()
    assert not (home / "ipcluster" / "bad-local.json").exists()
    assert not (home / "local" / "bad").exists()
    # the `home` fixture fails the test if any controller or engine is still running


def test_controller_that_dies_is_reported_with_its_log(cli, home, tmp_path, write_config):
    wrapper = tmp_path / "python"
    wrapper.write_text(
        "#!/bin/sh\n"
        'case "$1" in */run/ipcontroller.py) echo "controller: address already in use" >&2; exit 1;; esac\n'
        f'exec {sys.executable} "$@"\n'
    )
    wrapper.chmod(0o755)
    config = write_config(
        f"[cluster t]\ncluster_size = 2\npython = {wrapper}\nplugins = ipcluster\n[plugin ipcluster]\nsetup_class = ipcluster\n"
    )
    result = cli("-c", str(config), "start", "-c", "t", "dead")
    assert result.returncode == 1
    assert "master: ipcontroller (pid" in result.stderr
    assert "controller: address already in use" in result.stderr
    assert not (home / "clusters" / "dead.json").exists()


@pytest.mark.parametrize("signum", [2, 15], ids=["SIGINT", "SIGTERM"])
def test_interrupted_start_leaves_nothing(home, tmp_path, write_config, signum):
    """Ctrl-C or SIGTERM while engines register: everything started is stopped."""
    import os
    import subprocess

    wrapper = never_registering_python(tmp_path)  # start waits for engines that never register
    config = write_config(
        f"[cluster t]\ncluster_size = 2\npython = {wrapper}\nplugins = ipcluster\n"
        "[plugin ipcluster]\nsetup_class = ipcluster\nengine_timeout = 300\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "globular", "-c", str(config), "start", "-c", "t", "intr"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    try:

        def engines_recorded():
            try:
                return len(recorded_pids(read_record(home, "intr"), "ipengine")) == 2
            except (OSError, ValueError):
                return False

        assert wait_until(engines_recorded, timeout=60)
        pids = recorded_pids(read_record(home, "intr"))
        os.kill(proc.pid, signum)
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Interrupted" in err
    assert all(gone(pid) for pid in pids)
    assert not (home / "clusters" / "intr.json").exists()
    assert not (home / "local" / "intr").exists()


def test_an_engine_whose_registration_notice_the_client_missed_is_still_found(cli, home, write_config, monkeypatch):
    """ipyparallel's Client learns of new engines from notifications only; one announced
    before its notification socket is connected is never seen (issue 16's failed starts at
    16+ hosts).  Here every registration notice is dropped: addnode must still find its
    engine by asking the controller again, not wait until engine_timeout and tear it down."""
    import asyncio

    from globular import operations as cluster
    from globular.ipcluster import lifecycle as ipcluster  # where the plugin opens its client

    config = write_config(
        "[global]\ndefault_template = t\n[cluster t]\nprovider = local\ncores_per_node = 1\nplugins = ipcluster\n"
        "[plugin ipcluster]\nsetup_class = ipcluster\nengine_timeout = 20\n"
    )
    assert cli("-c", str(config), "start", "-s", "1", "deaf").returncode == 0
    real = ipcluster.open_client

    async def deaf_client(*args, **kwargs):
        client = await real(*args, **kwargs)
        client._notification_handlers["registration_notification"] = lambda msg: None  # the notice is lost
        return client

    monkeypatch.setattr(ipcluster, "open_client", deaf_client)
    try:
        added = asyncio.run(asyncio.wait_for(cluster.add_nodes("deaf", 1, home=home), 60))
    finally:
        terminated = cli("terminate", "-y", "deaf")
    assert added.nodes == ["node001"]
    assert added.reports[0].data["ids"], added.reports
    assert terminated.returncode == 0, terminated.output


def test_the_cli_as_a_user_reads_it(cli, home, write_config):
    """Short helps that fit, `shell NAME` beside StarCluster's --ipcluster=NAME, `config show -c
    TEMPLATE` as `start -c` takes it, and --output json on sshnode/sshmaster."""
    listing = cli("--help")
    commands = listing.stdout.split("Commands:", 1)[1].strip().splitlines()
    assert len(commands) >= 15 and not any(line.rstrip().endswith("...") for line in commands), listing.stdout
    config = str(write_config(local_config()))
    assert cli("-c", config, "config", "show", "-c", "t").stdout == cli("-c", config, "config", "show", "t").stdout
    assert cli("-c", config, "start", "clit").returncode == 0
    try:
        by_name = cli("shell", "clit", "-c", "print(len(ipclient.ids))")
        starcluster = cli("shell", "--ipcluster=clit", "-c", "print(len(ipclient.ids))")
        both = cli("shell", "clit", "--ipcluster=other", "-c", "pass")
        ran = cli("sshnode", "--output", "json", "clit", "master", "echo", "hello")
        no_command = cli("sshmaster", "--output", "json", "clit")
    finally:
        stopped = cli("terminate", "-y", "clit")
    assert by_name.stdout.strip() == starcluster.stdout.strip() == "2", (by_name.output, starcluster.output)
    assert both.returncode == 2 and "two clusters named" in both.stderr
    result = json.loads(ran.stdout)
    assert ran.returncode == 0 and result["command"] == "sshnode" and result["result"]["stdout"] == "hello\n"
    assert no_command.returncode == 2 and "give a COMMAND" in json.loads(no_command.stdout)["error"]["message"]
    assert stopped.returncode == 0
