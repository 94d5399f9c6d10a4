"""Installed as a user installs it: the sdist and the wheel built by ``python -m build``, the wheel
installed (not editable) into a fresh venv, and that venv's ``globular`` starting a cluster whose
printed ``Client(...)`` line runs the seed's map, then terminating it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import terminate_every_cluster

ROOT = Path(__file__).parent.parent
SEED = [x**30 for x in range(8)]
SERVER_CONFIG = "etc/jupyter/jupyter_server_config.d/globular.json"


def checkout_copy(target: Path) -> Path:
    """The checkout's files, without what the tests and builds make in it (a build writes there)."""
    ignore = shutil.ignore_patterns(
        ".git", ".venv*", ".tools", "_build", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache"
    )
    shutil.copytree(ROOT, target, ignore=ignore)
    return target


def run(argv: list[str], *, env: dict[str, str] | None = None, timeout: float = 600, cwd: Path | None = None):
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd, stdin=subprocess.DEVNULL
    )
    assert done.returncode == 0, f"{' '.join(map(str, argv))}:\n{done.stdout}\n{done.stderr}"
    return done


def build_backend_pins() -> list[str]:
    """The build backend's versions uv.lock's builds use (pyproject's [tool.uv] build-constraint-dependencies)."""
    import tomllib

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return list(pyproject["tool"]["uv"]["build-constraint-dependencies"])


def this_environments_versions(path: Path) -> Path:
    """A pip constraints file of this environment's versions (globular's own left out): the fresh
    venv gets what the suite runs against (uv.lock's, or the newest with --latest)."""
    frozen = run([sys.executable, "-m", "pip", "freeze", "--exclude-editable", "--disable-pip-version-check"])
    lines = [line for line in frozen.stdout.splitlines() if "==" in line and not line.startswith("globular==")]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.cluster
@pytest.mark.timeout(900)
def test_the_wheel_installs_into_a_fresh_venv_and_runs_a_cluster(tmp_path, home):
    source = checkout_copy(tmp_path / "checkout")
    dist = tmp_path / "dist"
    backend = tmp_path / "build-constraints.txt"  # the build backend at the version the lock's builds use
    backend.write_text("\n".join(build_backend_pins()) + "\n")
    run(
        [sys.executable, "-m", "build", "--outdir", str(dist), str(source)],
        env={**os.environ, "PIP_CONSTRAINT": str(backend)},
    )
    [sdist] = dist.glob("globular-*.tar.gz")
    [wheel] = dist.glob("globular-*-py3-none-any.whl")
    assert sdist.stat().st_size > 0
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        [wheel_info] = [n for n in names if n.endswith(".dist-info/WHEEL")]
        generator = archive.read(wheel_info).decode()
    pinned = build_backend_pins()[0].replace("==", " (") + ")"  # "setuptools (84.2.1)"
    assert f"Generator: {pinned}" in generator, generator
    assert any(n.endswith(f".data/data/{SERVER_CONFIG}") for n in names), names  # the top page's server config
    assert "globular/ipcluster/labtop.html" in names

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)])
    constraints = this_environments_versions(tmp_path / "constraints.txt")
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "--no-input"]
    run([*pip, "install", "-q", "-c", str(constraints), str(wheel)], timeout=900)
    assert (venv / SERVER_CONFIG).is_file()  # installing enables the top page in that Python's Jupyter
    shown = run([*pip, "show", "-f", "globular"])
    assert "Editable project location" not in shown.stdout and str(venv) in shown.stdout

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["GLOBULAR_HOME"] = str(home)
    globular = str(venv / "bin" / "globular")
    started = run([globular, "start", "-s", "2", "wheel"], env=env, timeout=300, cwd=tmp_path)
    try:
        assert "Warning" not in started.stderr, started.stderr
        client = re.search(r"^\s*(rc = Client\(.*\))$", started.stdout, re.M)
        assert client, started.stdout
        code = f"from ipyparallel import Client\n{client.group(1)}\nprint(rc[:].map_sync(lambda x: x**30, range(8)))\n"
        mapped = run([str(venv / "bin" / "python"), "-c", code], env=env, timeout=120, cwd=tmp_path)
        assert mapped.stdout.strip().splitlines()[-1] == str(SEED)
        assert str(venv) in (home / "clusters" / "wheel.json").read_text()  # its engines ran the venv's Python
    finally:
        stopped = subprocess.run(
            [globular, "terminate", "-y", "wheel"], capture_output=True, text=True, env=env, timeout=300
        )
        if stopped.returncode != 0:
            terminate_every_cluster(home)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
