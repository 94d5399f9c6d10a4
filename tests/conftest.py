"""Shared fixtures: an isolated ~/.globular per test, the real CLI, a leak check."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

TESTS = Path(__file__).parent

# The tests interrupt commands with SIGINT, which Python turns into KeyboardInterrupt only in a
# process that does not ignore it.  A shell without job control starts what it puts in the
# background (``pytest ... &``) ignoring SIGINT, and exec keeps that: every command a test runs
# would then ignore Ctrl-C.  A handler here is reset to the default in each child.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@dataclass
class CLIResult:
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def processes_of(home: Path, folder: Path | None = None) -> list[tuple[psutil.Process, list[str]]]:
    """Live (non-zombie) processes started with GLOBULAR_HOME=home, or running in ``folder``
    (where remote nodes of a test live), with their command lines (read when found:
    a process may exit, and turn zombie, before the report is written)."""
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.pid == os.getpid() or proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if proc.environ().get("GLOBULAR_HOME") == str(home) or (
                folder is not None and Path(proc.cwd()).is_relative_to(folder)
            ):
                found.append((proc, proc.cmdline()))
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    """Each phase's report on the test item (``item.rep_call``): fixtures see whether the test failed."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


def terminate_every_cluster(home: Path, env: dict[str, str] | None = None) -> list[str]:
    """``globular terminate --force`` of every cluster recorded in ``home`` (a test that failed
    half-way leaves its clusters running: they go before the leak check, which then finds only
    what terminate could not stop).  The clusters named."""
    names = sorted(p.stem for p in (home / "clusters").glob("*.json"))
    for name in names:
        full_env = {**os.environ, "GLOBULAR_HOME": str(home), **(env or {})}
        full_env["PYTHONPATH"] = os.pathsep.join([str(TESTS), full_env.get("PYTHONPATH", "")])
        try:
            subprocess.run(
                [sys.executable, "-m", "globular", "terminate", "--force", "-y", name],
                capture_output=True,
                timeout=120,
                env=full_env,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            pass  # what it could not stop, the leak check kills
    return names


@pytest.fixture
def home(tmp_path, monkeypatch, request):
    """GLOBULAR_HOME for this test; fails the test if a process it started is left behind.  When
    the test failed, its clusters are terminated first (a failure is reported once, and leaves
    nothing running for the tests after it)."""
    path = tmp_path / "globular-home"
    monkeypatch.setenv("GLOBULAR_HOME", str(path))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))  # where the Lab panel's cluster files go
    monkeypatch.delenv("GLOBULAR_CONFIG", raising=False)
    yield path
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        terminate_every_cluster(path)
    leaked = processes_of(path, tmp_path)
    for proc, _ in leaked:
        try:
            os.killpg(proc.pid, 9)
        except OSError:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
    assert not leaked, f"processes left running: {[(p.pid, cmdline) for p, cmdline in leaked]}"


