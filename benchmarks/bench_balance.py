"""How fast the balancer follows the work, and whether it ever loses a task or flaps, on local
nodes, on ssh hosts or on Slurm (one engine a node; the real ``globular`` command, the
balancer detached by ``start``).

    .venv/bin/python benchmarks/bench_balance.py [--rounds 3] [--cycles 20]
    .venv/bin/python benchmarks/bench_balance.py --provider ssh      # 4 netns hosts (root; tests/testhosts.py)
    .venv/bin/python benchmarks/bench_balance.py --provider slurm    # a real Slurm on them (tests/testslurm.py)
    .venv/bin/python benchmarks/bench_balance.py --rounds 0 --cycles 960    # the soak: about an hour (3.75 s a cycle)

- **grow**: from a backlog (12 tasks of 1 s on a 1-node cluster) to the first task that an engine
  of a new node runs, less ``wait_time`` (the configured wait); the anchor is the issue's target,
  two ``polling_interval``s plus ``globular addnode``'s own time to working engines, measured in
  the same round on the same cluster.
- **heal**: from a node's loss (its processes killed with -9; on Slurm its job cancelled, as a
  preemption would) to the first task its replacement runs; the same anchor (the loss is seen
  at the next poll).
- **waves**: ``--cycles`` waves of tasks (0.3–1.5 s each, a burst of 3 to 9) with gaps drawn
  around ``kill_after`` (half to twice), through a view with no ``retries``: the tasks lost (any
  that did not return its value), the nodes removed while one of their engines ran a task, and
  the cluster's changes (adds and removes; flapping would be several a cycle).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent / "tests"))
from common import command_env, ssh_config

POLL, WAIT, KILL_AFTER, STABLE = 1.0, 2.0, 3.0, 1.0
BOUNDS = f"""\
min_nodes = 1
max_nodes = 3
polling_interval = {POLL:g}s
wait_time = {WAIT:g}s
add_nodes_per_iteration = 2
kill_after = {KILL_AFTER:g}s
stabilization_time = {STABLE:g}s
"""
LOCAL = """\
[global]
default_template = bench
[cluster bench]
provider = local
cores_per_node = 1
plugins = ipcluster
[plugin ipcluster]
setup_class = ipcluster
"""


def balanced(config: str) -> str:
    """``config`` (template ``bench``, plugin ipcluster) with the balancer's bounds, one engine
    on the master too."""
    config = config.replace("[plugin ipcluster]\n", BOUNDS + "[plugin ipcluster]\n", 1)
    return config if "master_engines" in config else config + "master_engines = 1\n"


def work(seconds: float) -> tuple[float, str]:
    import os
    import time

    started = time.time()
    time.sleep(seconds)
    return started, os.environ.get("GLOBULAR_NODE", "?")


class Bench:
    def __init__(self, home: Path, config: str, env: dict[str, str] | None = None):
        self.home = home
        self.env = command_env(GLOBULAR_HOME=str(home), COLUMNS="200", **(env or {}))
        home.mkdir(parents=True, exist_ok=True)
        (home / "config").write_text(balanced(config))
        self.lose_node = kill_processes

    def cmd(self, *args: str) -> float:
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "globular", *args], capture_output=True, text=True, env=self.env)
        if done.returncode != 0:
            raise RuntimeError(f"globular {' '.join(args)}: {done.stdout}{done.stderr}")
        return time.perf_counter() - started

    def record(self) -> dict:
        return json.loads((self.home / "clusters" / "bench.json").read_text())

    def client(self):
        from globular import connect

        return connect("bench", home=self.home)

    def wait_desired(self, count: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while len(self.record()["desired"]) != count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cluster did not reach {count} nodes: {self.record()['desired']}")
            time.sleep(0.2)


def until(predicate, what: str, timeout: float = 180.0) -> None:
    """Wait for ``predicate``; a bench that cannot go on says what it waited for, never hangs."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"waited {timeout:g} s for {what}")
        time.sleep(0.02)


