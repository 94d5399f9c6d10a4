"""Scale: start, restart and terminate on N SSH hosts, and how often a start succeeds.

    sudo .venv/bin/python benchmarks/bench_scale.py [--sizes 1,4,16,32] [--repeats 1] [--failure-rate 32x20] [--managed]

Needs root, sshd and iproute2: it makes the netns test hosts of tests/testhosts.py
(198.18.0.0/24), one engine per host (``cores_per_node = 1``, ``environment =
system`` with this machine's Python, which the hosts share).  For every size, each
round: ``start -s N``, ``runplugin ipclusterrestart``, ``terminate``, timed from the
outside as a user sees them; then the same three with plain ipyparallel's own SSH
launcher (``ipp.Cluster(engine_launcher_class="ssh")``, controller here on the bridge
address, one engine per host), interleaved; then, once a round, ``addnode -n 8`` to a running
1-host cluster against a second engine set of plain's SSH launcher on 8 new hosts (timed until
the new engines registered); with ``--managed``, each round also starts and terminates the same
size with ``environment = managed`` (the default path; its environments built by an untimed
first start), so managed / system compares the two in the same rounds (with the env step, a
node's median, and the env phase: from the last node's setup to the last node's environment);
then the ratios issue 16 asks for: restart / start of the same cluster, terminate of N /
terminate of 1, and globular / plain.  The
CPU columns are the whole machine's busy CPU-seconds during terminate: every test host
shares this machine's cores, so what would run on N machines at once queues here (see
docs/benchmarks.md).  ``--no-plain`` leaves plain ipyparallel out.  With ``--failure-rate NxK``
it also starts and terminates an N-host cluster K times and counts the starts that
succeed.  Opt-in (not in scripts/test): 1, 4, 16, 32 hosts take about 5 minutes on 2
cores without plain ipyparallel (whose launcher starts hosts one after another: about 4 s
a host), a 32x20 failure-rate run about 8.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import testhosts
from common import command_env, ssh_config


def busy_cpu() -> float:
    """CPU-seconds this machine has been busy (user, nice, system, irq, softirq), from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    return (fields[0] + fields[1] + fields[2] + fields[5] + fields[6]) / os.sysconf("SC_CLK_TCK")


PHASES = ["provision", "ssh", "setup", "env", "engines", "registered"]


class Plain:
    """Plain ipyparallel on the same hosts: its SSH engine launcher, the controller here."""

    def __init__(self, root: Path, net: testhosts.HostNet):
        self.root, self.net = root, net
        ssh = ["-i", str(net.key), "-o", f"UserKnownHostsFile={net.known_hosts}", "-o", "BatchMode=yes"]
        self.ssh_args = ssh

    def cluster(self, name: str, hosts: list[testhosts.Host]) -> Any:
        """An ipp.Cluster whose engines go to ``hosts`` by its SSH launcher, the controller here."""
        import ipyparallel as ipp

        cluster = ipp.Cluster(
            profile_dir=str(self.root / f"ipp-{name}"),
            n=len(hosts),
            controller_ip=testhosts.GATEWAY,
            engine_launcher_class="ssh",
            log_level=40,
        )
        cluster.config.SSHLauncher.ssh_args = self.ssh_args
        cluster.config.SSHLauncher.scp_args = self.ssh_args
        cluster.config.SSHLauncher.remote_python = sys.executable
        # the hosts share this file system: a folder of their own, or scp would copy files onto themselves
        cluster.config.SSHLauncher.remote_profile_dir = str(self.root / f"ipp-remote-{name}")
        cluster.config.SSHEngineSetLauncher.engines = {f"root@{h.address}": 1 for h in hosts}
        return cluster

    def addnode(self, more: int) -> float:
        """A 1-host cluster, then engines on ``more`` new hosts (a second engine set), timed until they work."""
        cluster = self.cluster("add", self.net.hosts[:1])
        cluster.start_cluster_sync()
        client = cluster.connect_client_sync()
        try:
            client.wait_for_engines(1, timeout=600)
            cluster.config.SSHEngineSetLauncher.engines = {f"root@{h.address}": 1 for h in self.net.hosts[1 : 1 + more]}
            began = time.perf_counter()
            cluster.start_engines_sync(n=more)
            client.wait_for_engines(1 + more, timeout=180)
            client[:].apply_sync(int)
            return time.perf_counter() - began
        finally:
            client.close()
            cluster.stop_cluster_sync()

    def round(self, n: int) -> tuple[float, float, float, float]:
        """start, restart, terminate (seconds) and terminate's busy CPU-seconds."""
        cluster = self.cluster(str(n), self.net.hosts[:n])
        began = time.perf_counter()
        cluster.start_cluster_sync()
        client = cluster.connect_client_sync()
        client.wait_for_engines(n, timeout=600)
        start = time.perf_counter() - began
        try:
            began = time.perf_counter()
            old = set(client.ids)
            cluster.restart_engines_sync()
            client.wait_for_engines(n, timeout=600, block=True)
            while len(set(client.ids) - old) < n:
                time.sleep(0.05)
            restart = time.perf_counter() - began
        finally:
            client.close()
            began, cpu = time.perf_counter(), busy_cpu()
            cluster.stop_cluster_sync()
            terminate, cpu = time.perf_counter() - began, busy_cpu() - cpu
        return start, restart, terminate, cpu


