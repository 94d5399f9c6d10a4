"""Issue 15's hostile pass, as tests: bounded input, nothing unrecorded, a way out of every state,
one line instead of a traceback, private folders whatever the umask, no noise after an interrupt."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TESTS, gone, local_config, processes_of, read_record, recorded_pids, wait_until

pytestmark = pytest.mark.cluster


def one_line_error(result, code: int = 2) -> str:
    assert result.returncode == code, result.output
    assert "Traceback" not in result.output, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


# -- 1. sizes ------------------------------------------------------------------------------------


def test_sizes_beyond_what_the_provider_can_give_are_bad_input_and_nothing_is_recorded(cli, home, write_config):
    line = one_line_error(cli("start", "-s", "9" * 29, "huge"))
    assert f"-s {'9' * 29}: " in line and "the local provider runs at most" in line
    config = str(write_config(local_config().replace("cores_per_node = 1", "cores_per_node = 100000000")))
    line = one_line_error(cli("-c", config, "start", "wide"))
    assert "cores_per_node: 100000000 engines per node; at most" in line
    huge = str(write_config(local_config().replace("cores_per_node = 1", "cluster_size = " + "9" * 23)))
    assert "[cluster t] cluster_size: " in one_line_error(cli("-c", huge, "start", "big"))
    assert not (home / "clusters").exists() or not list((home / "clusters").glob("*.json"))

    config = str(write_config(local_config()))
    assert cli("-c", config, "start", "-s", "1", "grow").returncode == 0
    grown = cli("-c", config, "addnode", "-n", "9" * 20, "grow")
    stopped = cli("terminate", "-y", "grow")
    assert "-n 99999999999999999999: the cluster would have" in one_line_error(grown)
    assert stopped.returncode == 0, stopped.output


# -- 3 and 4. processes the record does not know; an unreadable record --------------------------------


def start_in_background(config: str, name: str, home: Path) -> subprocess.Popen[str]:
    env = dict(os.environ, GLOBULAR_HOME=str(home), PYTHONPATH=str(TESTS))
    return subprocess.Popen(
        [sys.executable, "-m", "globular", "-c", config, "start", "-s", "2", name],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


@pytest.mark.parametrize("delay", [0.0, 0.02, 0.05, 0.08, 0.12, 0.2, 0.3, 0.5, 0.8])
def test_a_start_killed_at_any_moment_leaves_nothing_that_terminate_does_not_stop(cli, home, write_config, delay):
    """SIGKILL the start soon after its record appears (a sweep of moments, before and after its
    processes are recorded): terminate must stop every process it started, recorded or not."""
    config = str(write_config(local_config()))
    record = home / "clusters" / "killed.json"
    proc = start_in_background(config, "killed", home)
    try:
        assert wait_until(record.exists, timeout=30), proc.stderr.read() if proc.poll() is not None else ""
        time.sleep(delay)
        proc.kill()
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    ended = cli("terminate", "-y", "killed")
    assert ended.returncode == 0, ended.output
    left = [(p.pid, cmd) for p, cmd in processes_of(home) if "globular" not in " ".join(cmd[:3])]
    assert wait_until(lambda: not processes_of(home), timeout=10), left
    assert not record.exists() and not (home / "clusters" / ".killed.op.lock").exists()


def test_terminate_force_stops_the_processes_of_an_unreadable_record(cli, home, write_config):
    config = str(write_config(local_config()))
    assert cli("-c", config, "start", "-s", "2", "torn").returncode == 0
    pids = recorded_pids(read_record(home, "torn"))
    path = home / "clusters" / "torn.json"
    path.write_text(path.read_text()[:120])  # truncated
    refused = cli("terminate", "-y", "torn")
    assert refused.returncode == 1 and "`globular terminate --force torn`" in refused.stderr
    again = cli("-c", config, "start", "torn")
    assert again.returncode == 1 and "(unreadable)" in again.stderr and "terminate --force torn" in again.stderr
    assert processes_of(home)  # the cluster still runs
    forced = cli("terminate", "-y", "--force", "torn")
    assert forced.returncode == 0, forced.output
    assert "is forgotten" in forced.stdout and "unreadable" in forced.stderr
    assert wait_until(lambda: not processes_of(home), timeout=10), processes_of(home)
    assert all(gone(pid) for pid in pids), [pid for pid in pids if not gone(pid)]
    assert not path.exists() and not (home / "local" / "torn").exists()
    assert not (home / "ipcluster" / "torn-local.json").exists()


# -- 6. one line, not a traceback -------------------------------------------------------------------


def test_bad_input_of_every_kind_is_one_line(cli, home, tmp_path, write_config):
    fifo = tmp_path / "fifo.ini"
    os.mkfifo(fifo)
    for config, expected in [
        (str(tmp_path), "is a folder, not a config file"),
        (str(fifo), "is not a regular file"),
        ("/dev/zero", "is not a regular file"),
    ]:
        assert expected in one_line_error(cli("-c", config, "start", "x", timeout=20))
    missing = write_config("[global]\ndefault_template = missing\n[cluster a]\n", "m.ini")
    assert f"{missing}:2 [global] default_template: names no [cluster missing]" in one_line_error(
        cli("-c", str(missing), "start", "x")
    )
    for value in ("1_0", "1.0"):
        bad = write_config(f"[cluster a]\ncluster_size = {value}\n", "n.ini")
        assert f"cluster_size: expected a whole number, got '{value}'" in one_line_error(
            cli("-c", str(bad), "start", "-c", "a", "x")
        )
    twice = write_config(local_config().replace("plugins = ipcluster", "plugins = ipcluster, ipcluster"))
    assert "plugins: lists ipcluster twice" in one_line_error(cli("-c", str(twice), "start", "x"))
    long = write_config(local_config("packer = " + "y" * 100_000), "long.ini")
    line = one_line_error(cli("-c", str(long), "start", "x"))
    assert "(100000 characters)" in line and len(line) < 400
    assert "invalid cluster name 'x[/]'" in one_line_error(cli("start", "x[/]"))
    afile = tmp_path / "not-a-folder"
    afile.write_text("")
    assert "Not a directory" in one_line_error(cli("start", "x", env={"GLOBULAR_HOME": str(afile)}), 1)


def test_controller_ports_partly_held_by_others_are_named(cli, home, write_config):
    held = []
    try:
        first = None
        for _ in range(50):  # a range of 20 free ports, of which we hold 10
            probe = socket.socket()
            probe.bind(("127.0.0.1", 0))
            first = probe.getsockname()[1]
            probe.close()
            if 1024 <= first <= 65535 - 20:
                break
        for port in range(first, first + 10):
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", port))
                s.listen()
            except OSError:
                s.close()
                continue
            held.append(s)
        config = str(write_config(local_config(f"controller_ports = {first}-{first + 19}")))
        result = cli("-c", config, "start", "-s", "1", "held")
    finally:
        for s in held:
            s.close()
    assert result.returncode == 1, result.output
    assert f"of the 20 ports of controller_ports = {first}-{first + 19} are free on 127.0.0.1" in result.stderr
    assert "Traceback" not in result.output and not (home / "clusters" / "held.json").exists()


def test_a_notebook_directory_that_is_a_file_fails_the_preflight(cli, home, tmp_path, write_config):
    afile = tmp_path / "notes"
    afile.write_text("not a folder")
    config = str(write_config(local_config(f"enable_notebook = true\nnotebook_directory = {afile}")))
    result = cli("-c", config, "start", "-s", "1", "nb")
    assert result.returncode == 1, result.output
    assert "preflight failed, nothing was started" in result.stderr
    assert f"master: notebook_directory {afile} exists and is not a folder" in result.stderr


# -- 8 and 9. private folders whatever the umask; quiet interrupts; the controller's command line ----------


def test_folders_are_private_under_umask_000_and_ports_stay_off_the_command_line(home, write_config, cli):
    config = str(write_config(local_config()))
    env = dict(os.environ, GLOBULAR_HOME=str(home), PYTHONPATH=str(TESTS))
    done = subprocess.run(
        [sys.executable, "-m", "globular", "-c", config, "start", "-s", "2", "open"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=lambda: os.umask(0),
    )
    assert done.returncode == 0, done.stderr
    folders = [home, home / "clusters", home / "local", home / "local" / "open", home / "logs", home / "ipcluster"]
    modes = {str(f): oct(stat.S_IMODE(f.stat().st_mode)) for f in folders}
    controller = recorded_pids(read_record(home, "open"), "ipcontroller")[0]
    cmdline = Path(f"/proc/{controller}/cmdline").read_bytes().decode()
    stopped = cli("terminate", "-y", "open")
    assert set(modes.values()) == {"0o700"}, modes
    assert "engine_ports" not in cmdline and "--ports" not in cmdline, cmdline
    assert stopped.returncode == 0, stopped.output
    assert not (home / "clusters" / ".open.op.lock").exists()


def test_an_early_sigterm_is_one_word_and_no_asyncio_noise(home, write_config, cli):
    config = str(write_config(local_config()))
    proc = start_in_background(config, "early", home)
    assert wait_until((home / "clusters" / "early.json").exists, timeout=30)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Interrupted." in err and "never retrieved" not in err and "Traceback" not in err, err
    assert not (home / "clusters" / "early.json").exists()
    assert wait_until(lambda: not processes_of(home), timeout=10)


def test_a_signal_while_the_wheelhouse_resolves_ends_start_at_once(home, write_config, tmp_path):
    """pip runs in a child process that a cancel stops: a FIFO named like a wheel blocks pip in
    open() for ever, and SIGTERM still ends `start` within seconds (exit 130), pip with it."""
    import ipyparallel

    wheelhouse = tmp_path / "wheels"
    wheelhouse.mkdir()
    os.mkfifo(wheelhouse / f"ipyparallel-{ipyparallel.__version__}-py3-none-any.whl")
    managed = f"environment = managed\nwheelhouse = {wheelhouse}"
    config = str(write_config(local_config(python=managed)))
    proc = start_in_background(config, "fifo", home)

    def pip_downloading() -> bool:
        return any("pip" in argv and "download" in argv for _, argv in processes_of(home))

    try:
        assert wait_until(pip_downloading, timeout=60), proc.stderr
        time.sleep(1)  # pip is in open() on the FIFO
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, err
        assert time.monotonic() - sent < 5, err
        assert "Interrupted." in err, err
        assert wait_until(lambda: not processes_of(home), timeout=10), processes_of(home)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_an_interrupted_local_environment_build_leaves_no_installer_and_no_folder(home, write_config):
    """SIGTERM while the node environment's installer (uv) runs: `start` ends (exit 130) with
    the builder stopped so that it cleans up: no uv left running, no half-made folder."""
    config = str(write_config(local_config(python="environment = managed\npackages = toolz")))
    proc = start_in_background(config, "envint", home)

    def installing() -> bool:
        return any(
            len(argv) > 2 and argv[0].endswith("/uv") and argv[1:3] == ["pip", "install"]
            for _, argv in processes_of(home)
        )

    try:
        assert wait_until(installing, timeout=240, interval=0.02), proc.stderr
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, err
        left = processes_of(home)
        assert not left, left  # at once: the installer went before globular exited
        envs = home / "envs"
        made = sorted(p.name for p in envs.iterdir() if not p.name.endswith(".lock")) if envs.exists() else []
        assert made == [], made
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_status_flags_more_engines_than_expected(cli, home, write_config):
    """An engine that globular did not start joins the controller (a second ipcluster, a stray
    from elsewhere): status must not call that "ok"."""
    config = str(write_config(local_config()))
    assert cli("-c", config, "start", "-s", "1", "extra").returncode == 0
    master = read_record(home, "extra")["nodes"][0]
    info = Path(master["workdir"]) / "security" / "ipcontroller-engine.json"
    env = {k: v for k, v in os.environ.items() if k != "GLOBULAR_MARK"}
    env.update(IPYTHONDIR=str(Path(master["workdir"]) / ".ipython"), GLOBULAR_NODE="master")
    stranger = subprocess.Popen(
        [sys.executable, "-m", "ipyparallel.engine", f"--file={info}"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        report = None
        for _ in range(60):
            status = cli("status", "extra", "--output", "json")
            report = json.loads(status.stdout)["result"]
            if status.returncode == 1:
                break
            time.sleep(0.5)
    finally:
        os.killpg(stranger.pid, signal.SIGKILL)
        stranger.wait(10)
        stopped = cli("terminate", "-y", "extra")
    assert report is not None and not report["ok"], report
    node = report["nodes"][0]
    assert node["engines_registered"] == node["engines_expected"] + 1, node
    assert "engines registered, " in node["problem"] and "expected" in node["problem"], node
    assert stopped.returncode == 0, stopped.output


# -- 5. the controller dies ---------------------------------------------------------------------------


@pytest.mark.parametrize("moment", [0.0, 0.3, 1.0])
def test_a_dead_controller_fails_outstanding_results_and_restart_controller_brings_a_new_one(
    cli, home, write_config, moment
):
    import ipyparallel as ipp

    import globular

    config = str(write_config(local_config()))
    assert cli("-c", config, "start", "-s", "2", "phoenix").returncode == 0
    rc = globular.connect("phoenix")
    try:
        running = rc[:].map_async(time.sleep, [30, 30])
        time.sleep(moment)
        controller = recorded_pids(read_record(home, "phoenix"), "ipcontroller")[0]
        os.killpg(controller, signal.SIGKILL)
        killed = time.monotonic()
        with pytest.raises(ipp.error.CompositeError, match="the controller of cluster 'phoenix' is gone"):
            running.get(30)
        failed_after = time.monotonic() - killed
    finally:
        rc.close()
    down = cli("status", "phoenix")
    began = time.monotonic()
    restarted = cli("restart-controller", "phoenix")
    took = time.monotonic() - began
    again = cli("shell", "--ipcluster=phoenix", "-c", "print(sorted(ipview.apply_sync(lambda: 7)))")
    stopped = cli("terminate", "-y", "phoenix")
    assert failed_after < 5, failed_after  # not ipyparallel's wait for ever
    assert down.returncode == 1 and "controller down" in down.stdout, down.output
    assert restarted.returncode == 0, restarted.output
    assert "Controller of phoenix restarted" in restarted.stdout and "2 started" in restarted.stdout
    # each node's line times its engines from the restart, not from the cluster's start
    steps = [line for line in restarted.stderr.splitlines() if line.startswith(("master ", "node001 "))]
    assert len(steps) == 2 and all(float(re.search(r"engines (\d+\.\d)s", line)[1]) < took for line in steps), (
        took,
        restarted.stderr,
    )
    assert again.returncode == 0 and again.stdout.strip() == "[7, 7]", again.output
    assert stopped.returncode == 0, stopped.output


def test_with_restart_dead_engines_a_killed_controller_comes_back_and_keeps_its_engines(cli, home, write_config):
    import psutil

    import globular

    config = str(write_config(local_config("restart_dead_engines = true")))
    assert cli("-c", config, "start", "-s", "2", "lazarus").returncode == 0
    try:
        rc = globular.connect("lazarus")
        try:
            before = sorted(rc.ids)
        finally:
            rc.close()
        supervisor = recorded_pids(read_record(home, "lazarus"), "ipcontroller")[0]
        controller = psutil.Process(supervisor).children()[0]
        controller.kill()
        killed = time.monotonic()

        def serves_again() -> bool:
            try:
                client = globular.connect("lazarus", timeout=2)
            except Exception:
                return False
            try:
                return sorted(client.ids) == before and client[:].apply_async(lambda: 7).get(5) == [7, 7]
            except Exception:
                return False
            finally:
                client.close()

        back = wait_until(serves_again, timeout=60, interval=0.5)
        took = time.monotonic() - killed
        status = cli("status", "lazarus")
    finally:
        stopped = cli("terminate", "-y", "lazarus")
    assert back, f"no controller with engines {before} within 60 s"
    assert took < 30, took  # the engines' own patience (50 missed beats) is 35 s
    assert status.returncode == 0, status.output
    assert stopped.returncode == 0, stopped.output
