"""The balancer's decisions and the bounds' checks: pure logic, milliseconds, no processes.
The real balancer on a real cluster is in test_loadbalance.py."""

from __future__ import annotations

import pytest

from globular.balance.policy import Bounds, Policy
from globular.bounds import BoundsProblem, BoundsSettings, balance_from_flags, cluster_bounds
from globular.config import Config
from globular.errors import ConfigError
from globular.plugins.base import ClusterLoad, NodeLoad
from globular.spec import BalanceSpec

BOUNDS = Bounds(min_nodes=1, max_nodes=4, wait_time=10, add_nodes_per_iteration=2, kill_after=60, stabilization_time=30)


def load(waiting: int = 0, **nodes: tuple[int, int]) -> ClusterLoad:
    return ClusterLoad(waiting=waiting, nodes={n: NodeLoad(engines=e, busy=b) for n, (e, b) in nodes.items()})


def step(policy: Policy, now: float, current: ClusterLoad, desired: list[str]):
    policy.observe(current, now)
    return policy.decide(current, desired, "master", now)


def test_grows_only_after_tasks_waited_wait_time_and_by_what_they_need_within_the_bounds():
    policy = Policy(BOUNDS)
    busy = load(waiting=5, master=(2, 2))
    assert step(policy, 0, busy, ["master"]) is None
    assert step(policy, 9.9, busy, ["master"]) is None
    grow = step(policy, 10, busy, ["master"])
    assert grow is not None and grow.action == "add"
    assert grow.count == 2  # 5 tasks / 2 engines a node = 3 nodes, at most 2 a step
    assert "5 tasks waited 10 s" in grow.reason
    # at max_nodes: nothing more
    assert step(policy, 20, busy, ["master", "node001", "node002", "node003"]) is None


def test_nodes_coming_count_toward_what_waiting_tasks_need():
    policy = Policy(BOUNDS)
    waiting = load(waiting=2, master=(2, 2))
    step(policy, 0, waiting, ["master", "node001"])
    assert step(policy, 10, waiting, ["master", "node001"]) is None  # node001 is coming: it takes the 2


def test_a_node_asked_for_is_cancelled_only_after_it_has_not_joined_for_kill_after():
    """A user's addnode in flight (in desired, its engines not registered) is not removed under
    it; one that never joins goes after kill_after, and one that joins meanwhile idles anew."""
    policy = Policy(BOUNDS)
    idle = load(master=(1, 0))
    desired = ["master", "node001"]
    assert step(policy, 100, idle, desired) is None
    assert step(policy, 159, idle, desired) is None
    gone = step(policy, 160, idle, desired)
    assert gone is not None and gone.nodes == ("node001",) and "not needed" in gone.reason
    fresh = Policy(BOUNDS)
    step(fresh, 100, idle, desired)
    joined = load(master=(1, 0), node001=(1, 0))
    assert step(fresh, 150, joined, desired) is None
    assert step(fresh, 209, joined, desired) is None  # idle since it joined, not since it was asked for
    assert step(fresh, 210, joined, desired) is not None


def test_a_wait_that_stops_starts_again_from_zero():
    policy = Policy(BOUNDS)
    step(policy, 0, load(waiting=3, master=(1, 1)), ["master"])
    step(policy, 8, load(waiting=0, master=(1, 1)), ["master"])
    assert step(policy, 12, load(waiting=3, master=(1, 1)), ["master"]) is None
    assert step(policy, 22, load(waiting=3, master=(1, 1)), ["master"]) is not None


def test_shrinks_only_nodes_idle_for_kill_after_never_the_master_nor_below_min_nodes():
    policy = Policy(BOUNDS)
    desired = ["master", "node001", "node002"]
    idle = load(master=(1, 0), node001=(1, 0), node002=(1, 0))
    assert step(policy, 0, idle, desired) is None
    assert step(policy, 59, idle, desired) is None
    shrink = step(policy, 60, idle, desired)
    assert shrink is not None and shrink.action == "remove"
    assert set(shrink.nodes) == {"node001", "node002"}  # never the master: min_nodes 1 is the master
    assert "idle for 60 s" in shrink.reason


