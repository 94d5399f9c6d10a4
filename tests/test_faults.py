"""Faults on a real local cluster: engines and the controller killed, globular killed
mid-start, and the engine watchdog (``restart_dead_engines``)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import gone, never_registering_python, read_record, recorded_pids, wait_until

pytestmark = pytest.mark.cluster


def portable(f):
    """``f``, sent by value: the engines cannot import the tests' modules."""
    f.__module__ = "__main__"
    return f


@portable
def crash_once(i: int, marker: str) -> int:
    """Task 3 kills its engine the first time it runs; every task returns i*i."""
    import os
    import time

    if i == 3 and not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(1)
    time.sleep(0.05)
    return i * i


@portable
def slow_square(x: int) -> int:
    import time

    time.sleep(2)
    return x * x


def config_text(ipcluster: str = "", python: str | None = None) -> str:
    return (
        "[global]\ndefault_template = t\n"
        f"[cluster t]\ncluster_size = 1\ncores_per_node = 2\n{f'python = {python}' if python else ''}\nplugins = ipcluster\n"
        f"[plugin ipcluster]\nsetup_class = ipcluster\nmaster_engines = 2\n{ipcluster}"
    )


def row(listing: str, name: str) -> str:
    return next(line for line in listing.splitlines() if line.strip().startswith(name) or f" {name} " in line)


async def engines_seen_on_master(home) -> int:
    """The master's engines in the balancer's view (ipcluster's ControllerLoad), once every
    engine has said where it runs."""
    from globular.ipcluster.load import ControllerLoad

    watcher = ControllerLoad("wd", home)
    try:
        for _ in range(100):
            load = await watcher.observe()
            if not watcher.asking:
                break
            await asyncio.sleep(0.1)
        return load.nodes["master"].engines if "master" in load.nodes else 0
    finally:
        await watcher.close()


def test_watchdog_restarts_a_dead_engine_and_retried_tasks_are_not_lost(cli, home, tmp_path, write_config):
    from globular import connect

    config = str(write_config(config_text("restart_dead_engines = True\nencryption = curve\n")))  # with curve on
    started = cli("-c", config, "start", "wd")
    assert started.returncode == 0, started.output
    record = read_record(home, "wd")
    assert len(recorded_pids(record, "engine-supervisor")) == 1 and not recorded_pids(record, "ipengine")
    rc = connect("wd")
    try:
        assert wait_until(lambda: len(rc.ids) == 2, timeout=30)
        first = set(rc.ids)
        view = rc.load_balanced_view()
        view.retries = 3
        marker = tmp_path / "crashed"
        results = [view.apply_async(crash_once, i, str(marker)) for i in range(12)]
        assert [r.get(60) for r in results] == [i * i for i in range(12)]
        assert marker.exists()  # an engine really died under task 3
        # the engine count comes back without anyone doing anything: a new engine, a new id
        assert wait_until(lambda: len(rc.ids) == 2 and set(rc.ids) != first, timeout=60), rc.ids
        assert rc[:].apply_sync(portable(lambda: 1)) == [1, 1]
        # the balancer's view places the restarted engine (an id the record does not have) on its node
        assert asyncio.run(engines_seen_on_master(home)) == 2
    finally:
        rc.close()
    supervisor_log = next((home / "local" / "wd" / "master" / "logs").glob("supervisor-*.log")).read_text()
    assert "restart #1" in supervisor_log
    listing = cli("-c", config, "listclusters")
    assert listing.returncode == 0, listing.output
    assert "2/2" in row(listing.stdout, "wd") and " ok" in row(listing.stdout, "wd")
    stopped = cli("-c", config, "terminate", "-y", "wd")
    assert stopped.returncode == 0, stopped.output
    # the `home` fixture fails the test if an engine (or its nanny) outlived the supervisor


