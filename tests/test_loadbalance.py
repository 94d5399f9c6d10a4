"""The balancer on a real local cluster: `globular loadbalance` grows it on waiting tasks and
shrinks idle nodes, never one whose engine works; and the race a scale-down runs against the
scheduler, driven at its critical moment, with the balancer's drain and with a naive one."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import TESTS, gone, read_record, wait_until

pytestmark = pytest.mark.cluster

CONFIG = """\
[global]
default_template = t
[cluster t]
provider = local
cores_per_node = 1
plugins = ipcluster
min_nodes = 1
max_nodes = 3
polling_interval = 0.5s
wait_time = 1s
add_nodes_per_iteration = 2
kill_after = {kill_after}
stabilization_time = 1s
[plugin ipcluster]
setup_class = ipcluster
master_engines = 1
"""


def slow_square(x, seconds=3.0):
    import time

    time.sleep(seconds)
    return x * x


def node_of(home, name: str, engine: int) -> str:
    return read_record(home, name)["plugin_data"]["ipcluster"]["engine_ids"][str(engine)]


def node001_of(home) -> dict | None:
    return next((n for n in read_record(home, "heal")["nodes"] if n["name"] == "node001"), None)


def desired(home, name: str) -> list[str]:
    return read_record(home, name)["desired"]


def test_loadbalance_grows_on_waiting_tasks_and_shrinks_idle_nodes_but_never_a_busy_one(cli, home, write_config):
    config = write_config(CONFIG.format(kill_after="4s"))
    started = cli("-c", str(config), "start", "lb")
    assert started.returncode == 0, started.stderr
    assert "Its balancer follows the work (1..3 nodes) in the background, pid " in started.stdout
    assert desired(home, "lb") == ["master"]  # no -s: min_nodes
    detached = read_record(home, "lb")["balancer"]["pid"]
    stopped = cli("loadbalance", "--stop", "lb")  # this test watches one in the foreground instead
    assert stopped.returncode == 0 and f"Stopped the balancer of lb (pid {detached})" in stopped.stdout
    assert gone(detached)
    assert "No balancer runs for lb" in cli("loadbalance", "--stop", "lb").stdout
    for args, message in [
        (["-m", "99"], "-m 99: the cluster may have at most 3 nodes (max_nodes)"),
        (["-n", "4"], "-n 4 is more than max_nodes (3)"),
        (["-i", "60"], "'60': give a unit, such as 60s or 60m"),
        (["-k", "soon"], "'soon' is not a duration"),
    ]:
        bad = cli("loadbalance", *args, "lb")
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
    env = {**os.environ, "PYTHONPATH": str(TESTS), "COLUMNS": "200"}
    balancer = subprocess.Popen(
        [sys.executable, "-m", "globular", "-c", str(config), "loadbalance", "lb"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    from ipyparallel import Client

    client = Client(str(home / "ipcluster" / "lb-local.json"))
    try:
        view = client.load_balanced_view()
        started = time.monotonic()
        squares = view.map_async(slow_square, range(12))
        assert wait_until(lambda: len(desired(home, "lb")) == 3, timeout=30), desired(home, "lb")
        seen = cli("top", "--once", "lb")  # the target and the balancer beside the queue
        assert (
            seen.returncode == 0
            and "nodes 3" in seen.stdout
            and f"(balancer running (pid {balancer.pid}), 1..3 nodes)" in seen.stdout
        ), seen.output
        frame = json.loads(cli("top", "--once", "--output", "json", "lb").stdout)["result"]
        assert frame["desired"] == 3 and frame["balancer"].startswith("running"), frame
        assert squares.get(timeout=60) == [x * x for x in range(12)]
        # one engine could not have done it: 12 tasks of 3 s take 36 s there
        assert time.monotonic() - started < 30
        assert len({e for e in squares.engine_id}) == 3

        # idle, it shrinks to min_nodes, but a node whose engine runs a task stays until it ends
        long = view.apply_async(slow_square, 7, 12.0)
        working: list[int] = []

        def one_engine_works() -> bool:
            working[:] = [e for e, q in client.queue_status().items() if e != "unassigned" and q["tasks"]]
            return len(working) == 1

        assert wait_until(one_engine_works, timeout=10)
        busy_node = node_of(home, "lb", working[0])
        assert wait_until(lambda: len(desired(home, "lb")) == (1 if busy_node == "master" else 2), timeout=20)
        assert busy_node in desired(home, "lb")
        assert long.get(timeout=30) == 49
        assert wait_until(lambda: desired(home, "lb") == ["master"], timeout=20), desired(home, "lb")

        shown = json.loads(cli("status", "lb", "--output", "json").stdout)["result"]["balancer"]
        assert shown["running"] and shown["pid"] == balancer.pid and (shown["min_nodes"], shown["max_nodes"]) == (1, 3)
        assert {"add", "remove"} <= {e["kind"] for e in shown["events"]}
        assert all(e["text"] for e in shown["events"])  # each with its reason
        listed = cli("listclusters")
        assert "running (pid" in listed.stdout and "1..3 nodes" in listed.stdout, listed.stdout
        second = cli("loadbalance", "lb")
        assert second.returncode == 1 and f"has a balancer already (pid {balancer.pid}" in second.stderr
    finally:
        client.close()
        balancer.send_signal(signal.SIGINT)
        out, err = balancer.communicate(timeout=30)
    assert balancer.returncode == 0, err
    assert "Balancer stopped; cluster lb left as it is: 1 node" in out
    lines = out.splitlines()
    assert any(" added node001, node002 -> 3 nodes: " in line and "waited" in line for line in lines), out
    assert any(" removed " in line and "idle for" in line for line in lines), out
    assert err == ""  # nothing of a third party's on the user's screen
    log = (home / "logs" / "lb.log").read_text()
    assert "balancer: add: " in log and "balancer: remove: " in log  # every decision in the cluster's log
    assert "stopped" in cli("status", "lb").stdout  # the last balancer, and its decisions, stay shown

    # one that was stopped (or killed) does not block the next; terminate stops a running one first
    again = subprocess.Popen(
        [sys.executable, "-m", "globular", "loadbalance", "-k", "1m", "lb"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        assert wait_until(lambda: "running (pid" in cli("listclusters").stdout, timeout=20)
        assert cli("terminate", "-y", "lb").returncode == 0
        out, err = again.communicate(timeout=30)
    finally:
        if again.poll() is None:
            again.kill()
            again.wait()
    assert again.returncode == 0 and err == "", err
    assert "cluster lb is gone" in out or "Balancer stopped" in out, out


def test_a_node_killed_with_9_is_replaced_and_a_map_with_retries_completes(cli, home, write_config):
    config = write_config(CONFIG.format(kill_after="10m").replace("min_nodes = 1", "min_nodes = 2"))
    assert cli("-c", str(config), "start", "heal").returncode == 0
    assert desired(home, "heal") == ["master", "node001"]
    first = read_record(home, "heal")["balancer"]["pid"]  # start detached it: min_nodes is set
    from ipyparallel import Client

    client = Client(str(home / "ipcluster" / "heal-local.json"))
    try:
        view = client.load_balanced_view()
        view.retries = 3  # what re-runs a task whose engine died: ipyparallel's own retries
        squares = view.map_async(slow_square, range(8), [1.0] * 8)
        assert wait_until(lambda: sum(q["tasks"] for e, q in client.queue_status().items() if e != "unassigned") == 2)
        killed = {p["pid"] for p in node001_of(home)["processes"]}
        for pid in killed:
            os.kill(pid, signal.SIGKILL)

        def replaced() -> bool:  # a new node001 (the name is free again), with processes of its own
            node = node001_of(home)
            return node is not None and bool(node["processes"]) and not killed & {p["pid"] for p in node["processes"]}

        assert wait_until(replaced, timeout=60)
        assert squares.get(timeout=90) == [x * x for x in range(8)]
        assert wait_until(lambda: len(client.ids) >= 2, timeout=30)  # the replacement's engine took its place
    finally:
        client.close()
    balancer_log = home / "logs" / "heal.balancer.log"  # the line follows the record's change
    assert wait_until(lambda: " added node001 -> 2 nodes: replacing node001" in balancer_log.read_text(), timeout=15)
    assert " lost node001: its process is gone" in balancer_log.read_text()

    # killed with -9, the balancer leaves the cluster as it is, and --detach starts a new one
    before = desired(home, "heal")
    os.kill(first, signal.SIGKILL)
    assert wait_until(lambda: gone(first))
    assert "stopped, 2..3 nodes" in cli("listclusters").stdout
    assert desired(home, "heal") == before
    again = cli("loadbalance", "--detach", "heal")
    assert again.returncode == 0 and "running in the background (pid " in again.stdout, again.stderr
    second = read_record(home, "heal")["balancer"]["pid"]
    assert second != first and not gone(second)
    refused = cli("loadbalance", "--detach", "heal")
    assert refused.returncode == 1 and f"has a balancer already (pid {second}" in refused.stderr
    assert cli("terminate", "-y", "heal").returncode == 0
    assert gone(second)  # terminate stopped it first


def test_an_engine_that_left_the_controller_is_started_again_in_place_beside_a_busy_one(cli, home, write_config):
    """A frozen engine (SIGSTOP: alive, silent past the controller's heartbeat window) is
    dropped by the controller; the balancer stops it by pid and starts a new engine on the
    same node, while the node's other engine runs a task to its end."""
    config = CONFIG.format(kill_after="10m").replace("min_nodes = 1", "min_nodes = 2")
    config = config.replace("max_nodes = 3", "max_nodes = 2").replace("cores_per_node = 1", "cores_per_node = 2")
    assert cli("-c", str(write_config(config)), "start", "revive").returncode == 0
    before = next(n for n in read_record(home, "revive")["nodes"] if n["name"] == "node001")
    frozen, working = [p for p in before["processes"] if p["role"] == "ipengine"]
    from ipyparallel import Client

    client = Client(str(home / "ipcluster" / "revive-local.json"))
    try:
        assert wait_until(lambda: len(client.ids) == 3)
        long = client[int(working["ident"])].apply_async(slow_square, 6, 25.0)
        os.kill(frozen["pid"], signal.SIGSTOP)
        try:
            # the controller drops it (its heartbeat window), the balancer starts another there
            assert wait_until(lambda: int(frozen["ident"]) not in client.ids, timeout=30)
            assert wait_until(lambda: len(client.ids) == 3, timeout=45), client.ids
        finally:
            if not gone(frozen["pid"]):
                os.kill(frozen["pid"], signal.SIGCONT)
        assert gone(frozen["pid"])  # stopped by pid, frozen as it was
        after = next(n for n in read_record(home, "revive")["nodes"] if n["name"] == "node001")
        assert after["created"] == before["created"]  # the same node, not a replacement
        engines = {p["pid"]: p["ident"] for p in after["processes"] if p["role"] == "ipengine"}
        assert working["pid"] in engines and frozen["pid"] not in engines and len(engines) == 2
        new_id = int(next(i for pid, i in engines.items() if pid != working["pid"]))
        ids = read_record(home, "revive")["plugin_data"]["ipcluster"]["engine_ids"]
        assert new_id > int(frozen["ident"]) and ids.get(str(new_id)) == "node001", (ids, client.ids, engines)
        assert not long.ready() and long.get(timeout=30) == 36  # the busy engine kept its task
        assert client[new_id].apply_sync(os.getpid) in engines
    finally:
        client.close()
    events = read_record(home, "revive")["balancer"]["events"]
    restarted = [e for e in events if e["kind"] == "restart"]
    assert len(restarted) == 1 and restarted[0]["nodes"] == ["node001"], events
    assert "1 engine not registered with the controller for " in restarted[0]["text"], restarted
    assert f"({frozen['ident']} -> {new_id})" in restarted[0]["text"], restarted
    assert read_record(home, "revive")["desired"] == ["master", "node001"]
    assert cli("terminate", "-y", "revive").returncode == 0


def test_a_failing_addnode_is_reported_and_retried_with_growing_pauses_never_a_crash(cli, home, write_config):
    config = CONFIG.format(kill_after="10m").replace("plugins = ipcluster", "plugins = ipcluster, failadd")
    config += "[plugin failadd]\nsetup_class = globular_test_plugins.FailOnAdd\n"
    assert cli("-c", str(write_config(config)), "start", "fail").returncode == 0
    pid = read_record(home, "fail")["balancer"]["pid"]
    from ipyparallel import Client

    client = Client(str(home / "ipcluster" / "fail-local.json"))
    try:
        squares = client.load_balanced_view().map_async(slow_square, range(24), [1.0] * 24)

        def problems() -> list[dict]:
            events = read_record(home, "fail")["balancer"]["events"]
            return [e for e in events if e["kind"] == "error"]

        assert wait_until(lambda: len(problems()) >= 2, timeout=30)
        first, second = problems()[:2]
        assert "cannot-mount-scratch" in first["text"] and "trying again in 1 s" in first["text"], first
        assert "trying again in 2 s" in second["text"], second  # each pause twice the last
        assert squares.get(timeout=60) == [x * x for x in range(24)]  # the engines it has do the work meanwhile
    finally:
        client.close()
    assert not gone(pid) and desired(home, "fail") == ["master"]  # running on, the cluster as it was
    shown = cli("status", "fail").stdout
    assert "problem" in shown and "cannot-mount-scratch" in shown, shown
    assert cli("terminate", "-y", "fail").returncode == 0


class Racing:
    """The balancer's watcher, with a task of the user's sent to a node at the moment the
    balancer has decided it leaves (before its drain, or before a naive balancer stops it)."""

    def __init__(self, inner, client, naive: bool):
        self.inner, self.client, self.naive = inner, client, naive
        self.sent: list = []

    async def observe(self):
        return await self.inner.observe()

    async def drain(self, nodes, timeout, window=None):
        def send() -> None:
            record_ids = self.inner._engines()
            for engine, node in record_ids.items():
                if node in nodes and engine in self.client.ids:
                    view = self.client.load_balanced_view(targets=[engine])
                    self.sent.append((node, view.apply_async(slow_square, 6, 6.0)))  # longer than removenode waits

        await asyncio.to_thread(send)
        await asyncio.sleep(0.3)  # the task is on the node's engine
        if self.naive:
            return list(nodes)  # "the engine was idle": stop it
        return await self.inner.drain(nodes, timeout, window)

    async def close(self):
        await self.inner.close()


@pytest.mark.parametrize("naive", [False, True], ids=["drained", "naive"])
def test_a_task_sent_to_a_leaving_node_is_never_lost_and_a_naive_balancer_loses_it(cli, home, write_config, naive):
    config = write_config(CONFIG.format(kill_after="1s"))
    assert cli("-c", str(config), "start", "-s", "3", "race").returncode == 0
    assert cli("loadbalance", "--stop", "race").returncode == 0  # this test runs its own, in this process
    from ipyparallel import Client

    from globular.balance.balancer import Balancer, bounds_of
    from globular.ipcluster.load import ControllerLoad
    from globular.state import StateStore

    client = Client(str(home / "ipcluster" / "race-local.json"))
    spec = StateStore(home).get("race").spec.balance
    assert spec is not None
    balancer = Balancer("race", bounds_of(spec), home=home)
    watcher = Racing(ControllerLoad("race", home), client, naive)

    def stop_when_done() -> None:
        wait_until(lambda: len(watcher.sent) > 0 and all(ar.ready() for _, ar in watcher.sent), timeout=40)
        balancer.stop()

    stopper = threading.Thread(target=stop_when_done)
    stopper.start()
    try:
        asyncio.run(asyncio.wait_for(balancer.run(watcher), 60))
    finally:
        stopper.join()
        client.close()
    assert watcher.sent, "the balancer never decided to remove a node"
    outcomes = []
    for _node, ar in watcher.sent:
        try:
            outcomes.append(ar.get(timeout=1))
        except Exception as exc:
            outcomes.append(type(exc).__name__)
    if naive:
        # the race, lost (EngineError, or RemoteError when its engine was stopped under it): what the drain is for
        assert any(outcome != 36 for outcome in outcomes), outcomes
    else:
        assert outcomes == [36] * len(watcher.sent), outcomes
    assert cli("terminate", "-y", "race").returncode == 0
