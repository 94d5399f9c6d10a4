"""Engines forked from one warm interpreter (``engine_fork``, the default on nodes with two
engines or more), and with it off: real engines and ipyparallel's own nannies on a local node,
seen from outside (pids, sessions, process names) and through a client (pids, random state,
an interrupt through the nanny, a killed engine reported by its nanny)."""

from __future__ import annotations

import os
import signal

import psutil
import pytest

from conftest import read_record, recorded_pids, wait_until

pytestmark = pytest.mark.cluster

CONFIG = """
[global]
default_template = t
[cluster t]
provider = local
cluster_size = 1
cores_per_node = 3
plugins = ipcluster
[plugin ipcluster]
setup_class = ipcluster
master_engines = 3
engine_fork = {fork}
"""


def nap(path: str) -> None:
    import time

    open(path, "w").close()
    time.sleep(60)


nap.__module__ = "__main__"  # sent by value


@pytest.mark.parametrize("fork", [True, False])
def test_engines_have_their_own_pids_sessions_random_state_and_a_working_nanny(cli, home, write_config, tmp_path, fork):
    from ipyparallel import Client, RemoteError

    config = write_config(CONFIG.format(fork=fork))
    started = cli("-c", str(config), "start", "f")
    try:
        assert started.returncode == 0, started.output
        pids = recorded_pids(read_record(home, "f"), "ipengine")
        assert len(pids) == 3
        for pid in pids:
            engine = psutil.Process(pid)
            assert os.getsid(pid) == pid  # a session of its own, stopped as a group
            if fork:
                assert engine.name() == "ipengine" and engine.cmdline()[1].endswith("/run/forkstart.py")
            else:
                assert engine.cmdline()[1:3] == ["-m", "ipyparallel.engine"]
            [nanny] = engine.children()  # ipyparallel's nanny: the engine's child, in a session of its own
            assert os.getsid(nanny.pid) == nanny.pid
            assert nanny.name() == "ipengine-nanny" if fork else "ipyparallel.engine.nanny" in nanny.cmdline()

        client = Client(str(home / "ipcluster" / "f-local.json"))
        try:
            client.wait_for_engines(3, timeout=30)
            ids = sorted(client.ids)
            assert sorted(client[ids].apply_sync(os.getpid)) == sorted(pids)
            draws = client[ids].apply_sync(lambda: __import__("random").random())
            assert len(set(draws)) == 3  # a forked child is reseeded
            # what a forked engine inherits is frozen: its collections (and its exit) skip it
            frozen = client[ids].apply_sync(lambda: __import__("gc").get_freeze_count())
            assert all(n > 10_000 for n in frozen) if fork else frozen == [0, 0, 0], frozen

            # an interrupt reaches a busy engine through its nanny (Client.send_signal)
            began = tmp_path / "began"
            busy = client[ids[0]].apply_async(nap, str(began))
            assert wait_until(began.exists, timeout=10)
            client.send_signal(signal.SIGINT, targets=[ids[0]], block=True)
            with pytest.raises(RemoteError, match="KeyboardInterrupt"):
                busy.get(timeout=15)

            # a killed engine is reported by its nanny at once, not after the heartbeat's window
            victim = client[ids[1]].apply_sync(os.getpid)
            os.kill(victim, signal.SIGKILL)
            assert wait_until(lambda: ids[1] not in client.ids, timeout=3), client.ids
        finally:
            client.close()
    finally:
        stopped = cli("terminate", "-y", "f")
    assert stopped.returncode == 0, stopped.output
