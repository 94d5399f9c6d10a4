"""Operator experience on real local clusters: `check`, `status`, the Python API with
IPython's %px magics, the live per-node steps, and idle shutdown."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sys
import time
import warnings

import pytest

from conftest import gone, read_record, recorded_pids, wait_until

pytestmark = pytest.mark.cluster

CONFIG = (
    "[global]\ndefault_template = t\n"
    "[cluster t]\ncluster_size = 2\ncores_per_node = 1\nplugins = ipcluster\n"
    "[plugin ipcluster]\nsetup_class = ipcluster\nmaster_engines = 1\n{extra}"
)


def test_check_alone_on_a_template_brings_up_checks_and_releases(cli, home, write_config):
    import ipyparallel

    config = str(write_config(CONFIG.format(extra="")))
    result = cli("-c", config, "check", "pre", "--output", "json")
    assert result.returncode == 0, result.output
    checks = json.loads(result.stdout)["result"]["checks"]
    assert [c["node"] for c in checks] == ["master", "node001"]
    assert all(c["ok"] and c["modules"]["ipyparallel"] == ipyparallel.__version__ for c in checks)
    assert all(c["python"] == ".".join(map(str, sys.version_info[:3])) and c["cpus"] >= 1 for c in checks)
    assert not (home / "clusters" / "pre.json").exists() and not (home / "local" / "pre").exists()
    table = cli("-c", config, "check", "pre")
    assert table.returncode == 0 and "master" in table.stdout and "ok" in table.stdout


def test_status_explains_a_half_broken_cluster(cli, home, write_config):
    config = str(write_config(CONFIG.format(extra="")))
    started = cli("-c", config, "start", "half")
    assert started.returncode == 0, started.output
    # the live per-node steps, shown while start ran
    steps = [
        line for line in started.stderr.splitlines() if "node001" in line and "engines" in line and "registered" in line
    ]
    assert steps, started.output
    try:
        healthy = cli("status", "half", "--output", "json")
        assert healthy.returncode == 0, healthy.output
        report = json.loads(healthy.stdout)["result"]
        assert report["ok"] and report["controller"] == "up"
        for node in report["nodes"]:
            assert node["state"] == "registered", node
            assert (node["engines_running"], node["engines_registered"], node["engines_expected"]) == (1, 1, 1)
            assert list(node["steps"]) == ["provision", "setup", "engines", "registered"]
            assert node["load"] is not None and node["uptime"] >= 0

        record = read_record(home, "half")
        victim = next(n for n in record["nodes"] if n["name"] == "node001")
        for proc in victim["processes"]:
            os.kill(proc["pid"], signal.SIGKILL)
        assert wait_until(lambda: all(gone(p["pid"]) for p in victim["processes"]), timeout=10)

        def broken():
            out = cli("status", "half", "--output", "json")
            data = json.loads(out.stdout)["result"]
            node = next(n for n in data["nodes"] if n["name"] == "node001")
            return out.returncode == 1 and node["engines_registered"] == 0 and data

        assert wait_until(broken, timeout=20, interval=0.5)
        data = broken()
        node = next(n for n in data["nodes"] if n["name"] == "node001")
        assert node["state"] == "engines dead" and node["engines_running"] == 0
        assert "1 of 1 engines not running" in node["problem"] and victim["workdir"] in node["problem"]
        master = next(n for n in data["nodes"] if n["name"] == "master")
        assert master["state"] == "registered" and master["problem"] is None
        table = cli("status", "half")
        assert table.returncode == 1 and "engines dead" in table.stdout and "node001" in table.stdout
    finally:
        stopped = cli("-c", config, "terminate", "-y", "half")
    assert stopped.returncode == 0, stopped.output


def test_python_api_and_px_magics_through_globular_connect(home, tmp_path, write_config):
    import ipyparallel
    from IPython.core.interactiveshell import InteractiveShell

    import globular

    config = write_config(CONFIG.format(extra=""))
    cluster = globular.Cluster.start("py", config=config, home=home)
    try:
        assert cluster.nodes == ["master", "node001"]
        # the connection file says where the controller is as ipcontroller would (its host's
        # name), and ipyparallel's own Client reads it without a "not on this machine" warning
        path = home / "ipcluster" / "py-local.json"
        assert json.loads(path.read_text())["location"] == socket.gethostname()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            direct = ipyparallel.Client(str(path))
        try:
            assert direct.wait_for_engines(2, timeout=30) is None and direct[:].apply_sync(abs, -7) == [7, 7]
        finally:
            direct.close()
        rc = globular.connect("py", home=home)
        try:
            assert wait_until(lambda: len(rc.ids) == 2, timeout=30)
            shell = InteractiveShell.instance()
            rc[:].activate()  # %px, %%px, %autopx on this shell
            shell.run_cell("%px import os", store_history=False).raise_error()
            shell.run_cell("%px node = os.environ['GLOBULAR_NODE']", store_history=False).raise_error()
            assert sorted(rc[:]["node"]) == ["master", "node001"]

            assert cluster.add_nodes(1) == ["node002"]
            assert wait_until(lambda: len(rc.ids) == 3, timeout=30)  # the connected client sees it
            old = set(rc.ids)
            cluster.restart_engines()
            assert wait_until(lambda: len(rc.ids) == 3 and not set(rc.ids) & old, timeout=30)
            cluster.remove_node("node002")
            assert wait_until(lambda: len(rc.ids) == 2, timeout=30)
            assert cluster.status().ok
            assert [c.ok for c in cluster.check()] == [True, True]
        finally:
            rc.close()
    finally:
        cluster.terminate()
    assert not (home / "clusters" / "py.json").exists()
    with pytest.raises(globular.GlobularError):
        globular.Cluster("py", home=home)


def test_idle_shutdown_stops_the_cluster_when_no_task_ran_and_listclusters_shows_the_deadline(cli, home, write_config):
    from globular import connect

    config = str(write_config(CONFIG.format(extra="idle_shutdown = 6s\nencryption = curve\n")))  # with curve on
    assert cli("-c", config, "start", "idle").returncode == 0
    try:
        listing = cli("-c", config, "listclusters").stdout
        header = next(line for line in listing.splitlines() if "health" in line)
        row = next(line for line in listing.splitlines() if line.split()[:1] == ["idle"])
        assert "idle shutdown" in header and re.search(r" in \d+s \(\d\d:\d\d\) ", row), listing
        state_file = home / "local" / "idle" / "master" / "run" / "idle.json"
        assert wait_until(state_file.exists, timeout=10)
        first_deadline = json.loads(state_file.read_text())["deadline"]
        rc = connect("idle")
        try:  # work keeps it up past its first deadline: tasks until the watcher has seen one
            while True:
                assert rc[:].apply_sync(time.sleep, 0.5) == [None, None]
                state = json.loads(state_file.read_text())
                if state["deadline"] > first_deadline and time.time() > first_deadline + 0.5:
                    break
                assert time.time() < first_deadline + 20, state  # the watcher never saw the work
        finally:
            rc.close()
        record = read_record(home, "idle")
        assert not any(gone(p) for p in recorded_pids(record))  # past the first deadline: still up
        controller = recorded_pids(record, "ipcontroller")[0]
        assert wait_until(lambda: gone(controller), timeout=20)
        assert wait_until(lambda: all(gone(p) for p in recorded_pids(record, "ipengine")), timeout=20)
        listing = cli("-c", config, "listclusters").stdout
        assert "idle shutdown at" in listing and "done" in listing
    finally:
        stopped = cli("-c", config, "terminate", "-y", "idle")
    assert stopped.returncode == 0, stopped.output


def test_idle_shutdown_is_not_held_off_by_the_task_of_an_engine_that_died(cli, home, write_config):
    """The controller's queue_status keeps a dead engine, and the task it died running, for
    ever: the watcher and top count only registered engines, so the cluster still goes idle."""
    from globular import connect

    config = str(write_config(CONFIG.format(extra="idle_shutdown = 6s\n")))
    assert cli("-c", config, "start", "orphan").returncode == 0
    try:
        record = read_record(home, "orphan")
        rc = connect("orphan")
        try:
            assert wait_until(lambda: len(rc.ids) == 2, timeout=30)
            victim = rc[0].apply_async(time.sleep, 300)  # direct: queued on engine 0 alone
            assert wait_until(lambda: rc.queue_status(0)["queue"] == 1, timeout=10)
            master = next(n for n in record["nodes"] if n["name"] == "master")
            [engine] = [p["pid"] for p in master["processes"] if p["role"] == "ipengine"]
            os.kill(engine, signal.SIGKILL)
            assert wait_until(lambda: rc.ids == [1], timeout=30)
            assert rc.queue_status()[0]["queue"] == 1  # ipyparallel's own answer: still "busy"
            frame = json.loads(cli("top", "--once", "orphan", "--output", "json").stdout)["result"]
            assert (frame["registered"], frame["waiting"], frame["running"]) == (1, 0, 0), frame
            del victim
        finally:
            rc.close()
        controller = recorded_pids(record, "ipcontroller")[0]
        assert wait_until(lambda: gone(controller), timeout=40)
    finally:
        stopped = cli("-c", config, "terminate", "-y", "orphan")
    assert stopped.returncode == 0, stopped.output
