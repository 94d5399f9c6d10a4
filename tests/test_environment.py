"""Node environments (globular.environment, and globular.node.env on the nodes).

The first part is pure logic (milliseconds, no processes).  The rest runs on the
netns test hosts with a bare Python (the standard library only, like a stranger's
machine) and a fresh environment folder per test, so that globular really
resolves the wheels here, ships them over SSH and builds the venvs there.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

import testhosts
from conftest import bare_hosts, other_python, shadowing_python, wait_until
from globular.config import Config
from globular.errors import ConfigError
from globular.wheelhouse import (
    Target,
    Wanted,
    digest,
    explain_pip_failure,
    probe_problems,
    target_platforms,
)

# -- pure logic ----------------------------------------------------------------------

LINUX = {"system": "linux", "machine": "x86_64", "libc": "glibc", "libc_version": "2.36", "platform": "linux-x86_64"}


def test_platforms_of_a_glibc_host_list_every_manylinux_level_it_admits():
    tags = target_platforms(LINUX)
    assert tags[0] == "manylinux_2_36_x86_64" and tags[-1] == "linux_x86_64"
    assert "manylinux_2_17_x86_64" in tags and "manylinux2014_x86_64" in tags and "manylinux1_x86_64" in tags
    assert "manylinux_2_37_x86_64" not in tags
    arm = target_platforms({**LINUX, "machine": "aarch64", "libc_version": "2.28"})
    assert arm[0] == "manylinux_2_28_aarch64" and "manylinux2014_aarch64" in arm
    assert "manylinux1_aarch64" not in arm and "manylinux_2_16_aarch64" not in arm


def test_platforms_of_musl_and_other_systems():
    musl = target_platforms({**LINUX, "libc": "musl", "libc_version": "1.2"})
    assert musl == ["musllinux_1_2_x86_64", "musllinux_1_1_x86_64", "musllinux_1_0_x86_64", "linux_x86_64"]
    assert target_platforms({"system": "darwin", "machine": "arm64", "platform": "macosx-11.0-arm64"}) == [
        "macosx_11_0_arm64"
    ]


def test_probe_problems_name_the_python_and_the_fix():
    facts = {"python": "3.12.1", "executable": "/usr/bin/python3", "venv": False}
    problems = probe_problems(facts, here=(3, 11))
    assert "Python 3.12.1 at /usr/bin/python3, 3.11 here" in problems[0]
    assert "no venv module" in problems[1] and "python3-venv" in problems[1]
    assert probe_problems({**facts, "python": "3.11.2", "venv": True}, here=(3, 11)) == []


TARGET = Target("cp", "3.11", "cp311", ("manylinux_2_36_x86_64", "linux_x86_64"))


def wanted(*pairs: tuple[str, str]) -> Wanted:
    return Wanted(tuple(sorted(r for r, _ in pairs)), tuple(pairs), None, None)


def test_digest_ignores_order_and_follows_packages_and_target():
    a = wanted(("pip", "globular"), ("toolz", "[cluster lab] packages"))
    b = Wanted(("toolz", "pip"), a.origins, None, None)
    assert digest(a, TARGET) == digest(Wanted(tuple(sorted(b.requirements)), a.origins, None, None), TARGET)
    assert digest(a, TARGET) != digest(wanted(("pip", "globular")), TARGET)
    assert digest(a, TARGET) != digest(a, Target("cp", "3.12", "cp312", TARGET.platforms))


CONFLICT = """\
ERROR: Cannot install ipyparallel==9.2.0 and tornado<5 because these package versions have conflicting dependencies.

The conflict is caused by:
    The user requested tornado<5
    ipyparallel 9.2.0 depends on tornado>=6.1