@pytest.fixture
def cli(home):
    """Run the real `globular` command in a subprocess."""

    def run(*args: str, timeout: float = 180, env: dict | None = None, input: str | None = None) -> CLIResult:
        full_env = dict(os.environ)
        full_env["PYTHONPATH"] = os.pathsep.join([str(TESTS), full_env.get("PYTHONPATH", "")])
        full_env["COLUMNS"] = "200"
        full_env.update(env or {})
        proc = subprocess.run(
            [sys.executable, "-m", "globular", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=full_env,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
        return CLIResult(proc.returncode, proc.stdout, proc.stderr)

    return run


@pytest.fixture
def write_config(tmp_path):
    def write(text: str, name: str = "config") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write


LOCAL_CONFIG = """
[global]
default_template = t
[cluster t]
provider = local
cores_per_node = 1
plugins = ipcluster
{python}
[plugin ipcluster]
setup_class = ipcluster
{extra}
"""


def local_config(extra: str = "", python: str = "") -> str:
    """A config whose template ``t`` is a local cluster of 1-core nodes running ipcluster (with ``extra``
    settings for it, and ``python = ...`` for the nodes when given)."""
    return LOCAL_CONFIG.format(extra=extra, python=python)


def read_record(home: Path, name: str) -> dict:
    return json.loads((home / "clusters" / f"{name}.json").read_text())


def recorded_pids(record: dict, role: str | None = None) -> list[int]:
    return [p["pid"] for n in record["nodes"] for p in n["processes"] if role is None or p["role"] == role]


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


# In a forked engine (engine_fork), just before it would become the engine: exec the wrapper as
# "python -m ipyparallel.engine ARGS" instead, so that one shell branch stands in for both kinds
# of engine (same pid, same start time: globular's record still names it).
_FORKED_ENGINE_HOOK = (
    "import os, runpy, sys; import ipyparallel.engine.app as app; wrapper = sys.argv.pop(1); "
    "app.IPEngine.launch_instance = classmethod(lambda cls, argv=None, **kw: "
    'os.execv(wrapper, [wrapper, "-m", "ipyparallel.engine", *argv])); '
    'sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name="__main__")'
)


def engine_python(folder: Path, engine: str) -> Path:
    """A ``python`` for the nodes whose engines run the shell lines ``engine`` first ($4 is their
    ``--IPEngine.id=N``; lines that do not exec or exit go on to the real engine), whether an
    engine is its own ``python -m ipyparallel.engine`` or forked (engine_fork)."""
    wrapper = folder / "python"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'if [ "$2" = ipyparallel.engine ]; then\n{engine}\nfi\n'
        f'case "$1" in */run/forkstart.py) exec {sys.executable} -c \'{_FORKED_ENGINE_HOOK}\' "$0" "$@";; esac\n'
        f'exec {sys.executable} "$@"\n'
    )
    wrapper.chmod(0o755)
    return wrapper


def never_registering_python(folder: Path) -> Path:
    """A ``python`` for the nodes whose engines never register (they sleep): a start waits on them."""
    return engine_python(folder, "exec sleep 300")


def _python_of_version(path: str) -> tuple[int, int] | None:
    try:
        out = subprocess.run(
            [path, "-c", "import sys; print(*sys.version_info[:2])"], capture_output=True, text=True, timeout=30
        )
    except OSError:
        return None
    return tuple(map(int, out.stdout.split())) if out.returncode == 0 else None  # type: ignore[return-value]


@pytest.fixture(scope="session")
def bare_python(tmp_path_factory) -> str:
    """A Python like a stranger's host has: this major.minor, the standard library and nothing
    else (a venv made --without-pip from Debian's /usr/bin/python3 where it is this version)."""
    base = "/usr/bin/python3"
    if _python_of_version(base) != tuple(sys.version_info[:2]):
        base = getattr(sys, "_base_executable", sys.executable)
    folder = tmp_path_factory.mktemp("bare") / "python"
    subprocess.run([base, "-m", "venv", "--without-pip", str(folder)], check=True, capture_output=True)
    python = str(folder / "bin" / "python")
    for module in ("ipyparallel", "zmq", "msgpack", "pip"):
        probe = subprocess.run([python, "-c", f"import {module}"], capture_output=True)
        assert probe.returncode != 0, f"the bare python {python} can import {module}"
    return python


def other_python() -> str | None:
    """A Python of another major.minor than this one, if this machine has one."""
    import glob

    here = tuple(sys.version_info[:2])
    for path in sorted(glob.glob("/root/.pyenv/versions/3.*/bin/python3")) + sorted(
        glob.glob("/usr/bin/python3.[0-9]*")
    ):
        if path.endswith("-config"):
            continue
        version = _python_of_version(path)
        if version and version != here and version[0] == 3:
            return path
    return None


@pytest.fixture(scope="session")
def env_cache(tmp_path_factory) -> Path:
    """Node environments and wheelhouses shared by the tests that do not test building them
    (each build takes seconds; they are the same for every such test)."""
    return tmp_path_factory.mktemp("env-cache")


@contextmanager
def bare_hosts(
    workdir: Path, count: int, python: str, env_cache: Path | None = None, first: int = 11,
    path: dict[str, str] | None = None, sshd: bool = True,
) -> Iterator:  # fmt: skip
    """``count`` netns test hosts (tests/testhosts.py) whose ``python`` is a bare one, with the
    shared environment cache at hand (``share_env_cache``); ``path``: host name -> a folder
    first on its sessions' PATH (a stand-in nvidia-smi); ``sshd=False``: bare namespaces,
    not reached from here; all removed on exit."""
    import testhosts

    hosts = testhosts.HostNet(workdir=workdir, first=first, path=path or {}, sshd=sshd)
    hosts.up(count)
    hosts.python = python  # type: ignore[attr-defined]
    hosts.env_cache = env_cache  # type: ignore[attr-defined]
    try:
        yield hosts
    finally:
        hosts.down()


def shadowing_python(folder: Path, python: str, module: str, source: str) -> Path:
    """A ``python`` for the nodes: ``python`` with module ``module`` replaced by ``source``
    (first on its path), like a host whose install lacks or breaks that module."""
    shadow = folder / "shadow"
    shadow.mkdir(parents=True, exist_ok=True)
    (shadow / f"{module}.py").write_text(source)
    wrapper = folder / f"python-shadowing-{module}"
    wrapper.write_text(f'#!/bin/sh\nPYTHONPATH={shadow} exec {python} "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


def share_env_cache(cache: Path, home: Path, remote_dir: Path) -> None:
    """Point a test's ``<remote_dir>/envs`` and ``~/.globular/wheels`` at the shared cache."""
    for link, target in ((remote_dir / "envs", cache / "envs"), (home / "wheels", cache / "wheels")):
        target.mkdir(parents=True, exist_ok=True)
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(target)


def ssh_config(path: Path, hosts, remote_dir: Path, ipcluster: str = "", cluster: str = "") -> Path:
    """A config whose template ``lab`` is the ssh provider on test ``hosts`` (their bare Python,
    one core each) running ipcluster with ``ipcluster`` settings."""
    path.write_text(
        "[global]\ndefault_template = lab\n[cluster lab]\nprovider = ssh\n"
        f"node_hosts = {', '.join(f'root@{h.address}' for h in hosts.hosts)}\n"
        f"ssh_key = {hosts.key}\nknown_hosts = {hosts.known_hosts}\npython = {hosts.python}\n"
        f"remote_dir = {remote_dir}\ncores_per_node = 1\nplugins = ipcluster\n{cluster}"
        f"[plugin ipcluster]\nsetup_class = ipcluster\n{ipcluster}"
    )
    return path


def check_notebook_forward(
    home: Path, cluster: str, region: str, address: str, engines: int, env: dict | None = None
) -> None:
    """The notebook on ``cluster``'s master, not reached from here directly: HTTPS on its
    ``address``, reached here through `notebook --forward`; a kernel there reaches the
    controller and its ``engines``.  ``env``: the command's environment, added."""
    import socket
    import ssl

    from notebook_client import Jupyter

    saved = json.loads((home / "ipcluster" / f"{cluster}-{region}-notebook.json").read_text())
    assert saved["url"].startswith(f"https://{address}:")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    forward = subprocess.Popen(
        [sys.executable, "-m", "globular", "notebook", "--forward", "--port", str(port), cluster],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ, COLUMNS="200", **(env or {})),
    )
    try:
        lines = []
        for line in forward.stdout:
            lines.append(line)
            if "Forwarding" in line:
                break
        assert f"https://127.0.0.1:{port}/" in "".join(lines), lines
        cert = (home / "tls" / f"{cluster}-{region}" / "cert.pem").read_text()
        user = Jupyter(f"https://127.0.0.1:{port}/", ssl.create_default_context(cadata=cert))
        assert user.request("GET", "/api/contents")[0] == 403
        assert user.login(saved["password"])[0] == 302
        assert user.request("GET", "/api/contents")[0] == 200
        # a kernel on the master: Client() with no argument reaches the (encrypted) controller
        status, _, body = user.request("POST", "/api/contents", {"type": "notebook"})
        assert status == 201, body
        path = json.loads(body)["path"]
        status, _, body = user.request(
            "POST", "/api/sessions", {"path": path, "type": "notebook", "kernel": {"name": "python3"}}
        )
        assert status == 201, body
        code = "from ipyparallel import Client\nrc = Client()\nprint(len(rc.ids), rc[:].apply_sync(lambda: 7))\n"
        assert user.execute(json.loads(body)["kernel"]["id"], code).strip() == f"{engines} {[7] * engines}"
    finally:
        forward.send_signal(signal.SIGINT)
        forwarded = forward.wait(20)
    assert forwarded == 0


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"  # Debian's, driven by playwright (no download)


def needs_chromium() -> list[pytest.MarkDecorator]:
    """The marks of a browser test: skipped without Chromium, except in CI (a missing browser fails there)."""
    if os.path.exists(CHROMIUM) or os.environ.get("CI"):
        return []
    return [pytest.mark.skip(reason="needs chromium (apt-get install chromium)")]


def screenshot(name: str) -> Path | None:
    """Where a test saves the picture ``name`` for the docs (``scripts/screenshots`` sets
    ``GLOBULAR_SCREENSHOTS`` to ``docs/_static/screenshots``); None when no one asked."""
    folder = os.environ.get("GLOBULAR_SCREENSHOTS")
    if not folder:
        return None
    Path(folder).mkdir(parents=True, exist_ok=True)
    return Path(folder) / name


def terminal_picture(text: str, name: str, title: str, width: int = 160, home: Path | None = None) -> None:
    """``text`` (what a terminal showed) as an SVG terminal picture for the docs, if asked for
    (the test's ``home`` shown as ``~/.globular``)."""
    path = screenshot(name)
    if path is None:
        return
    if home is not None:
        text = text.replace(str(home), "~/.globular")
    import io

    from rich.console import Console
    from rich.text import Text

    console = Console(record=True, width=width, file=io.StringIO(), force_terminal=True)
    console.print(Text.from_ansi(text.rstrip()))
    svg = console.export_svg(title=title)
    path.write_text(re.sub(r",\s*url\([^)]*\) format\([^)]*\)", "", svg))  # no web fonts: the docs stay offline
