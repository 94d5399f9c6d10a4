"""Soak: repeated start / map / addnode / restart / terminate cycles through the library.

Opt-in (``pytest -m soak``, or ``scripts/soak``); bounded by GLOBULAR_SOAK_MINUTES
(default 3).  After every cycle: no process of the cluster left, this process's
file descriptors back to where they were, and no network namespace made.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time

import pytest

from conftest import processes_of, wait_until

pytestmark = [pytest.mark.soak, pytest.mark.cluster, pytest.mark.timeout(3600)]

CONFIG = (
    "[global]\ndefault_template = s\n"
    "[cluster s]\ncluster_size = 2\ncores_per_node = 1\nplugins = ipcluster\n"
    "[plugin ipcluster]\nsetup_class = ipcluster\nmaster_engines = 1\nencryption = {encryption}\n"
)
# libzmq can abort a process when a CURVE context closes (ipyparallel PR #553): its message
ABORTS = ("Assertion failed", "SIGABRT", "Aborted")


def square(x):
    return x * x


square.__module__ = "__main__"


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def namespaces() -> set[str]:
    try:
        out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    except FileNotFoundError:
        return set()
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def aborted_in_logs(home, live: set[int]) -> tuple[list[str], list[str]]:
    """Lines of the nodes' logs that tell of a libzmq abort: (in the controller or a live
    engine, in an engine that was being stopped).  The latter have been seen with and
    without curve (``Assertion failed: pfd.revents & POLLIN (src/signaler.cpp:238)`` as a
    retired engine exits) and lose nothing; the former would."""
    fatal, stopping = [], []
    for log in (home / "local").glob("*/*/logs/*.log"):
        lines = [
            f"{log.name}: {line}"
            for line in log.read_text(errors="replace").splitlines()
            if any(a in line for a in ABORTS)
        ]
        engine = log.stem.removeprefix("engine-")
        (stopping if engine.isdigit() and int(engine) not in live else fatal).extend(lines)
    return fatal, stopping


@pytest.mark.parametrize("encryption", ["curve", "none"])
def test_cycles_leak_no_process_fd_or_namespace(home, tmp_path, encryption):
    from globular import connect
    from globular import operations as cluster
    from globular.config import Config

    minutes = float(os.environ.get("GLOBULAR_SOAK_MINUTES", "3"))
    path = tmp_path / "config"
    path.write_text(CONFIG.format(encryption=encryption))
    config = Config.load(path)
    spec = config.cluster_spec()
    restart = config.plugin_spec("ipclusterrestart")
    netns_before = namespaces()
    baseline = None
    deadline = time.monotonic() + minutes * 60
    cycles = 0
    aborts_while_stopping = 0
    while cycles < 2 or time.monotonic() < deadline:
        cycles += 1
        name = f"soak{cycles}"
        asyncio.run(cluster.start(name, spec, home=home))
        rc = connect(name, home=home)
        try:
            assert wait_until(lambda rc=rc: len(rc.ids) == 2, timeout=30)
            assert rc[:].map_async(square, range(10)).get(60) == [x * x for x in range(10)]
            asyncio.run(cluster.add_nodes(name, 1, home=home))
            assert wait_until(lambda rc=rc: len(rc.ids) == 3, timeout=30)
            asyncio.run(cluster.run_plugin(name, restart, home=home))
            assert wait_until(lambda rc=rc: len(rc.ids) == 3, timeout=30)
            assert rc.load_balanced_view().map_async(square, range(30)).get(60) == [x * x for x in range(30)]
            fatal, stopping = aborted_in_logs(home, set(rc.ids))
            assert not fatal, fatal
            aborts_while_stopping += len(stopping)
        finally:
            rc.close()
            asyncio.run(cluster.terminate(name, home=home))
        assert wait_until(lambda: not processes_of(home), timeout=10), processes_of(home)
        assert namespaces() == netns_before
        if baseline is None:
            baseline = fds()  # after the first cycle: libraries' one-time files are open by then
        else:
            assert fds() <= baseline + 2, (cycles, fds(), baseline)
    print(
        f"{encryption}: {cycles} cycles, {fds()} fds (baseline {baseline}), "
        f"{aborts_while_stopping} libzmq aborts in engines being stopped"
    )