class Globular:
    def __init__(self, root: Path, net: testhosts.HostNet, environment: str = "system"):
        """``environment = managed``: globular's default path on ssh hosts, the hosts' environments
        built by a first start and cached (its own home and node folders)."""
        self.root, self.net = root, net
        tag = "" if environment == "system" else f"-{environment}"
        self.env = command_env(GLOBULAR_HOME=str(root / f"home{tag}"), COLUMNS="200")
        self.config = root / f"config{tag}"
        self.config.write_text(
            ssh_config(net, net.hosts, python=sys.executable, remote_dir=root / f"nodes{tag}", environment=environment)
        )

    def cmd(self, *args: str) -> tuple[float, subprocess.CompletedProcess[str]]:
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "globular", "-c", str(self.config), *args],
            capture_output=True,
            text=True,
            env=self.env,
            check=False,
        )
        return time.perf_counter() - started, done

    def phases(self) -> dict[str, float]:
        """Where a node's start went, the median over the nodes: seconds to each step (status's
        ``steps``: provision, ssh up, setup, engines spawned, registered)."""
        _, done = self.cmd("status", "b", "--output", "json")
        nodes = json.loads(done.stdout)["result"]["nodes"]
        # a step's first word: "env cached" is the env step of a node whose environment existed
        per_node = [{step.split()[0]: took for step, took in node["steps"].items()} for node in nodes]
        steps = {step for node in per_node for step in node if step in PHASES}
        return {
            f"step {step}": statistics.median(node.get(step, 0.0) for node in per_node)
            for step in sorted(steps, key=PHASES.index)
        }

    def env_phase(self) -> float:
        """How long the nodes' environments took, all nodes together: from the last node's setup
        to the last node's environment (a node's own env step also holds its wait for the
        slowest node's setup, since every node's environment is seen to at once)."""
        record = json.loads((Path(self.env["GLOBULAR_HOME"]) / "clusters" / "b.json").read_text())
        steps = [node["steps"] for node in record["nodes"]]
        return max(s["env"] for s in steps) - max(s["setup"] for s in steps)

    def must(self, *args: str) -> float:
        took, done = self.cmd(*args)
        if done.returncode != 0:
            raise RuntimeError(f"globular {' '.join(args)} failed:\n{done.stdout}{done.stderr}")
        return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1,4,16,32")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--failure-rate", default="", help="NxK: start N hosts K times, count the successes")
    parser.add_argument("--no-plain", action="store_true", help="leave plain ipyparallel out")
    parser.add_argument(
        "--managed", action="store_true", help="also start each size with environment = managed (cached), interleaved"
    )
    parser.add_argument("--json", type=Path, default=Path(__file__).with_name("results-scale.json"))
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    runs, tries = (int(x) for x in args.failure_rate.split("x")) if args.failure_rate else (0, 0)
    began = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="globular-bench-scale-"))
    net = testhosts.HostNet(workdir=root / "net").up(max([*sizes, runs, 9]))  # 9: addnode -n 8 to 1 host
    samples: dict[str, list[float]] = {}
    outcomes: list[str] = []
    try:
        glob, plain = Globular(root, net), Plain(root, net)
        managed = Globular(root, net, "managed") if args.managed else None
        if managed is not None:  # the first start builds the environments: not timed
            managed.must("start", "-s", str(max(sizes)), "b")
            managed.must("terminate", "-y", "b")
        for round_ in range(args.repeats):
            for n in sizes:
                start_cpu = busy_cpu()
                start = glob.must("start", "-s", str(n), "b")
                start_cpu = busy_cpu() - start_cpu
                phases = glob.phases()
                restart = glob.must("runplugin", "ipclusterrestart", "b")
                cpu = busy_cpu()
                terminate = glob.must("terminate", "-y", "b")
                cpu = busy_cpu() - cpu
                figures = {"start": start, "start cpu": start_cpu, **phases, "restart": restart,
                           "terminate": terminate, "terminate cpu": cpu}  # fmt: skip
                if managed is not None:
                    m_start = managed.must("start", "-s", str(n), "b")
                    m_env = managed.phases().get("step env", 0.0)
                    m_phase = managed.env_phase()
                    m_terminate = managed.must("terminate", "-y", "b")
                    figures |= {
                        "managed start": m_start,
                        "managed step env": m_env,
                        "managed env phase": m_phase,
                        "managed terminate": m_terminate,
                    }
                if not args.no_plain:
                    p_start, p_restart, p_terminate, p_cpu = plain.round(n)
                    figures |= {"plain start": p_start, "plain restart": p_restart, "plain terminate": p_terminate,
                                "plain terminate cpu": p_cpu}  # fmt: skip
                for key, value in figures.items():
                    samples.setdefault(f"{key} {n}", []).append(value)
                samples.setdefault(f"restart/start {n}", []).append(restart / start)
                print(f"round {round_ + 1}, {n} hosts: " + ", ".join(f"{k} {v:.2f}" for k, v in figures.items()),
                      flush=True)  # fmt: skip
        more = min(8, len(net.hosts) - 1)
        for round_ in range(args.repeats if more >= 1 else 0):  # addnode -n 8 to a running 1-host cluster
            glob.must("start", "-s", "1", "b")
            added = glob.must("addnode", "-n", str(more), "b")
            glob.must("terminate", "-y", "b")
            figures = {"globular": added, "plain": 0.0 if args.no_plain else plain.addnode(more)}
            for key, value in figures.items():
                samples.setdefault(f"addnode {key}", []).append(value)
            print(f"round {round_ + 1}, addnode -n {more} to 1 host: " + ", ".join(f"{k} {v:.2f}" for k, v in figures.items()),
                  flush=True)  # fmt: skip
        for i in range(tries):
            took, done = glob.cmd("start", "-s", str(runs), "b")
            last = done.stderr.strip().splitlines()[-1:] if done.returncode else []
            outcomes.append("ok" if done.returncode == 0 else f"failed: {' '.join(last)}")
            glob.cmd("terminate", "-y", "b")
            print(f"failure-rate {i + 1}/{tries}: {outcomes[-1]} ({took:.1f} s)", flush=True)
    finally:
        net.down()
        shutil.rmtree(root, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in samples.items()}
    print(
        f"\n{'hosts':>5}  {'start s':>8}  {'restart s':>9}  {'restart/start':>13}  {'terminate s':>11}  {'term N/1':>8}"
        f"  {'term CPU-s':>10}"
    )
    for n in sizes:
        per_one = med[f"terminate {n}"] / med[f"terminate {sizes[0]}"]
        print(f"{n:>5}  {med[f'start {n}']:>8.2f}  {med[f'restart {n}']:>9.2f}  {med[f'restart/start {n}']:>13.2f}  "
              f"{med[f'terminate {n}']:>11.2f}  {per_one:>8.2f}  {med[f'terminate cpu {n}']:>10.2f}")  # fmt: skip
    print("\nwhere a node's start goes (median over the nodes, s) and the machine's busy CPU-s during start")
    print(f"{'hosts':>5}  " + "  ".join(f"{p:>10}" for p in PHASES if f"step {p} {sizes[0]}" in med) + "  start CPU-s")
    for n in sizes:
        steps = "  ".join(f"{med[f'step {p} {n}']:>10.2f}" for p in PHASES if f"step {p} {sizes[0]}" in med)
        print(f"{n:>5}  {steps}  {med[f'start cpu {n}']:>11.2f}")
    if managed is not None:
        print("\nenvironment = managed (cached) against system, same rounds")
        print(f"{'hosts':>5}  {'system s':>8}  {'managed s':>9}  {'managed/system':>14}  {'env step s':>10}  "
              f"{'env phase s':>11}  {'terminate m/s':>13}")  # fmt: skip
        for n in sizes:
            print(f"{n:>5}  {med[f'start {n}']:>8.2f}  {med[f'managed start {n}']:>9.2f}  "
                  f"{med[f'managed start {n}'] / med[f'start {n}']:>14.2f}  {med[f'managed step env {n}']:>10.2f}  "
                  f"{med[f'managed env phase {n}']:>11.2f}  "
                  f"{med[f'managed terminate {n}'] / med[f'terminate {n}']:>13.2f}")  # fmt: skip
    if not args.no_plain:
        print("\nplain ipyparallel (SSH launcher), and globular / plain")
        print(f"{'hosts':>5}  {'start s':>8}  {'restart s':>9}  {'terminate s':>11}  {'term CPU-s':>10}  "
              f"{'start g/p':>9}  {'restart g/p':>11}  {'terminate g/p':>13}")  # fmt: skip
        for n in sizes:
            row = [med[f"plain {k} {n}"] for k in ("start", "restart", "terminate", "terminate cpu")]
            ratios = [med[f"{k} {n}"] / med[f"plain {k} {n}"] for k in ("start", "restart", "terminate")]
            print(f"{n:>5}  {row[0]:>8.2f}  {row[1]:>9.2f}  {row[2]:>11.2f}  {row[3]:>10.2f}  "
                  f"{ratios[0]:>9.2f}  {ratios[1]:>11.2f}  {ratios[2]:>13.2f}")  # fmt: skip
    if "addnode globular" in med:
        ratio = (
            ""
            if args.no_plain
            else f", plain ipyparallel {med['addnode plain']:.2f} s (g/p {med['addnode globular'] / med['addnode plain']:.2f})"
        )
        print(f"\naddnode -n {more} to a running 1-host cluster: globular {med['addnode globular']:.2f} s{ratio}")
    if tries:
        print(f"start -s {runs}: {outcomes.count('ok')} of {tries} succeeded")
    print(f"({time.perf_counter() - began:.0f} s in all; samples in {args.json})")
    args.json.write_text(json.dumps({"samples": samples, "medians": med, "failure_rate": outcomes}, indent=1))


if __name__ == "__main__":
    main()