def test_a_busy_engine_keeps_its_whole_node_and_resets_its_idle_time():
    policy = Policy(BOUNDS)
    desired = ["master", "node001", "node002"]
    step(policy, 0, load(master=(1, 0), node001=(2, 0), node002=(1, 0)), desired)
    step(policy, 30, load(master=(1, 0), node001=(2, 1), node002=(1, 0)), desired)  # one of node001's engines works
    shrink = step(policy, 61, load(master=(1, 0), node001=(2, 0), node002=(1, 0)), desired)
    assert shrink is not None and shrink.nodes == ("node002",)
    assert step(policy, 120, load(master=(1, 0), node001=(2, 0)), ["master", "node001"]) is None
    later = step(policy, 121, load(master=(1, 0), node001=(2, 0)), ["master", "node001"])
    assert later is not None and later.nodes == ("node001",)  # idle since 61


def test_no_shrink_while_tasks_wait_or_within_stabilization_time():
    policy = Policy(BOUNDS)
    desired = ["master", "node001"]
    step(policy, 0, load(master=(1, 0), node001=(1, 0)), desired)
    assert step(policy, 100, load(waiting=1, master=(1, 0), node001=(1, 0)), desired) is None
    policy = Policy(BOUNDS)
    step(policy, 0, load(master=(1, 0), node001=(1, 0)), desired)
    policy.changed(50)
    assert step(policy, 79, load(master=(1, 0), node001=(1, 0)), desired) is None
    assert step(policy, 80, load(master=(1, 0), node001=(1, 0)), desired) is not None


def test_below_min_nodes_adds_at_once_and_a_node_asked_for_is_cancelled_first():
    policy = Policy(Bounds(min_nodes=3, max_nodes=4, stabilization_time=0, kill_after=60))
    add = step(policy, 0, load(master=(1, 1)), ["master"])
    assert add is not None and add.action == "add" and add.count == 2 and "1 of min_nodes 3" in add.reason
    policy = Policy(Bounds(min_nodes=1, max_nodes=4, stabilization_time=0, kill_after=60))
    assert step(policy, 0, load(master=(1, 0)), ["master", "node001"]) is None
    cancel = step(policy, 60, load(master=(1, 0)), ["master", "node001"])  # node001's engines never came
    assert cancel is not None and cancel.nodes == ("node001",)  # before the master, idle as long


def test_waits_are_floats_of_seconds_that_never_wrap_after_a_day():
    policy = Policy(BOUNDS)
    day = 86_400.0
    desired = ["master", "node001"]
    step(policy, day * 3, load(master=(1, 0), node001=(1, 0)), desired)
    assert step(policy, day * 3 + 59, load(master=(1, 0), node001=(1, 0)), desired) is None
    assert step(policy, day * 3 + 61, load(master=(1, 0), node001=(1, 0)), desired) is not None


def test_twenty_waves_around_kill_after_never_flap():
    """Work arrives in 20 waves (8 tasks' worth, 2 engines a node).  With gaps shorter than
    kill_after the cluster grows once (two steps of add_nodes_per_iteration) and never shrinks;
    with gaps longer than kill_after + stabilization_time it shrinks at most once a gap and
    grows again at most once a wave: no flapping within a wave or a gap."""
    for gap, most_adds, most_removes in ((50, 2, 0), (100, 40, 20)):
        policy = Policy(BOUNDS)
        desired, adds, removes, now = ["master"], 0, 0, 0.0
        for _ in range(20):
            end = now + 30
            while now < end:  # a wave: what the engines cannot take waits
                waiting = max(0, 8 - 2 * len(desired))
                decision = step(policy, now, load(waiting=waiting, **{n: (2, 2) for n in desired}), desired)
                if decision and decision.action == "add":
                    desired += [f"node{len(desired):03d}" for _ in range(decision.count)]
                    policy.changed(now)
                    adds += 1
                now += 5
            end = now + gap
            while now < end:
                decision = step(policy, now, load(**{n: (2, 0) for n in desired}), desired)
                if decision and decision.action == "remove":
                    desired = [n for n in desired if n not in decision.nodes]
                    policy.changed(now)
                    removes += 1
                now += 5
        assert adds <= most_adds and removes <= most_removes, (gap, adds, removes)


def keys(**values) -> BoundsSettings:
    return BoundsSettings.model_validate(values)