To fix this you could try to:
"""


def test_pip_failures_become_one_line_naming_package_origin_and_platform():
    w = wanted(("ipyparallel==9.2.0", "[plugin ipcluster]"), ("nosuch-pkg", "[cluster lab] packages"))
    assert explain_pip_failure(CONFLICT, w, TARGET) == (
        "version conflict between the packages asked for: The user requested tornado<5; ipyparallel 9.2.0 depends on tornado>=6.1"
    )
    missing = (
        "WARNING: Location 'file:///opt/x' is ignored\n"
        "ERROR: Could not find a version that satisfies the requirement nosuch-pkg (from versions: none)\n"
        "ERROR: No matching distribution found for nosuch-pkg\n"
    )
    assert explain_pip_failure(missing, w, TARGET, exists=lambda name: False) == (
        "no package named 'nosuch-pkg' on the package index (asked for by [cluster lab] packages)"
    )
    no_wheel = explain_pip_failure(missing, w, TARGET, exists=lambda name: True)
    assert "no wheel of nosuch-pkg for the nodes' CPython 3.11 on manylinux_2_36_x86_64" in no_wheel
    assert "wheelhouse = DIR" in no_wheel
    versions = (
        "ERROR: Could not find a version that satisfies the requirement nosuch_pkg==0.1 (from versions: 1.0, 2.0)\n"
    )
    assert "no version of 'nosuch-pkg' satisfies 'nosuch_pkg==0.1'" in explain_pip_failure(versions, w, TARGET)
    # a requirements file that includes itself: older pips crash with a RecursionError
    looped = dataclasses.replace(w, requirements_file="/tmp/reqs.txt")
    crash = "ERROR: Exception:\nTraceback (most recent call last):\n  ...\nRecursionError: maximum recursion depth exceeded\n"
    assert explain_pip_failure(crash, looped, TARGET) == (
        "requirements = /tmp/reqs.txt includes itself (-r), directly or through another file"
    )
    newer = "ERROR: /tmp/reqs.txt recursively references itself in reqs.txt\n"
    assert explain_pip_failure(newer, looped, TARGET) == "/tmp/reqs.txt recursively references itself in reqs.txt"
    assert explain_pip_failure("ERROR: Exception:\nOSError: [Errno 28] No space left on device\n", w, TARGET) == (
        "OSError: [Errno 28] No space left on device"
    )


def cluster_config(tmp_path: Path, body: str) -> Config:
    path = tmp_path / "config"
    path.write_text(body)
    return Config.load(path)


def test_environment_settings_are_checked_with_file_line_section_and_key(tmp_path):
    base = "[cluster lab]\nprovider = local\nplugins = ipcluster\n[plugin ipcluster]\nsetup_class = ipcluster\n"
    with pytest.raises(ConfigError) as missing:
        cluster_config(
            tmp_path, base + "[cluster req]\nextends = lab\nenvironment = managed\nrequirements = nope.txt\n"
        ).cluster_spec("req")
    assert (
        str(missing.value)
        == f"{tmp_path / 'config'}:9 [cluster req] requirements: file {str(tmp_path / 'nope.txt')!r} does not exist"
    )
    with pytest.raises(ConfigError) as system:
        cluster_config(tmp_path, base + "[cluster pk]\nextends = lab\npackages = numpy\n").cluster_spec("pk")
    assert "[cluster pk] packages: packages go into the node environment" in str(system.value)
    assert "the default of provider 'local'" in str(system.value)
    with pytest.raises(ConfigError) as bad:
        cluster_config(
            tmp_path, base + "[cluster b]\nextends = lab\nenvironment = managed\npackages = numpy>>2\n"
        ).cluster_spec("b")
    assert ":9 [cluster b] packages: " in str(bad.value) and "'numpy>>2' is not a package requirement" in str(bad.value)
    (tmp_path / "reqs.txt").write_text("toolz\n")
    spec = cluster_config(
        tmp_path, base + "[cluster ok]\nextends = lab\nenvironment = managed\nrequirements = reqs.txt\n"
    ).cluster_spec("ok")
    assert spec.environment.requirements == str(tmp_path / "reqs.txt") and spec.environment.mode == "managed"


def test_starcluster_package_plugins(tmp_path):
    from globular.plugins.pypkginstaller import PyPkgInstaller
    from globular.state import NodeRecord
    from globular.wheelhouse import wanted_for

    text = (
        "[cluster lab]\nprovider = ssh\nnode_hosts = a, b\nplugins = ipcluster, pypkginstaller\npackages = toolz\n"
        "[plugin ipcluster]\nsetup_class = starcluster.plugins.ipcluster.IPCluster\npacker = msgpack\nenable_notebook = true\n"
        "[plugin pypkginstaller]\nsetup_class = starcluster.plugins.pypkginstaller.PyPkgInstaller\npackages = numpy>=2, scipy\n"
        "[plugin apt]\nsetup_class = starcluster.plugins.pkginstaller.PackageInstaller\npackages = htop\n"
        "[cluster sys]\nextends = lab\nenvironment = system\npackages =\n"
    )
    config = cluster_config(tmp_path, text)
    spec = config.cluster_spec("lab")
    from globular.cluster import load_plugin

    plugins = [load_plugin(p) for p in spec.plugins]
    assert isinstance(plugins[1], PyPkgInstaller)
    import ipyparallel
    import msgpack

    master = NodeRecord(name="master", address="a", workdir="/w", cores=1, python="python3")
    other = master.model_copy(update={"name": "node001"})
    on_master, on_other = wanted_for(spec, plugins, master), wanted_for(spec, plugins, other)
    assert f"ipyparallel=={ipyparallel.__version__}" in on_other.requirements
    assert f"msgpack=={msgpack.version[0]}.{msgpack.version[1]}.{msgpack.version[2]}" in on_other.requirements
    assert {"numpy>=2", "scipy", "toolz", "pip"} <= set(on_other.requirements)
    assert any(r.startswith("jupyterlab") for r in on_master.requirements)
    assert not any(r.startswith("jupyterlab") for r in on_other.requirements)
    assert ("numpy>=2", "[plugin pypkginstaller]") in on_other.origins
    with pytest.raises(ConfigError) as system:
        config.cluster_spec("sys")
    assert "[plugin pypkginstaller] setup_class: plugin 'pypkginstaller' installs packages" in str(system.value)
    with pytest.raises(ConfigError) as apt:
        config.plugin_spec("apt")
    assert "pkginstaller (apt packages) is not supported" in str(apt.value)


# -- on the test hosts ------------------------------------------------------------------

reason = testhosts.available()
hosts_needed = pytest.mark.skipif(reason is not None, reason=reason or "")


@pytest.fixture(scope="module")
def net(tmp_path_factory, bare_python):
    with bare_hosts(tmp_path_factory.mktemp("envhosts"), 3, bare_python) as hosts:
        yield hosts


def env_config(
    net,
    tmp_path,
    *,
    hosts: int = 3,
    python: str | None = None,
    cluster: str = "",
    ipcluster: str = "",
    remote_dir: Path | None = None,
) -> str:
    path = tmp_path / "config"
    path.write_text(
        "[global]\ndefault_template = lab\n[cluster lab]\nprovider = ssh\n"
        f"node_hosts = {', '.join(f'root@{h.address}' for h in net.hosts[:hosts])}\n"
        f"ssh_key = {net.key}\nknown_hosts = {net.known_hosts}\npython = {python or net.python}\n"
        f"remote_dir = {remote_dir or tmp_path / 'hosts'}\ncores_per_node = 1\nconnect_timeout = 3\n"
        f"plugins = ipcluster\n{cluster}[plugin ipcluster]\nsetup_class = ipcluster\n{ipcluster}"
    )
    return str(path)


def step_lines(output: str) -> dict[str, str]:
    """The per-node step lines of `start` (the last one drawn for each node)."""
    lines = {}
    for line in output.splitlines():
        found = re.search(r"\b(master|node\d{3})\s+(provision|ssh) .*", line)
        if found:
            lines[found[1]] = found[0]
    return lines


def environments(root: Path) -> dict[str, Path]:
    """name -> the folder its link points to."""
    if not root.is_dir():
        return {}
    return {p.name: p.resolve() for p in root.iterdir() if p.is_symlink()}


def no_processes_left(net, folder: Path) -> bool:
    for host in net.hosts:
        out = net.ssh(host, "ps -eo args")
        if any(str(folder) in line and "ps -eo" not in line for line in out.stdout.splitlines()):
            return False
    return True


def processes_in(folder: Path) -> list[int]:
    """This machine's processes (the netns hosts share its pids) whose command line names ``folder``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                args = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(folder) in args:
                found.append(int(entry.name))
    return found


