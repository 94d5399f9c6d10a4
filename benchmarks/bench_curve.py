"""What encryption costs: globular with encryption = curve against encryption = none, and plain
ipyparallel, measured in the same run on this machine.

    .venv/bin/python benchmarks/bench_curve.py [--repeats 3]

Local provider, 1 node x 2 engines each.  Every round starts the three (the order rotates),
then takes the work figures with all three up, alternating between them, so that the drift of
a small machine hits all alike.  Ratios: curve / none (the cost of encryption) and
curve / plain; times below 1 are better, rates above 1.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench
from bench import Globular, Plain, push_pull, work_figures


def noop(x=None):
    return x


noop.__module__ = "__main__"  # sent by value: the engines cannot import this script
bench.noop = noop

SYSTEMS = ("curve", "none", "plain")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=str(Path(__file__).with_name("results-curve.json")))
    args = parser.parse_args()
    figures: dict[str, dict[str, list[float]]] = {}

    def add(row: str, system: str, value: float) -> None:
        figures.setdefault(row, {s: [] for s in SYSTEMS})[system].append(value)

    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="globular-bench-curve-") as tmp:
        for rep in range(args.repeats):
            print(f"round {rep + 1}/{args.repeats}", file=sys.stderr)
            order = SYSTEMS[rep % 3 :] + SYSTEMS[: rep % 3]
            runners = {
                "curve": Globular(Path(tmp) / f"curve{rep}"),
                "none": Globular(Path(tmp) / f"none{rep}"),
                "plain": Plain(),
            }
            clients = {}
            try:
                for system in order:
                    runner = runners[system]
                    if system == "plain":
                        t, clients[system] = runner.start(2)
                    else:
                        (Path(tmp) / f"{system}{rep}").mkdir()
                        t, clients[system] = runner.start(1, 2, extra=f"encryption = {system}\n")
                    add("start 1 node x 2 engines (s)", system, t)
                for system in order + tuple(reversed(order)):
                    for name, value in work_figures(clients[system]).items():
                        add(name, system, value)
                for size, label, samples in ((1 << 20, "1 MB", 5), (100 << 20, "100 MB", 2)):
                    for system in order:
                        push_pull(clients[system], size)  # warm
                    for _ in range(samples):
                        for system in order:
                            add(f"push+pull {label} to 2 engines (s)", system, push_pull(clients[system], size))
            finally:  # whatever failed, nothing is left running
                for system, rc in clients.items():
                    try:
                        runners[system].stop(rc)
                    except Exception as exc:
                        print(f"stopping {system}: {exc}", file=sys.stderr)

    rows = []
    for row, values in figures.items():
        med = {s: statistics.median(values[s]) for s in SYSTEMS}
        rows.append(
            {"row": row, **med, "curve/none": med["curve"] / med["none"], "curve/plain": med["curve"] / med["plain"]}
        )
    Path(args.json).write_text(
        json.dumps(
            {"repeats": args.repeats, "rows": rows, "samples": figures, "seconds": time.perf_counter() - began},
            indent=2,
        )
    )
    width = max(len(r["row"]) for r in rows)
    print(
        f"{'figure (median)':<{width}}  {'curve':>10}  {'none':>10}  {'plain ipp':>10}  {'curve/none':>10}  {'curve/plain':>11}"
    )
    for r in rows:
        print(
            f"{r['row']:<{width}}  {r['curve']:>10.3f}  {r['none']:>10.3f}  {r['plain']:>10.3f}  "
            f"{r['curve/none']:>10.2f}  {r['curve/plain']:>11.2f}"
        )
    print(
        f"(times: below 1 is better; rates: above 1; {time.perf_counter() - began:.0f} s in all; samples in {args.json})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
