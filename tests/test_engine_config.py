"""Engines as ipyparallel users configure them (issue 19): engine_args, engine_env,
engine_startup, engine_workdir and a local IPython profile, each observed on real engines,
on the local provider and on ssh test hosts whose Python is a bare one."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import psutil
import pytest

import testhosts
from conftest import bare_hosts, local_config, read_record, recorded_pids, share_env_cache, ssh_config

pytestmark = pytest.mark.cluster

SEEN = """
import globular, json, sys
client = globular.connect(sys.argv[1])
def seen():
    import os
    g = globals()
    return {"cwd": os.getcwd(), "my_var": os.environ.get("MY_VAR"), "omp": os.environ.get("OMP_NUM_THREADS"),
            **{k: g.get(k) for k in ("FROM_ARGS", "FROM_STARTUP", "FROM_PROFILE_CONFIG", "FROM_PROFILE_STARTUP")}}
print(json.dumps(client[:].apply_sync(seen)))
client.close()
"""


def make_profile(folder: Path) -> Path:
    """An IPython profile as ipcluster users keep one: engine and controller config, startup files."""
    (folder / "startup").mkdir(parents=True)
    (folder / "ipengine_config.py").write_text("c.IPKernelApp.exec_lines = ['FROM_PROFILE_CONFIG = 1']\n")
    (folder / "ipcontroller_config.py").write_text("c.Application.log_format = 'from-profile %(message)s'\n")
    (folder / "startup" / "00-first.py").write_text("FROM_PROFILE_STARTUP = 'startup dir'\n")
    return folder


def engine_settings(tmp_path: Path, workdir: str) -> str:
    startup = tmp_path / "startup.py"
    startup.write_text("FROM_STARTUP = 'engine_startup'\n")
    profile = make_profile(tmp_path / "profile_lab")
    return (
        f"engine_args = --IPEngine.startup_command='FROM_ARGS = 7'\n"
        f"engine_env = MY_VAR=hello there, OMP_NUM_THREADS=3\n"
        f"engine_startup = {startup}\nengine_workdir = {workdir}\nprofile = {profile}\n"
    )


def engines_saw(name: str, env: dict | None = None) -> list[dict]:
    import os
    import subprocess

    done = subprocess.run(
        [sys.executable, "-c", SEEN, name], capture_output=True, text=True, timeout=120, env=env or dict(os.environ)
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def check(seen: list[dict], workdir: Path, engines: int) -> None:
    assert len(seen) == engines
    for one in seen:
        assert one == {
            "cwd": str(workdir),
            "my_var": "hello there",
            "omp": "3",
            "FROM_ARGS": 7,
            "FROM_STARTUP": "engine_startup",
            "FROM_PROFILE_CONFIG": 1,
            "FROM_PROFILE_STARTUP": "startup dir",
        }, one


@pytest.mark.parametrize("fork", [True, False])
def test_engine_settings_and_a_profile_reach_local_engines(cli, home, write_config, tmp_path, fork):
    workdir = tmp_path / "work"
    # 2 cores a node: node001's two engines and the master's one (a core kept for the controller),
    # forked from one interpreter a node (engine_fork) or each its own python -m ipyparallel.engine
    settings = engine_settings(tmp_path, str(workdir)) + f"engine_fork = {fork}\n"
    config = write_config(local_config(settings).replace("cores_per_node = 1", "cores_per_node = 2"))
    started = cli("-c", str(config), "start", "-s", "2", "cfg")
    try:
        assert started.returncode == 0, started.output
        check(engines_saw("cfg"), workdir, 3)
        engines = [psutil.Process(pid) for pid in recorded_pids(read_record(home, "cfg"), "ipengine")]
        assert len(engines) == 3 and all((e.name() == "ipengine") == fork for e in engines)
        controller_log = home / "local" / "cfg" / "master" / "logs" / "controller.log"
        assert "from-profile " in controller_log.read_text()  # the profile's ipcontroller_config.py
    finally:
        stopped = cli("terminate", "-y", "cfg")
    assert stopped.returncode == 0, stopped.output


def test_bad_engine_settings_are_one_line_errors(cli, home, write_config, tmp_path):
    for setting, said in (
        ("engine_env = 1BAD=x", "'1BAD=x' is not NAME=VALUE"),
        ("engine_args = --IPEngine.id=3", "globular sets --IPEngine.id itself"),
        (f"engine_startup = {tmp_path / 'nope.py'}", "is not a file here"),
        ("engine_args = 'unclosed", "cannot split"),
    ):
        config = write_config(local_config(setting + "\n"))
        done = cli("-c", str(config), "start", "bad")
        assert done.returncode == 2, done.output
        assert said in done.stderr and "[plugin ipcluster]" in done.stderr and len(done.stderr.splitlines()) == 1
    config = write_config(local_config("profile = nosuchprofile\n"))
    done = cli("-c", str(config), "start", "bad")
    assert done.returncode == 2 and "[plugin ipcluster] profile: there is no" in done.stderr, done.output
    assert "ipython profile create nosuchprofile" in done.stderr and len(done.stderr.splitlines()) == 1


@pytest.mark.skipif(testhosts.available() is not None, reason=str(testhosts.available()))
def test_engine_settings_and_a_profile_reach_engines_on_ssh_hosts(cli, home, tmp_path, bare_python, env_cache):
    with bare_hosts(tmp_path / "net", 2, bare_python, env_cache) as net:
        remote_dir = tmp_path / "hosts"
        share_env_cache(env_cache, home, remote_dir)
        workdir = "~/globular-engine-work"  # the node user's home, expanded there
        config = ssh_config(tmp_path / "config", net, remote_dir, engine_settings(tmp_path, workdir))
        started = cli("-c", str(config), "start", "lab", timeout=600)
        try:
            assert started.returncode == 0, started.output
            check(engines_saw("lab"), Path("~/globular-engine-work").expanduser(), 2)
        finally:
            stopped = cli("terminate", "-y", "lab", timeout=300)
            shutil.rmtree(Path("~/globular-engine-work").expanduser(), ignore_errors=True)
        assert stopped.returncode == 0, stopped.output