def test_connect_right_after_start_every_time(cli, home, write_config):
    """``globular.connect`` in this (long-lived) process right after ``start`` returns, with
    curve on, 30 times in a row: every connection request is answered (a request that is not
    says why: the handshake the client saw, in the TimeoutError)."""
    from globular import connect

    for attempt in range(30):
        watchdog = "restart_dead_engines = True\n" if attempt % 2 else ""
        config = str(write_config(config_text(f"{watchdog}encryption = curve\n")))
        started = cli("-c", config, "start", "quick")
        assert started.returncode == 0, (attempt, started.output)
        stopped = None
        try:
            rc = connect("quick")
            try:
                ids, answers = rc.ids, rc[:].apply_sync(portable(lambda: 2))
            finally:
                rc.close()
        finally:
            stopped = cli("-c", config, "terminate", "-y", "quick")
        assert len(ids) == 2 and answers == [2, 2], (attempt, ids, answers)
        assert stopped.returncode == 0, (attempt, stopped.output)


def test_a_client_that_outlives_two_controller_restarts_leaves_the_next_connect_working(cli, home, write_config):
    """With restart_dead_engines the controller comes back on its ports: a connected client
    sees it go twice.  A monitor left on without a reader would then block the process's
    ZeroMQ I/O thread (libzmq #3575), and every later connection request in this process
    would time out without reaching the controller ("Hub connection request timed out")."""
    import threading

    import psutil

    from globular import connect

    config = str(write_config(config_text("restart_dead_engines = True\nencryption = curve\n")))
    assert cli("-c", config, "start", "twice").returncode == 0
    supervisor = psutil.Process(recorded_pids(read_record(home, "twice"), "ipcontroller")[0])
    rc = connect("twice")
    second = None
    try:
        for _ in range(2):
            (controller,) = supervisor.children()
            controller.kill()
            assert wait_until(lambda c=controller: [p.pid for p in supervisor.children()] not in ([], [c.pid]),
                              timeout=30)  # fmt: skip
            answered = threading.Event()  # rc's query socket is connected to the new controller
            threading.Thread(target=lambda done=answered: (rc.queue_status(), done.set()), daemon=True).start()
            assert answered.wait(30)
        second = connect("twice", timeout=5)
        ids = second.ids
    finally:
        rc.close()
        if second is not None:
            second.close()
        stopped = cli("-c", config, "terminate", "-y", "twice")
    assert sorted(ids) == [0, 1]
    assert stopped.returncode == 0, stopped.output


def test_killed_engine_fails_a_running_map_and_listclusters_tells_the_truth(cli, home, write_config):
    import ipyparallel as ipp

    from globular import connect

    config = str(write_config(config_text()))
    assert cli("-c", config, "start", "hurt").returncode == 0
    record = read_record(home, "hurt")
    engines = recorded_pids(record, "ipengine")
    assert len(engines) == 2
    rc = connect("hurt")
    try:
        assert wait_until(lambda: len(rc.ids) == 2, timeout=30)
        running = rc[:].map_async(slow_square, range(4))
        os.kill(engines[0], signal.SIGKILL)
        # the map fails promptly (the nanny reports the death), it does not hang
        with pytest.raises((ipp.error.CompositeError, ipp.error.EngineError)):
            running.get(30)
        assert wait_until(lambda: len(rc.ids) == 1, timeout=15)
    finally:
        rc.close()
    listing = cli("-c", config, "listclusters").stdout
    assert "1/2" in row(listing, "hurt") and "degraded: 1 of 2 ipengine dead" in row(listing, "hurt")

    os.kill(recorded_pids(record, "ipcontroller")[0], signal.SIGKILL)
    listing = cli("-c", config, "listclusters").stdout
    assert "ipcontroller down" in row(listing, "hurt")

    stopped = cli("-c", config, "terminate", "-y", "hurt")
    assert stopped.returncode == 0, stopped.output
    assert all(gone(pid) for pid in recorded_pids(record))
    assert not (home / "clusters" / "hurt.json").exists()


