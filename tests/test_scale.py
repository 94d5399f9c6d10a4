"""Issue 16's pieces that do not need many hosts: what a failed start keeps, the open-file limit,
restart's step times.  (Timings are benchmarks' business: benchmarks/bench.py, bench_scale.py.)"""

from __future__ import annotations

import json
import os
import resource
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TESTS, engine_python, local_config, read_record

pytestmark = pytest.mark.cluster


def test_a_failed_start_keeps_the_nodes_logs_and_quotes_the_engine_that_did_not_register(
    cli, home, tmp_path, write_config
):
    wrapper = engine_python(tmp_path, 'echo "stuck-before-registering $4"; exec sleep 300')  # then never register
    config = str(write_config(local_config("engine_timeout = 3", python=f"python = {wrapper}")))
    result = cli("-c", config, "start", "-s", "2", "stuck")
    assert result.returncode == 1, result.output
    assert "only 0 of 2 engines registered within 3s (master 0 of 1, node001 0 of 1)" in result.stderr
    assert "stuck-before-registering --IPEngine.id=0" in result.stderr  # the log's last lines, in the error
    kept = next(line for line in result.stderr.splitlines() if "logs are kept in" in line).rsplit(" ", 1)[1]
    folder = Path(kept)
    assert folder.parent == home / "failed" and folder.name.startswith("stuck-")
    engine_log = folder / "master" / "engine-0.log"
    assert "stuck-before-registering" in engine_log.read_text()
    assert (folder / "master" / "controller.log").exists() and (folder / "node001" / "engine-1.log").exists()
    assert stat.S_IMODE(engine_log.stat().st_mode) == 0o600 and stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert not (home / "local" / "stuck").exists()  # the nodes themselves are gone


def test_a_low_open_file_limit_is_raised_for_the_run(home, write_config, cli):
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 256:
        pytest.skip(f"the hard limit ({hard}) leaves nothing to raise")
    config = str(write_config(local_config()))
    env = dict(os.environ, GLOBULAR_HOME=str(home), PYTHONPATH=str(TESTS))

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (28, hard))

    done = subprocess.run(
        [sys.executable, "-m", "globular", "-c", config, "start", "-s", "2", "few"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=low_limit,
    )
    stopped = cli("terminate", "-y", "few")
    assert done.returncode == 0, done.stderr
    assert stopped.returncode == 0, stopped.output


def test_restart_step_times_count_from_the_restart(cli, home, write_config):
    config = str(write_config(local_config()))
    assert cli("-c", config, "start", "-s", "2", "steps").returncode == 0
    try:
        # the start's step marks moved 5 s into the past (as if it started 5 s ago), so that the
        # restart's steps, if counted from them, would take over 5 s; nobody waits for it
        path = home / "clusters" / "steps.json"
        record = json.loads(path.read_text())
        for node in record["nodes"]:
            node["steps"] = {step: mark - 5 for step, mark in node["steps"].items()}
        path.write_text(json.dumps(record))
        marks = {n["name"]: n["steps"]["registered"] for n in record["nodes"]}
        restarted = cli("runplugin", "ipclusterrestart", "steps")
        status = json.loads(cli("status", "steps", "--output", "json").stdout)["result"]
        record = read_record(home, "steps")
    finally:
        stopped = cli("terminate", "-y", "steps")
    assert restarted.returncode == 0, restarted.output
    for node in record["nodes"]:
        assert node["steps"]["restart"] > marks[node["name"]]  # a new mark, after the start
    for node in status["nodes"]:  # measured from the restart: well under the 5 s before it
        assert node["steps"]["engines"] < 4 and node["steps"]["registered"] < 4, node["steps"]
    assert stopped.returncode == 0, stopped.output


def flaky_engine_python(folder: Path, fails: int) -> Path:
    """A ``python`` whose engines exit at once the first ``fails`` times each id is started."""
    return engine_python(
        folder,
        f'  mark="{folder}/tries-$(echo "$4" | tr -dc 0-9)"; echo x >> "$mark"\n'
        f'  if [ "$(wc -l < "$mark")" -le {fails} ]; then echo "engine dies at start ($4)"; exit 1; fi',
    )


def test_an_engine_that_dies_before_registering_is_started_again(cli, home, tmp_path, write_config):
    config = str(write_config(local_config(python=f"python = {flaky_engine_python(tmp_path, 1)}")))
    started = cli("-c", config, "start", "-s", "2", "flaky")
    # each engine was started again the way its node's engines start: forked (engine_fork), so
    # every node has two fork requests, the start's and the retry's
    run = home / "local" / "flaky"
    requests = {
        n: [p for p in (run / n / "run").glob("engines-*.json") if ".pids." not in p.name]
        for n in ("master", "node001")
    }
    requests = {n: len(found) for n, found in requests.items()}
    stopped = cli("terminate", "-y", "flaky")
    assert started.returncode == 0, started.output
    assert "died before it registered; starting it again" in started.stderr
    assert requests == {"master": 2, "node001": 2}, requests
    assert stopped.returncode == 0, stopped.output


def test_an_engine_that_keeps_dying_fails_the_start_after_its_retries(cli, home, tmp_path, write_config):
    config = str(write_config(local_config(python=f"python = {flaky_engine_python(tmp_path, 99)}")))
    result = cli("-c", config, "start", "-s", "1", "doomed")
    assert result.returncode == 1, result.output
    assert "exited (started 3 times); its log" in result.stderr and "engine dies at start" in result.stderr
    assert not (home / "clusters" / "doomed.json").exists()
