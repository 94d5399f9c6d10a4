"""Scale: start, restart and terminate on N SSH hosts, and how often a start succeeds.

    sudo .venv/bin/python benchmarks/bench_scale.py [--sizes 1,4,16,32] [--repeats 1] [--failure-rate 32x20]

Needs root, sshd and iproute2: it makes the netns test hosts of tests/testhosts.py
(198.18.0.0/24), one engine per host (``cores_per_node = 1``, ``environment =
system`` with this machine's Python, which the hosts share).  For every size, each
round: ``start -s N``, ``runplugin ipclusterrestart``, ``terminate``, timed from the
outside as a user sees them; then the ratios issue 16 asks for: restart / start of
the same cluster, and terminate of N / terminate of 1.  With ``--failure-rate NxK``
it also starts and terminates an N-host cluster K times and counts the starts that
succeed.  Opt-in (not in scripts/test): 1, 4, 16, 32 hosts take about 5 minutes on 2
cores, a 32x20 failure-rate run about 25.
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import testhosts

CONFIG = """\
[global]
default_template = bench
[cluster bench]
provider = ssh
node_hosts = {hosts}
ssh_key = {key}
known_hosts = {known_hosts}
python = {python}
remote_dir = {remote_dir}
cores_per_node = 1
connect_timeout = 10
environment = system
plugins = ipcluster
[plugin ipcluster]
setup_class = ipcluster
"""


class Globular:
    def __init__(self, root: Path, net: testhosts.HostNet):
        self.root, self.net = root, net
        self.env = dict(os.environ, GLOBULAR_HOME=str(root / "home"), COLUMNS="200")
        self.config = root / "config"
        hosts = ", ".join(f"root@{h.address}" for h in net.hosts)
        self.config.write_text(
            CONFIG.format(
                hosts=hosts,
                key=net.key,
                known_hosts=net.known_hosts,
                python=sys.executable,
                remote_dir=root / "nodes",
            )
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
    parser.add_argument("--json", type=Path, default=Path(__file__).with_name("results-scale.json"))
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    runs, tries = (int(x) for x in args.failure_rate.split("x")) if args.failure_rate else (0, 0)
    began = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="globular-bench-scale-"))
    net = testhosts.HostNet(workdir=root / "net").up(max([*sizes, runs]))
    samples: dict[str, list[float]] = {}
    outcomes: list[str] = []
    try:
        glob = Globular(root, net)
        for round_ in range(args.repeats):
            for n in sizes:
                start = glob.must("start", "-s", str(n), "b")
                restart = glob.must("runplugin", "ipclusterrestart", "b")
                terminate = glob.must("terminate", "-y", "b")
                for key, value in (("start", start), ("restart", restart), ("terminate", terminate)):
                    samples.setdefault(f"{key} {n}", []).append(value)
                samples.setdefault(f"restart/start {n}", []).append(restart / start)
                print(f"round {round_ + 1}, {n} hosts: start {start:.2f} s, restart {restart:.2f} s, "
                      f"terminate {terminate:.2f} s", flush=True)  # fmt: skip
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
    )
    for n in sizes:
        per_one = med[f"terminate {n}"] / med[f"terminate {sizes[0]}"]
        print(f"{n:>5}  {med[f'start {n}']:>8.2f}  {med[f'restart {n}']:>9.2f}  {med[f'restart/start {n}']:>13.2f}  "
              f"{med[f'terminate {n}']:>11.2f}  {per_one:>8.2f}")  # fmt: skip
    if tries:
        print(f"start -s {runs}: {outcomes.count('ok')} of {tries} succeeded")
    print(f"({time.perf_counter() - began:.0f} s in all; samples in {args.json})")
    args.json.write_text(json.dumps({"samples": samples, "medians": med, "failure_rate": outcomes}, indent=1))


if __name__ == "__main__":
    main()