def test_globular_killed_mid_start_leaves_a_readable_record_that_terminate_cleans(cli, home, tmp_path, write_config):
    wrapper = never_registering_python(tmp_path)  # start waits for engines that never register
    config = str(write_config(config_text("engine_timeout = 300\n", python=str(wrapper))))
    proc = subprocess.Popen(
        [sys.executable, "-m", "globular", "-c", config, "start", "killed"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    try:

        def engines_recorded():
            try:
                return len(recorded_pids(read_record(home, "killed"), "ipengine")) == 2
            except (OSError, ValueError):
                return False

        assert wait_until(engines_recorded, timeout=60)
        proc.kill()  # SIGKILL: no cleanup can run
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    record = read_record(home, "killed")  # still readable JSON
    assert record["status"] == "starting"
    pids = recorded_pids(record)
    assert pids and not any(gone(p) for p in pids)
    listing = cli("-c", config, "listclusters")
    assert listing.returncode == 0, listing.output
    line = row(listing.stdout, "killed")
    assert "starting" in line and f"interrupted: its globular process (pid {proc.pid}) is gone" in listing.stdout

    stopped = cli("-c", config, "terminate", "-y", "killed")
    assert stopped.returncode == 0, stopped.output
    assert all(gone(p) for p in pids)
    assert not (home / "clusters" / "killed.json").exists()
    assert "No clusters" in cli("-c", config, "listclusters").stdout


def test_an_engine_alive_but_dropped_by_the_controller_is_degraded_everywhere(cli, home, write_config):
    """An engine frozen (SIGSTOP) past the controller's heartbeat window is dropped by it and
    ignored for good once it runs again: alive, never given a task.  listclusters, top and
    status (and their JSON) say so, not `2/2 ok`."""
    from globular import connect

    config = str(write_config(config_text()))
    assert cli("-c", config, "start", "frozen").returncode == 0
    victim = recorded_pids(read_record(home, "frozen"), "ipengine")[0]
    rc = connect("frozen")
    try:
        assert wait_until(lambda: len(rc.ids) == 2, timeout=30)
        os.kill(victim, signal.SIGSTOP)
        try:
            assert wait_until(lambda: len(rc.ids) == 1, timeout=30, interval=0.5)  # dropped after 8 s
        finally:
            os.kill(victim, signal.SIGCONT)
        time.sleep(3)  # it runs again: its heart beats, and the controller ignores it
        assert len(rc.ids) == 1 and not gone(victim)
    finally:
        rc.close()
    listing = cli("-c", config, "listclusters")
    line = row(listing.stdout, "frozen")
    assert "degraded: 1 of 2 running engines not registered with the controller (on master)" in line, listing.output
    assert "globular runplugin ipclusterrestart frozen" in line
    listed = json.loads(cli("-c", config, "listclusters", "--output", "json").stdout)["result"]["clusters"]
    [entry] = [c for c in listed if c["name"] == "frozen"]
    assert not entry["ok"] and entry["health"].startswith("degraded: 1 of 2"), entry

    frame = json.loads(cli("top", "--once", "frozen", "--output", "json").stdout)["result"]
    assert (frame["registered"], frame["expected"]) == (1, 2), frame
    status = cli("status", "frozen", "--output", "json")
    report = json.loads(status.stdout)["result"]
    assert status.returncode == 1 and not report["ok"], status.output
    assert (report["engines_registered"], report["engines_unregistered"]) == (1, 1), report
    [master] = report["nodes"]
    assert (master["engines_running"], master["engines_registered"], master["engines_expected"]) == (2, 1, 2)
    assert master["problem"] == "1 of 2 engines running but not registered", master

    restarted = cli("-c", config, "runplugin", "ipclusterrestart", "frozen")
    assert restarted.returncode == 0, restarted.output
    assert gone(victim)
    assert " ok" in row(cli("-c", config, "listclusters").stdout, "frozen")
    assert cli("-c", config, "terminate", "-y", "frozen").returncode == 0