def pending_signals(pid: int) -> set[int]:
    """The signals waiting for (stopped) process ``pid``: its own and its thread group's."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return set()
    mask = 0
    for line in status.splitlines():
        if line.startswith(("SigPnd:", "ShdPnd:")):
            mask |= int(line.split()[1], 16)
    return {bit + 1 for bit in range(64) if mask >> bit & 1}


@hosts_needed
@pytest.mark.cluster
def test_bare_hosts_get_user_packages_and_a_second_start_installs_nothing(net, cli, home, tmp_path):
    config = env_config(net, tmp_path, cluster="packages = toolz, msgpack\n")
    first = cli("-c", config, "start", "lab", timeout=600)
    assert first.returncode == 0, first.output
    lines = step_lines(first.stderr)  # progress goes to stderr
    assert set(lines) == {"master", "node001", "node002"}, first.output
    # the hosts share one file system: one node builds, the others wait for it and find it made
    assert any(re.search(r"env \d+\.\ds", line) and "env cached" not in line for line in lines.values()), lines
    envs = environments(tmp_path / "hosts" / "envs")
    assert len(envs) == 1, envs
    (folder,) = envs.values()
    built = (folder / "bin" / "python").lstat().st_mtime_ns, folder.stat().st_mtime_ns

    def imports() -> tuple[str, str, str]:
        import sys

        import msgpack
        import toolz

        return sys.prefix, toolz.__name__, msgpack.packb([1]).hex()

    from globular import connect

    client = connect("lab")
    try:
        imports.__module__ = "__main__"
        answers = client[:].apply_sync(imports)
    finally:
        client.close()
    assert len(answers) == 3 and all(a[1:] == ("toolz", "9101") for a in answers), answers
    assert all(Path(a[0]).resolve() == folder for a in answers), answers
    assert cli("terminate", "-y", "lab").returncode == 0

    started = time.monotonic()
    second = cli("-c", config, "start", "lab", timeout=300)
    elapsed = time.monotonic() - started
    assert second.returncode == 0, second.output
    lines = step_lines(second.stderr)
    assert all("env cached" in line for line in lines.values()), lines
    status = json.loads(cli("status", "lab", "--output", "json").stdout)["result"]
    assert all(n["steps"]["env cached"] < 1.0 for n in status["nodes"]), status["nodes"]
    assert ((folder / "bin" / "python").lstat().st_mtime_ns, folder.stat().st_mtime_ns) == built
    assert elapsed < 30, elapsed
    # a cached environment costs no second Python on the node: the helper started with the host's
    # Python answers the env probe, the preflight (its module answers kept in the environment by the
    # first start) and the rest; the environment's Python runs the engines only
    this_start = (home / "logs" / "lab.log").read_text().split("starting cluster lab")[-1]
    helpers = Counter(re.findall(r"(\w+) \(root@[^)]*\): starting its helper", this_start))
    assert helpers == {"master": 1, "node001": 1, "node002": 1}, this_start
    assert "nodeproc facts" not in this_start and "nodeproc node_facts" in this_start
    assert (folder / "globular-preflight.json").is_file()
    assert cli("terminate", "-y", "lab").returncode == 0
    assert (tmp_path / "hosts" / "envs").is_dir()  # terminate leaves the cache

    pruned = cli("-c", config, "env", "prune", "--wheels")
    assert pruned.returncode == 0, pruned.output
    assert "1 environment removed" in pruned.stdout and "wheelhouse removed" in pruned.stdout
    assert not environments(tmp_path / "hosts" / "envs") and not folder.exists()
    assert no_processes_left(net, tmp_path / "hosts")


@hosts_needed
@pytest.mark.cluster
def test_packages_that_cannot_be_had_are_named_and_nothing_is_left(net, cli, home, tmp_path):
    config = env_config(net, tmp_path, hosts=2, cluster="packages = globular-no-such-package-zq9\n")
    result = cli("-c", config, "start", "nosuch", timeout=300)
    assert result.returncode == 2, result.output
    assert (
        "no package named 'globular-no-such-package-zq9' on the package index (asked for by [cluster lab] packages)"
        in result.stderr
    )
    assert not (home / "clusters" / "nosuch.json").exists()

    config = env_config(net, tmp_path, hosts=2, cluster="packages = traitlets<5\n")  # ipyparallel needs traitlets>=5
    result = cli("-c", config, "start", "conflict", timeout=300)
    assert result.returncode == 2, result.output
    assert "version conflict between the packages asked for: The user requested traitlets<5" in result.stderr
    assert "ipyparallel" in result.stderr
    assert not (home / "clusters" / "conflict.json").exists()
    assert not environments(tmp_path / "hosts" / "envs")
    assert no_processes_left(net, tmp_path / "hosts")


@hosts_needed
@pytest.mark.cluster
def test_a_host_with_another_python_is_named_before_anything_is_built(net, cli, home, tmp_path):
    other = other_python()
    if other is None:
        pytest.skip("no Python of another major.minor on this machine")
    config = env_config(net, tmp_path, hosts=2, python=other)
    result = cli("-c", config, "start", "otherpy", timeout=120)
    assert result.returncode == 1, result.output
    here = f"{sys.version_info[0]}.{sys.version_info[1]} here"
    assert "master: Python" in result.stderr and here in result.stderr and "node001: Python" in result.stderr
    assert "functions sent from here would not run there" in result.stderr
    assert not (home / "clusters" / "otherpy.json").exists()
    checked = cli("-c", config, "check", "otherpy", "--output", "json", timeout=120)
    assert checked.returncode == 1 and all(not c["ok"] for c in json.loads(checked.stdout)["result"]["checks"])


@hosts_needed
@pytest.mark.cluster
def test_an_interrupted_build_is_never_trusted(net, cli, home, tmp_path):
    """globular is killed (SIGKILL: its SSH connections drop, as when the host drops)
    while the environment is being built; the builder on the host goes with it, and
    the next start does not trust the half-made folder: it builds anew and removes it."""
    config = env_config(net, tmp_path, hosts=1)
    root = tmp_path / "hosts" / "envs"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent))
    proc = subprocess.Popen(
        [sys.executable, "-m", "globular", "-c", config, "start", "cut"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )

    def partial() -> list[Path]:
        if not root.is_dir():
            return []
        return [p for p in root.iterdir() if not p.name.startswith(".") and p.is_dir() and not p.is_symlink()]

    builders: list[int] = []
    try:
        assert wait_until(lambda: any((p / "bin" / "python").exists() for p in partial()), timeout=120), (
            "no build began"
        )
        # freeze the builder, so that its own clean-up cannot race this test: the host
        # drops it hard below, as a host that loses power would
        builders = processes_in(tmp_path / "hosts")
        assert builders, "no builder process on the host"
        for pid in builders:
            os.kill(pid, signal.SIGSTOP)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    try:  # the builder goes with its session: SIGTERM is on its way to it
        assert wait_until(lambda: any(signal.SIGTERM in pending_signals(pid) for pid in builders), timeout=30), (
            "the builder would outlive globular"
        )
    finally:
        for pid in builders:
            os.kill(pid, signal.SIGKILL)
    (half,) = partial()
    assert not environments(root)  # no link: nothing trusts it
    assert wait_until(lambda: no_processes_left(net, tmp_path / "hosts"), timeout=30), "the builder outlived globular"
    assert cli("terminate", "-y", "cut").returncode == 0  # the killed start's record

    again = cli("-c", config, "start", "cut", timeout=600)
    assert again.returncode == 0, again.output
    assert "env cached" not in step_lines(again.stderr)["master"]
    assert not half.exists() and len(environments(root)) == 1
    assert cli("terminate", "-y", "cut").returncode == 0


@hosts_needed
@pytest.mark.cluster
def test_two_clusters_started_at_once_on_the_same_hosts_build_one_environment(net, cli, home, tmp_path):
    config = env_config(net, tmp_path, hosts=2)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent), COLUMNS="200")
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "globular", "-c", config, "start", name],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("twin1", "twin2")
    ]
    outputs = [p.communicate(timeout=600) for p in procs]
    try:
        assert [p.returncode for p in procs] == [0, 0], outputs
        built = [line for _, err in outputs for line in step_lines(err).values() if "env cached" not in line]
        assert len(built) == 1, outputs  # one writer; the three others waited and found it made
        assert len(environments(tmp_path / "hosts" / "envs")) == 1
        assert not [
            p
            for p in (tmp_path / "hosts" / "envs").iterdir()
            if not p.name.startswith(".")
            and not p.is_symlink()
            and p.resolve() not in environments(tmp_path / "hosts" / "envs").values()
        ]
    finally:
        for name in ("twin1", "twin2"):
            if (home / "clusters" / f"{name}.json").exists():
                cli("terminate", "-y", name)


@hosts_needed
@pytest.mark.cluster
def test_a_python_without_ensurepip_still_gets_its_environment(net, cli, home, tmp_path):
    """Debian/Ubuntu without python3-venv: `venv` works, `ensurepip` does not. globular
    never needs it (venv --without-pip, then pip from its own wheel)."""
    wrapper = shadowing_python(
        tmp_path, net.python, "ensurepip", "raise ImportError('No module named ensurepip (test: no python3-venv)')\n"
    )
    assert subprocess.run([str(wrapper), "-c", "import ensurepip"], capture_output=True).returncode != 0
    config = env_config(net, tmp_path, hosts=1, python=str(wrapper))
    result = cli("-c", config, "start", "noensurepip", timeout=600)
    try:
        assert result.returncode == 0, result.output
        assert len(environments(tmp_path / "hosts" / "envs")) == 1
        assert cli("terminate", "-y", "noensurepip").returncode == 0
    finally:
        if (home / "clusters" / "noensurepip.json").exists():
            cli("terminate", "-y", "noensurepip")


@hosts_needed
@pytest.mark.cluster
def test_too_little_disk_on_a_host_is_named(net, cli, home, tmp_path):
    """A 6 MB file system under remote_dir on the hosts (mounted in each host's own mount
    namespace, where its sshd runs): the environment would need far more."""
    small = tmp_path / "small"
    small.mkdir()
    hosts = net.hosts[:2]
    for host in hosts:
        subprocess.run(
            ["nsenter", "-t", str(host.sshd_pid), "-m", "mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(small)],
            check=True,
        )
    try:
        config = env_config(net, tmp_path, hosts=2, remote_dir=small)
        result = cli("-c", config, "start", "tiny", timeout=300)
        if result.returncode == 0:
            cli("terminate", "-y", "tiny")
        assert result.returncode == 1, result.output
        assert re.search(r"master: only \d+ MB free under \S+; its environment needs about \d+ MB", result.stderr), (
            result.stderr
        )
        assert not (home / "clusters" / "tiny.json").exists()
        listed = net.ssh(hosts[0], f"find {small} -type f")
        assert listed.returncode == 0 and not listed.stdout.strip(), listed.stdout
    finally:
        for host in hosts:
            subprocess.run(["nsenter", "-t", str(host.sshd_pid), "-m", "umount", str(small)], check=False)


@hosts_needed
@pytest.mark.cluster
def test_a_wheelhouse_folder_replaces_the_index(net, cli, home, tmp_path):
    """wheelhouse = DIR (air-gapped sites): pip resolves from DIR alone; a package that is not
    in it is named with the folder, whatever the index has."""
    from globular.providers.base import NODE_SOURCE
    from globular.wheelhouse import Target, resolve

    probe = subprocess.run(
        [net.python, "-c", NODE_SOURCE, "env_probe", json.dumps({"root": str(tmp_path / "x")})],
        capture_output=True,
        text=True,
        check=True,
    )
    import ipyparallel

    filled = asyncio.run(
        resolve(
            wanted(("pip", "globular"), (f"ipyparallel=={ipyparallel.__version__}", "ipcluster"), ("toolz", "test")),
            Target.from_probe(json.loads(probe.stdout)),
            tmp_path / "fill",
        )
    )
    folder = tmp_path / "wheels-offline"
    folder.mkdir()
    for name in filled.wheels:
        (folder / name).write_bytes((filled.path / name).read_bytes())
    # an index that cannot answer: with wheelhouse set, pip must not ask it
    offline = {"PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_EXTRA_INDEX_URL": "http://127.0.0.1:9/simple"}
    config = env_config(net, tmp_path, hosts=1, cluster=f"packages = toolz\nwheelhouse = {folder}\n")
    result = cli("-c", config, "start", "airgap", timeout=300, env=offline)
    try:
        assert result.returncode == 0, result.output
        assert cli("terminate", "-y", "airgap").returncode == 0
    finally:
        if (home / "clusters" / "airgap.json").exists():
            cli("terminate", "-y", "airgap")
    config = env_config(net, tmp_path, hosts=1, cluster=f"packages = toolz, msgpack\nwheelhouse = {folder}\n")
    missing = cli("-c", config, "start", "airgap", timeout=300, env=offline)
    assert missing.returncode == 2, missing.output
    assert f"no wheel of msgpack in wheelhouse = {folder}" in missing.stderr
    assert "(asked for by [cluster lab] packages)" in missing.stderr


# -- the builder on its own (this machine, no hosts) -------------------------------------------


@pytest.mark.parametrize("installer", ["uv", "pip"])
def test_the_builder_installs_with_uv_or_falls_back_to_pip(tmp_path, bare_python, installer):
    """globular.node.env's build, run as on a node: a tar stream of wheels on stdin, a venv
    made from a bare Python.  With uv's wheel named as the installer uv installs (and is not
    itself installed); without it, pip from its own wheel."""
    import io
    import tarfile

    from globular.providers.base import NODE_SOURCE
    from globular.wheelhouse import Target, resolve, target_platforms

    probe = subprocess.run(
        [bare_python, "-c", NODE_SOURCE, "env_probe", json.dumps({"root": str(tmp_path / "envs")})],
        capture_output=True,
        text=True,
        check=True,
    )
    facts = json.loads(probe.stdout)
    assert target_platforms(facts)[-1].startswith("linux_") and facts["venv"] and facts["ready"] == []
    house = asyncio.run(
        resolve(wanted(("pip", "globular"), ("toolz", "test")), Target.from_probe(facts), tmp_path / "wheels")
    )
    assert house.installer.get("wheel", "").startswith("uv-") and not house.installer["install"]
    cached = asyncio.run(
        resolve(wanted(("pip", "globular"), ("toolz", "test")), Target.from_probe(facts), tmp_path / "wheels")
    )
    assert (cached.path, cached.wheels, cached.installer) == (
        house.path,
        house.wheels,
        house.installer,
    )  # from the cache
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name in house.wheels:
            if installer == "uv" or not name.startswith("uv-"):
                tar.add(house.path / name, arcname=name)
    request = {
        "root": str(tmp_path / "envs"),
        "name": "0123456789abcdef0123",
        "installer": house.installer if installer == "uv" else {},
    }
    built = subprocess.run(
        [bare_python, "-c", NODE_SOURCE, "env_build", json.dumps(request)], input=buffer.getvalue(), capture_output=True
    )
    assert built.returncode == 0, built.stderr.decode()
    reply = json.loads(built.stdout)
    assert reply["cached"] is False and reply["python"].endswith("/0123456789abcdef0123/bin/python")
    listed = subprocess.run(
        [reply["python"], "-c", "import toolz, importlib.util as u; print(u.find_spec('uv') is None)"],
        capture_output=True,
        text=True,
    )
    assert listed.returncode == 0 and listed.stdout.strip() == "True", listed.stderr
    again = subprocess.run(
        [bare_python, "-c", NODE_SOURCE, "env_build", json.dumps(request)], input=buffer.getvalue(), capture_output=True
    )
    assert json.loads(again.stdout)["cached"] is True
    assert sorted(p.name for p in (tmp_path / "envs").iterdir() if not p.name.startswith(".")) == [
        "0123456789abcdef0123",
        os.readlink(tmp_path / "envs" / "0123456789abcdef0123"),
    ]


def test_a_node_line_says_when_its_environment_was_cached():
    from globular.reporting import step_label
    from globular.state import NodeRecord

    node = NodeRecord(name="node001", address="a", workdir="/w", cores=1, python="python3")
    assert step_label(node, "env") == "env"
    node.data["env"] = {"cached": True}
    assert step_label(node, "env") == "env cached" and step_label(node, "engines") == "engines"


def test_a_full_disk_on_a_node_is_one_line_naming_enospc(monkeypatch, capsys):
    """A node program: an OSError (the disk filled mid-build) is one line with its errno's name."""
    from globular import node
    from globular.node.serve import main

    def fill(req):
        raise OSError(28, "No space left on device", "/data/envs/x/lib")

    monkeypatch.setitem(node.VERBS, "fill", fill)
    with pytest.raises(SystemExit) as ended:
        main(["node", "fill", "{}"])
    assert ended.value.code == 3
    assert capsys.readouterr().err == "No space left on device (ENOSPC): /data/envs/x/lib\n"
