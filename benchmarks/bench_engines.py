"""Many engines on one machine: globular's local nodes with ``engine_fork`` on (the default)
and off, against plain ipyparallel (``ipp.Cluster(n=N)``, its defaults), interleaved.

    .venv/bin/python benchmarks/bench_engines.py [--nodes 2] [--engines 16] [--repeats 3]

Each round starts the same number of engines three ways (who goes first rotates), each until
every engine is registered and has run a task, then terminates it; the CPU column is the
machine's busy CPU-seconds during the start, per engine; the memory column is what each engine
costs the machine: the proportional set size (PSS: shared pages split between the processes
that share them) of the engine, its nanny and its share of globular's forking parent.  On the
2-core machine the default, 2 nodes x 16 engines, takes about 2 minutes; issue 16 asks for 256 engines on 16 cores
(``--nodes 16 --engines 16``), which needs a 16-core machine.  Samples go to
``benchmarks/results-engines.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import Globular, Plain
from bench_scale import busy_cpu


def pss_mb(pids: list[int]) -> float:
    """The proportional set size of these engines, their nannies and globular's forking parent
    (where there is one), in MB (/proc/PID/smaps_rollup)."""
    import psutil

    procs = [psutil.Process(p) for p in pids]
    starters = {p.parent() for p in procs if "forkstart" in " ".join(p.parent().cmdline())}
    total = 0
    for proc in procs + [c for p in procs for c in p.children()] + list(starters):
        for line in Path(f"/proc/{proc.pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                total += int(line.split()[1])
    return total / 1024


def spread(values: list[float]) -> float:
    return (max(values) - min(values)) / 2 / statistics.median(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--engines", type=int, default=16, help="engines per node")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=Path(__file__).with_name("results-engines.json"))
    args = parser.parse_args()
    total = args.nodes * args.engines
    systems = ["globular", "globular, engine_fork = False", "plain ipp"]
    samples: dict[str, dict[str, list[float]]] = {
        s: {"start": [], "cpu": [], "mb": [], "terminate": []} for s in systems
    }
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="globular-bench-engines-") as tmp:
        glob = Globular(Path(tmp))
        for round_ in range(args.repeats):
            for system in systems[round_ % 3 :] + systems[: round_ % 3]:
                cpu, t0 = busy_cpu(), time.perf_counter()
                if system == "plain ipp":
                    runner: Globular | Plain = Plain()
                    _, rc = runner.start(total)
                else:
                    runner = glob
                    extra = "engine_fork = False\n" if "False" in system else ""
                    _, rc = glob.start(args.nodes, args.engines, extra=extra)
                    rc.wait_for_engines(total, timeout=60)
                try:
                    rc[:].apply_sync(int)  # a builtin: nothing to import on the engines
                    took, cpu = time.perf_counter() - t0, busy_cpu() - cpu
                    mb = pss_mb(rc[:].apply_sync(os.getpid)) / total
                finally:
                    terminate = runner.stop(rc)
                for key, value in [("start", took), ("cpu", cpu / total), ("mb", mb), ("terminate", terminate)]:
                    samples[system][key].append(value)
                print(f"round {round_ + 1}, {system}: start {took:.2f} s, {cpu / total:.3f} CPU-s and {mb:.0f} MB "
                      f"an engine, terminate {terminate:.2f} s", file=sys.stderr, flush=True)  # fmt: skip
    med = {s: {k: statistics.median(v) for k, v in f.items()} for s, f in samples.items()}
    plain = med["plain ipp"]
    print(f"{total} engines ({args.nodes} nodes x {args.engines}), medians of {args.repeats} rounds")
    print(f"{'':<30} {'start s':>8} {'vs plain':>8} {'CPU-s/engine':>12} {'vs plain':>8} {'MB/engine':>9} "
          f"{'vs plain':>8} {'terminate s':>11} {'vs plain':>8} {'noise':>9}")  # fmt: skip
    for system in systems:
        m = med[system]
        noise = "/".join(f"{spread(samples[system][k]):.0%}" for k in ("start", "terminate"))
        print(f"{system:<30} {m['start']:>8.2f} {m['start'] / plain['start']:>8.2f} {m['cpu']:>12.3f} "
              f"{m['cpu'] / plain['cpu']:>8.2f} {m['mb']:>9.0f} {m['mb'] / plain['mb']:>8.2f} "
              f"{m['terminate']:>11.2f} {m['terminate'] / plain['terminate']:>8.2f} {noise:>9}")  # fmt: skip
    print("(noise: half the range of the rounds over their median, start/terminate)")
    print(f"({time.perf_counter() - began:.0f} s in all; samples in {args.json})")
    args.json.write_text(json.dumps({"nodes": args.nodes, "engines": args.engines, "samples": samples}, indent=1))


if __name__ == "__main__":
    main()