def test_bounds_need_min_nodes_to_balance_and_fit_the_provider():
    assert cluster_bounds(keys(), None, 16, "local") == (None, None, None)
    assert cluster_bounds(keys(max_nodes=3), 2, 16, "local") == (2, 3, None)
    size, most, balance = cluster_bounds(keys(min_nodes=2, kill_after=30), None, 16, "local")
    assert (size, most) == (2, 16) and balance == BalanceSpec(min_nodes=2, max_nodes=16, kill_after=30)
    for bad, key in [
        (keys(kill_after=5), "kill_after"),
        (keys(min_nodes=4, max_nodes=3), "min_nodes"),
        (keys(min_nodes=1, max_nodes=20), "max_nodes"),
    ]:
        with pytest.raises(BoundsProblem) as err:
            cluster_bounds(bad, None, 16, "local")
        assert err.value.key == key
    with pytest.raises(BoundsProblem, match="needs max_nodes with the slurm provider"):
        cluster_bounds(keys(min_nodes=1), None, None, "slurm")
    with pytest.raises(BoundsProblem, match="outside min_nodes..max_nodes"):
        cluster_bounds(keys(min_nodes=2, max_nodes=3), 5, None, "slurm")


def test_flags_override_the_template_and_are_checked_the_same_way():
    spec = BalanceSpec(min_nodes=1, max_nodes=3)
    assert balance_from_flags(spec, {"max_nodes": 5, "kill_after": None}, None, 16, "local").max_nodes == 5
    with pytest.raises(BoundsProblem, match="more than max_nodes"):
        balance_from_flags(spec, {"min_nodes": 4}, None, 16, "local")
    with pytest.raises(BoundsProblem, match="the ssh provider places at most 3"):
        balance_from_flags(spec, {"max_nodes": 4}, None, 3, "ssh")
    with pytest.raises(BoundsProblem, match="at most 3 nodes \\(max_nodes\\)"):
        balance_from_flags(spec, {"max_nodes": 4}, 3, 16, "local")


@pytest.mark.parametrize(
    ("lines", "where", "message"),
    [
        ("min_nodes = 3\nmax_nodes = 2", "[cluster t] min_nodes", "3 is more than max_nodes (2)"),
        ("kill_after = 20s", "[cluster t] kill_after", "has no effect without min_nodes"),
        ("min_nodes = 1\nmax_nodes = 99", "[cluster t] max_nodes", "the local provider places at most"),
        ("min_nodes = 1\nkill_after = 0", "[cluster t] kill_after", "must be more than 0"),
        ("min_nodes = 1\npolling_interval = -5s", "[cluster t] polling_interval", "is not a duration"),
        ("min_nodes = 0", "[cluster t] min_nodes", "must be at least 1"),
        ("min_nodes = 1\nadd_nodes_per_iteration = 0", "[cluster t] add_nodes_per_iteration", "at least 1"),
    ],
)
def test_bad_balancer_settings_are_one_line_naming_file_line_section_and_key(tmp_path, lines, where, message):
    path = tmp_path / "config"
    path.write_text(f"[cluster t]\nprovider = local\n{lines}\n")
    with pytest.raises(ConfigError) as err:
        Config.load(path).cluster_spec("t")
    text = str(err.value)
    assert text.startswith(f"{path}:") and where in text and message in text and "\n" not in text


def test_min_nodes_is_the_size_of_a_start_without_s_and_max_nodes_caps_the_provider_default(tmp_path):
    path = tmp_path / "config"
    path.write_text("[cluster t]\nprovider = local\nmin_nodes = 3\nmax_nodes = 4\nwait_time = 1m\n")
    spec = Config.load(path).cluster_spec("t")
    assert spec.cluster_size == 3 and spec.max_nodes == 4
    assert spec.balance == BalanceSpec(min_nodes=3, max_nodes=4, wait_time=60)
    path.write_text("[cluster t]\nprovider = local\nmax_nodes = 1\n")
    assert Config.load(path).cluster_spec("t").cluster_size == 1  # the local default, 2, capped


def test_the_engines_to_start_again_are_those_a_node_has_fewer_registered_than_started():
    from globular.ipcluster.revive import left_engines
    from globular.state import NodeRecord, ProcessRecord

    node = NodeRecord(name="node001", address="198.18.0.12", workdir="/w", cores=2, python="p")
    node.processes = [ProcessRecord(pid=10 + i, start=1, role="ipengine", ident=str(i)) for i in (1, 2)]
    node_of = {1: "node001", 2: "node001", 0: "master"}
    assert left_engines(node, {0, 1, 2}, node_of) == []
    assert [p.ident for p in left_engines(node, {0, 2}, node_of)] == ["1"]  # engine 1 left the controller
    assert [p.ident for p in left_engines(node, {0}, node_of)] == ["1", "2"]
    # the controller gave engine 1 another id (7) than it asked for: both are there, nothing to restart
    assert left_engines(node, {0, 2, 7}, {**node_of, 7: "node001"}) == []
