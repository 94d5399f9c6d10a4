"""Node environments: what starting on bare hosts costs, against hosts that already have everything.

    sudo .venv/bin/python benchmarks/bench_env.py [--repeats 3] [--hosts 3]

Needs root, sshd and iproute2 (it makes the netns test hosts of tests/testhosts.py,
198.18.0.0/24).  The hosts run a bare Python (a venv made ``--without-pip`` from
Debian's /usr/bin/python3 where it is this major.minor): the standard library
only.  Rows, each the median of ``--repeats`` rounds, the kinds interleaved in
every round (the wheelhouse on this machine is warm, as after a first start):

- start N bare hosts, first time: the node environment is built (a fresh
  ``remote_dir`` each round);
- start N bare hosts again: the environment is cached;
- start N hosts with ``environment = system`` whose Python is this machine's
  venv (ipyparallel installed): the baseline, nothing to build;
- start 1 bare host, first time, and 1 host with ``environment = system``: what one build costs.

The test hosts share this machine's file system, so on N hosts one node builds
and the others wait on its lock and find it made (as hosts sharing an NFS home
do); on hosts with disks of their own the N builds run at once.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import testhosts
from common import command_env, ssh_config


def bare_python(folder: Path) -> str:
    base = "/usr/bin/python3"
    probe = subprocess.run([base, "-c", "import sys; print(*sys.version_info[:2])"], capture_output=True, text=True)
    if probe.returncode != 0 or tuple(map(int, probe.stdout.split())) != tuple(sys.version_info[:2]):
        base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", str(folder)], check=True)
    return str(folder / "bin" / "python")


class Runner:
    def __init__(self, root: Path, net: testhosts.HostNet, bare: str):
        self.root, self.net, self.bare = root, net, bare
        self.env = command_env(GLOBULAR_HOME=str(root / "home"), COLUMNS="200")

    def start(self, hosts: int, *, environment: str, remote_dir: Path) -> float:
        config = self.root / "config"
        python = self.bare if environment == "managed" else sys.executable
        config.write_text(
            ssh_config(
                self.net,
                self.net.hosts[:hosts],
                python=python,
                remote_dir=remote_dir,
                environment=environment,
                connect_timeout=5,
            )
        )
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "globular", "-c", str(config), "start", "b"],
            capture_output=True,
            text=True,
            env=self.env,
        )
        elapsed = time.perf_counter() - started
        stop = subprocess.run(
            [sys.executable, "-m", "globular", "terminate", "-y", "b"], capture_output=True, text=True, env=self.env
        )
        if done.returncode != 0 or stop.returncode != 0:
            raise RuntimeError(f"start/terminate failed:\n{done.stdout}{done.stderr}{stop.stdout}{stop.stderr}")
        return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hosts", type=int, default=3)
    parser.add_argument("--json", type=Path, default=Path(__file__).with_name("results-env.json"))
    args = parser.parse_args()
    began = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="globular-bench-env-"))
    net = testhosts.HostNet(workdir=root / "net").up(args.hosts)
    rows: dict[str, list[float]] = {}
    try:
        runner = Runner(root, net, bare_python(root / "bare"))
        runner.start(1, environment="managed", remote_dir=root / "warmup")  # the wheelhouse, once
        n = args.hosts
        names = (
            f"start {n} bare hosts, environment built (s)",
            f"start {n} bare hosts, environment cached (s)",
            f"start {n} hosts, environment = system (s)",
            "start 1 bare host, environment built (s)",
            "start 1 host, environment = system (s)",
        )
        for round_ in range(args.repeats):
            fresh = root / f"r{round_}"
            rows.setdefault(names[0], []).append(runner.start(n, environment="managed", remote_dir=fresh))
            rows.setdefault(names[1], []).append(runner.start(n, environment="managed", remote_dir=fresh))
            rows.setdefault(names[2], []).append(runner.start(n, environment="system", remote_dir=root / "system"))
            rows.setdefault(names[3], []).append(
                runner.start(1, environment="managed", remote_dir=root / f"one{round_}")
            )
            rows.setdefault(names[4], []).append(runner.start(1, environment="system", remote_dir=root / "system"))
            print(f"round {round_ + 1}/{args.repeats}: " + ", ".join(f"{rows[k][-1]:.2f}" for k in names), flush=True)
    finally:
        net.down()
        shutil.rmtree(root, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in rows.items()}
    baseline = {names[0]: names[2], names[1]: names[2], names[2]: names[2], names[3]: names[4], names[4]: names[4]}
    print(f"\n{'figure (median)':<52}{'seconds':>10}{'vs system':>11}")
    for name in names:
        print(f"{name:<52}{med[name]:>10.2f}{med[name] - med[baseline[name]]:>+10.2f}s")
    cold_n, cold_1 = med[names[0]] - med[names[2]], med[names[3]] - med[names[4]]
    print(
        f"(building the environment costs {cold_n:.2f} s on {n} hosts, {cold_1:.2f} s on 1: ratio {cold_n / cold_1:.2f}; "
        f"{time.perf_counter() - began:.0f} s in all; samples in {args.json})"
    )
    args.json.write_text(json.dumps({"samples": rows, "medians": med}, indent=1))


if __name__ == "__main__":
    main()