def addnode_time(bench: Bench, rc) -> float:
    """``globular addnode`` until its engine works (the balancer stopped meanwhile), then removed."""
    bench.cmd("loadbalance", "--stop", "bench")
    before = set(rc.ids)
    started = time.perf_counter()
    bench.cmd("addnode", "bench")
    until(lambda: set(rc.ids) - before, "the added node's engine")
    new = sorted(set(rc.ids) - before)
    rc[new].apply_sync(work, 0)
    elapsed = time.perf_counter() - started
    bench.cmd("removenode", "bench", next(n["name"] for n in bench.record()["nodes"] if n["name"] != "master"))
    bench.cmd("loadbalance", "--detach", "bench")
    return elapsed


def grow_time(bench: Bench, rc) -> float:
    view = rc.load_balanced_view()
    submitted = time.time()
    results = view.map_async(work, [1.0] * 12)
    first_new = min((t for t, node in results.get(timeout=120) if node != "master"), default=None)
    if first_new is None:
        raise RuntimeError("no new node ran a task")
    bench.wait_desired(1)  # idle again: back to min_nodes before the next figure
    return first_new - submitted - WAIT


def heal_time(bench: Bench, rc) -> float:
    bench.cmd("addnode", "bench")  # a node to lose (the balancer keeps it while it works)
    view = rc.load_balanced_view()
    view.retries = 3
    node = next(n for n in bench.record()["nodes"] if n["name"] != "master")
    killed_at = time.time()
    bench.lose_node(node)
    pids = {p["pid"] for p in node["processes"]}

    def replaced() -> bool:  # the same name, new processes
        new = next((n for n in bench.record()["nodes"] if n["name"] == node["name"] and n["processes"]), None)
        return bool(new) and not pids & {p["pid"] for p in new["processes"]}

    until(replaced, f"{node['name']}'s replacement")
    engines = {int(e) for e, n in bench.record()["plugin_data"]["ipcluster"]["engine_ids"].items() if n == node["name"]}
    until(lambda: engines & set(rc.ids), "the replacement's engine")
    started, _ = rc[sorted(engines & set(rc.ids))[0]].apply_sync(work, 0)
    return started - killed_at  # idle, the replacement is removed by the balancer in its time


def kill_processes(node: dict) -> None:
    """A node lost: its processes killed with -9 (local nodes and ssh hosts share this pid space)."""
    for proc in node["processes"]:
        os.kill(proc["pid"], signal.SIGKILL)


def waves(bench: Bench, rc, cycles: int, seed: int = 7) -> dict[str, int]:
    rng = random.Random(seed)
    view = rc.load_balanced_view()  # no retries: a task lost is a failure
    sent, spans = [], []
    began = time.time()
    for _ in range(cycles):
        burst = [rng.uniform(0.3, 1.5) for _ in range(rng.randint(3, 9))]
        sent.append((view.map_async(work, burst), burst))
        time.sleep(rng.uniform(0.5, 2.0) * KILL_AFTER)
    lost = 0
    for ar, burst in sent:
        try:
            for (started, node), seconds in zip(ar.get(timeout=120), burst):
                spans.append((node, started, started + seconds))
        except Exception as exc:  # a task lost: counted, and said
            lost += 1
            print(f"a wave lost a task: {type(exc).__name__}: {exc}", file=sys.stderr)
    if lost:  # what the balancer did meanwhile, from the cluster's log
        for line in (bench.home / "logs" / "bench.log").read_text().splitlines():
            if "balancer: " in line:
                print(f"  {line}", file=sys.stderr)
    events = [e for e in decisions(bench.home) if e[0] >= began]  # every one: the record keeps the last 20
    removals = [(t, n) for t, kind, nodes in events if kind == "remove" for n in nodes]
    busy_removed = sum(1 for t, n in removals if any(node == n and a < t < b for node, a, b in spans))
    return {"lost": lost, "busy_removed": busy_removed, "changes": len(events)}


DECISION = re.compile(r"^(\S+ \S+) \d+ INFO globular\.balance\.balancer: balancer: (add|remove): .* \(([\w, ]+)\)$")


def decisions(home: Path) -> list[tuple[float, str, list[str]]]:
    """The balancer's changes (time, add or remove, nodes), each a line of the cluster's log."""
    found = []
    for line in (home / "logs" / "bench.log").read_text().splitlines():
        match = DECISION.match(line)
        if match:
            when = datetime.datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            found.append((when, match[2], match[3].split(", ")))
    return found


