"""Slurm: start-to-ready of N nodes, globular against ipyparallel's own Slurm launcher.

    sudo .venv/bin/python benchmarks/bench_slurm.py [--sizes 3,8] [--repeats 3]

Needs root, sshd, iproute2, slurm-wlm and munge: it brings up the tests' real Slurm
(tests/testslurm.py: slurmctld here, a slurmd on each netns test host, 2 CPUs each).
For each size N, interleaved, each round:

- globular: ``start -s N`` of a ``provider = slurm`` cluster (one 1-core job per node, the
  controller in the first; ``environment = system``, this machine's venv, which the hosts
  share), timed from the outside until the command returns with every engine registered;
  then ``terminate``;
- globular from Python: the same start through ``globular.operations.start`` in this process,
  like for like with plain's ``Cluster`` (neither pays an interpreter's start-up and imports);
- plain ipyparallel: ``ipp.Cluster(engine_launcher_class="slurm", n=N)`` (its
  SlurmEngineSetLauncher: one sbatch of N tasks, ``srun ipengine``; the controller here,
  listening on the bridge address), timed until ``wait_for_engines(N)``; then
  ``stop_cluster``.

Before each timed start the queue is left to settle: no job of the round before, and
SETTLE seconds without a job or a scheduling pass (``sdiag``'s counts of main and backfill
passes).  Slurm schedules a batch job no sooner than ``batch_sched_delay`` (3 s by default)
after its last scheduling pass, and a job's end starts one, as does the periodic pass (every
``sched_interval``, 60 s): without the pause, whoever submits just after a pass waits up to 3 s
more for its jobs, and that depends on when the rounds fall, not on the system measured.

Prints the medians and globular / plain; opt-in (not in scripts/test).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import testhosts
import testslurm
from common import command_env

CONFIG = """\
[global]
default_template = bench
[cluster bench]
provider = slurm
python = {python}
remote_dir = {remote_dir}
cores_per_node = 1
environment = system
plugins = ipcluster
[plugin ipcluster]
setup_class = ipcluster
master_engines = 1
"""


SETTLE = 4.0  # s without a job or a scheduling pass before a timed start: more than Slurm's batch_sched_delay (3 s)


def scheduling_passes() -> tuple[int, int]:
    """How many main and backfill scheduling passes slurmctld has made (``sdiag``)."""
    out = subprocess.run(["sdiag"], capture_output=True, text=True, check=True).stdout
    main, backfill = out.split("Main schedule statistics")[1].split("Backfilling stats")
    return tuple(int(re.search(r"Total cycles:\s+(\d+)", part).group(1)) for part in (main, backfill))  # type: ignore[return-value]


def settle() -> None:
    """Wait until the queue is empty and slurmctld has made no scheduling pass for SETTLE s
    (see the module's doc)."""
    deadline = time.monotonic() + 180
    quiet_since, passes = time.monotonic(), None
    while True:
        if time.monotonic() > deadline:
            raise RuntimeError("the queue did not settle in 180 s (jobs of the round before, or passes)")
        now = scheduling_passes()
        if subprocess.run(["squeue", "-h"], capture_output=True, text=True, check=True).stdout.strip() or now != passes:
            quiet_since, passes = time.monotonic(), now
        elif time.monotonic() - quiet_since >= SETTLE:
            return
        time.sleep(0.1)


def globular_round(root: Path, env: dict[str, str], n: int) -> tuple[float, float]:
    """The start's seconds, and the longest a node's job waited to run (its "running" step)."""

    def cmd(*args: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [sys.executable, "-m", "globular", "-c", str(root / "config"), *args],
            capture_output=True, text=True, env=env, check=False,
        )  # fmt: skip
        if done.returncode:
            raise RuntimeError(f"globular {' '.join(args)} failed:\n{done.stdout}{done.stderr}")
        return done

    settle()
    began = time.perf_counter()
    cmd("start", "-s", str(n), "b")
    took = time.perf_counter() - began
    nodes = json.loads(cmd("status", "b", "--output", "json").stdout)["result"]["nodes"]
    waited = max(
        sum(t for step, t in node["steps"].items() if step.split()[0] in ("queued", "running")) for node in nodes
    )
    cmd("terminate", "-y", "b")
    return took, waited


def python_round(root: Path, n: int) -> float:
    """The start's seconds through the library, in this process (see the module's doc)."""
    import asyncio

    from globular import operations
    from globular.config import Config

    spec = Config.load(root / "config").cluster_spec(None, n)
    settle()
    began = time.perf_counter()
    asyncio.run(operations.start("p", spec, home=root / "home"))
    took = time.perf_counter() - began
    asyncio.run(operations.terminate("p", home=root / "home"))
    return took


def plain_round(root: Path, n: int, index: int) -> float:
    import ipyparallel as ipp

    cluster = ipp.Cluster(
        profile_dir=str(root / f"ipp-{n}-{index}"),
        n=n,
        controller_ip=testhosts.GATEWAY,
        engine_launcher_class="slurm",
        log_level=40,
    )
    cluster.config.SlurmEngineSetLauncher.options = "--cpus-per-task=1"
    settle()
    began = time.perf_counter()
    cluster.start_cluster_sync()
    client = cluster.connect_client_sync()
    try:
        client.wait_for_engines(n, timeout=300)
        return time.perf_counter() - began
    finally:
        client.close()
        cluster.stop_cluster_sync()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="3,8")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=Path(__file__).with_name("results-slurm.json"))
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    hosts = max(4, -(-max(sizes) // testslurm.CPUS_PER_NODE))
    began = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="globular-bench-slurm-"))
    here = Path.cwd()
    os.chdir(root)  # ipyparallel's Slurm launcher writes its slurm_engine.sbatch into the current folder
    net = testhosts.HostNet(workdir=root / "net").up(hosts)
    slurm = testslurm.Slurm(net, root / "slurm")
    samples: dict[str, list[float]] = {}
    try:
        slurm.up()
        os.environ.update(slurm.env)
        env = command_env(GLOBULAR_HOME=str(root / "home"), COLUMNS="200")
        (root / "config").write_text(CONFIG.format(python=sys.executable, remote_dir=root / "shared"))
        for index in range(args.repeats):
            for n in sizes:
                g, waited = globular_round(root, env, n)
                p = plain_round(root, n, index)
                y = python_round(root, n)
                samples.setdefault(f"globular {n}", []).append(g)
                samples.setdefault(f"job wait {n}", []).append(waited)
                samples.setdefault(f"plain {n}", []).append(p)
                samples.setdefault(f"from Python {n}", []).append(y)
                print(
                    f"round {index + 1}, {n} nodes: globular {g:.2f} s (jobs running after {waited:.2f} s),"
                    f" plain ipyparallel {p:.2f} s, globular from Python {y:.2f} s",
                    flush=True,
                )
    finally:
        os.chdir(here)
        slurm.down()
        net.down()
        shutil.rmtree(root, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in samples.items()}
    print(
        f"\n{'nodes':>5}  {'globular s':>10}  {'job wait s':>10}  {'from Python s':>13}  {'plain ipp s':>11}"
        f"  {'globular/plain':>14}  {'Python/plain':>12}  (medians of {args.repeats})"
    )
    for n in sizes:
        g, p, y = med[f"globular {n}"], med[f"plain {n}"], med[f"from Python {n}"]
        spread = max(samples[f"plain {n}"]) - min(samples[f"plain {n}"])
        w = med[f"job wait {n}"]
        print(
            f"{n:>5}  {g:>10.2f}  {w:>10.2f}  {y:>13.2f}  {p:>11.2f}  {g / p:>14.2f}  {y / p:>12.2f}"
            f"  (plain's spread {spread:.2f} s)"
        )
    print(f"({time.perf_counter() - began:.0f} s in all; samples in {args.json})")
    args.json.write_text(json.dumps({"samples": samples, "medians": med}, indent=1))


if __name__ == "__main__":
    main()