def measure(bench: Bench, rounds: int, cycles: int) -> tuple[dict[str, list[float]], dict[str, int]]:
    figures: dict[str, list[float]] = {"grow": [], "heal": [], "addnode": []}
    bench.cmd("start", "bench")
    rc = bench.client()
    try:
        for rnd in range(rounds):
            print(f"round {rnd + 1}/{rounds}", file=sys.stderr)
            figures["addnode"].append(addnode_time(bench, rc))
            figures["grow"].append(grow_time(bench, rc))
            figures["heal"].append(heal_time(bench, rc))
            bench.wait_desired(1)
        return figures, waves(bench, rc, cycles)
    finally:
        rc.close()
        bench.cmd("terminate", "-y", "bench")


def on_provider(provider: str, tmp: Path, rounds: int, cycles: int) -> tuple[dict[str, list[float]], dict[str, int]]:
    """The figures on ``provider``'s nodes: this machine's, netns hosts, or Slurm on them."""
    if provider == "local":
        return measure(Bench(tmp / "home", LOCAL), rounds, cycles)
    import testhosts

    net = testhosts.HostNet(workdir=tmp / "net").up(4)
    try:
        if provider == "ssh":  # master and max_nodes 3 on 4 hosts: a lost host's replacement has a free one
            config = ssh_config(net, net.hosts, python=sys.executable, remote_dir=tmp / "nodes", connect_timeout=3)
            return measure(Bench(tmp / "home", config), rounds, cycles)
        import testslurm
        from bench_slurm import CONFIG as SLURM  # the Slurm benchmark's cluster: one engine a job

        slurm = testslurm.Slurm(net, tmp / "slurm")
        try:
            slurm.up()
            os.environ.update(slurm.env)
            bench = Bench(tmp / "home", SLURM.format(python=sys.executable, remote_dir=tmp / "shared"), slurm.env)

            def cancel_job(node: dict) -> None:  # a preemption: the job ends behind globular's back
                for line in slurm.jobs():
                    job, name, _ = line.split()
                    if name == f"glb-bench-{node['name']}":
                        slurm.run("scancel", job)

            bench.lose_node = cancel_job
            return measure(bench, rounds, cycles)
        finally:
            slurm.down()
    finally:
        net.down()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--provider", choices=("local", "ssh", "slurm"), default="local")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cycles", type=int, default=20)
    parser.add_argument("--json", default=None, help="default: results-balance[-PROVIDER].json beside this script")
    args = parser.parse_args()
    suffix = "" if args.provider == "local" else f"-{args.provider}"
    args.json = args.json or str(Path(__file__).with_name(f"results-balance{suffix}.json"))
    with tempfile.TemporaryDirectory(prefix="globular-bench-balance-") as tmp:
        figures, wave = on_provider(args.provider, Path(tmp), args.rounds, args.cycles)
    anchor = 2 * POLL + statistics.median(figures["addnode"]) if figures["addnode"] else float("nan")
    print(f"{args.provider} nodes")
    print(f"{'figure (median)':44} {'balancer':>9} {'target':>9} {'ratio':>7}")
    for name, label in (
        ("grow", "backlog -> a new node's engine runs a task"),
        ("heal", "node lost -> its replacement runs a task"),
    ):
        if figures[name]:
            value = statistics.median(figures[name])
            print(f"{label + ' (s)':44} {value:9.2f} {anchor:9.2f} {value / anchor:7.2f}")
    print(f"(target = 2 x polling_interval {POLL:g} s + addnode until its engine works "
          f"{statistics.median(figures['addnode']) if figures['addnode'] else float('nan'):.2f} s; grow less wait_time {WAIT:g} s)")  # fmt: skip
    print(f"waves: {args.cycles} cycles: {wave['lost']} tasks lost, {wave['busy_removed']} busy nodes removed, "
          f"{wave['changes']} changes ({wave['changes'] / max(args.cycles, 1):.1f} a cycle)")  # fmt: skip
    out = {"provider": args.provider, "figures": figures, "waves": wave, "anchor": anchor}
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0 if wave["lost"] == 0 and wave["busy_removed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
