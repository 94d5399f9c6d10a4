"""globular against plain ipyparallel, measured in the same run on this machine.

    .venv/bin/python benchmarks/bench.py [--repeats 3] [--json benchmarks/results.json]

Plain ipyparallel is ``ipp.Cluster(n=...)`` with its defaults; globular is the
``globular`` command with the built-in local provider.  Each figure is the
median of ``--repeats`` runs.  Times: ratio = globular / plain (below 1 is
better); rates: ratio = globular / plain (above 1 is better).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ipyparallel as ipp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_env

PACKERS = {"json": ("json", "json"), "pickle": ("pickle", "pickle"), "msgpack": ("msgpack.packb", "msgpack.unpackb")}
CONFIG = """\
[global]
default_template = bench
[cluster bench]
provider = local
cores_per_node = {cores}
plugins = ipcluster
[plugin ipcluster]
setup_class = ipcluster
master_engines = {cores}
packer = {packer}
{extra}"""


def noop(x=None):
    return x


class Globular:
    """Drives the real `globular` command in its own GLOBULAR_HOME."""

    def __init__(self, root: Path):
        self.home = root / "home"
        self.config = root / "config"
        self.env = command_env(GLOBULAR_HOME=str(self.home), COLUMNS="200")

    def cmd(self, *args: str) -> float:
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "globular", "-c", str(self.config), *args],
            capture_output=True,
            text=True,
            env=self.env,
        )
        if done.returncode != 0:
            raise RuntimeError(f"globular {' '.join(args)} failed:\n{done.stdout}{done.stderr}")
        return time.perf_counter() - started

    def start(self, nodes: int, cores: int, packer: str = "json", extra: str = "") -> tuple[float, ipp.Client]:
        self.config.write_text(CONFIG.format(cores=cores, packer=packer, extra=extra))
        elapsed = self.cmd("start", "-s", str(nodes), "b")
        return elapsed, ipp.Client(str(self.home / "ipcluster" / "b-local.json"))

    def restart(self, rc: ipp.Client, n: int) -> float:
        old = set(rc.ids)
        started = time.perf_counter()
        self.cmd("runplugin", "ipclusterrestart", "b")
        wait_ids(rc, lambda ids: len(ids) == n and not ids & old)
        return time.perf_counter() - started

    def addnode(self, rc: ipp.Client, n: int) -> float:
        before = set(rc.ids)
        started = time.perf_counter()
        self.cmd("addnode", "b")
        new = wait_ids(rc, lambda ids: len(ids - before) >= n) - before
        rc[sorted(new)].apply_sync(noop)  # the new engines take work
        return time.perf_counter() - started

    def stop(self, rc: ipp.Client) -> float:
        rc.close()
        return self.cmd("terminate", "-y", "b")

    def stop_from_python(self, rc: ipp.Client) -> float:
        """``globular.operations.terminate`` in this process: like for like with ``Cluster.stop_cluster_sync``."""
        import asyncio

        from globular import operations as cluster

        rc.close()
        started = time.perf_counter()
        asyncio.run(cluster.terminate("b", home=self.home))
        return time.perf_counter() - started


class Plain:
    """``ipp.Cluster`` with its defaults (the packer set where a row asks for one)."""

    def start(self, n: int, packer: str = "json") -> tuple[float, ipp.Client]:
        pack, unpack = PACKERS[packer]
        args = [] if packer == "json" else [f"--Session.packer={pack}", f"--Session.unpacker={unpack}"]
        started = time.perf_counter()
        self.cluster = ipp.Cluster(n=n, controller_args=args)
        rc = self.cluster.start_and_connect_sync()
        rc.wait_for_engines(n, timeout=120)
        return time.perf_counter() - started, rc

    def restart(self, rc: ipp.Client, n: int) -> float:
        old = set(rc.ids)
        started = time.perf_counter()
        self.cluster.restart_engines_sync()
        wait_ids(rc, lambda ids: len(ids) == n and not ids & old)
        return time.perf_counter() - started

    def addnode(self, rc: ipp.Client, n: int) -> float:
        before = set(rc.ids)
        started = time.perf_counter()
        self.cluster.start_engines_sync(n=n)
        new = wait_ids(rc, lambda ids: len(ids - before) >= n) - before
        rc[sorted(new)].apply_sync(noop)
        return time.perf_counter() - started

    def stop(self, rc: ipp.Client) -> float:
        rc.close()
        started = time.perf_counter()
        self.cluster.stop_cluster_sync()
        return time.perf_counter() - started


def wait_ids(rc: ipp.Client, ok, timeout: float = 120) -> set[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ids = set(rc.ids)
        if ok(ids):
            return ids
        time.sleep(0.01)
    raise TimeoutError(f"engines: {rc.ids}")


def work_figures(rc: ipp.Client) -> dict[str, float]:
    lview = rc.load_balanced_view()
    lview.map_sync(noop, range(10))  # warm
    tasks = 1000
    started = time.perf_counter()
    results = [lview.apply_async(noop) for _ in range(tasks)]
    for r in results:
        r.get(60)
    apply_rate = tasks / (time.perf_counter() - started)
    items = 20_000
    started = time.perf_counter()
    lview.map_sync(noop, range(items), chunksize=200)
    map_rate = items / (time.perf_counter() - started)
    one = rc[rc.ids[0]]
    samples = []
    for _ in range(100):
        t = time.perf_counter()
        one.apply_sync(noop)
        samples.append(time.perf_counter() - t)
    return {"apply_async tasks/s": apply_rate, "map items/s": map_rate, "latency ms": 1000 * statistics.median(samples)}


def push_pull(rc: ipp.Client, nbytes: int) -> float:
    view = rc[:]
    array = np.random.default_rng(0).random(nbytes // 8)
    started = time.perf_counter()
    view.push({"a": array}, block=True)
    back = view.pull("a", block=True)
    elapsed = time.perf_counter() - started
    assert all(np.array_equal(b, array) for b in back)
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=str(Path(__file__).with_name("results.json")))
    args = parser.parse_args()
    figures: dict[str, dict[str, list[float]]] = {}

    def add(row: str, system: str, value: float) -> None:
        figures.setdefault(row, {"globular": [], "plain": []})[system].append(value)

    began = time.perf_counter()
    # an editable install has no bytecode (and PYTHONDONTWRITEBYTECODE keeps it so): compile it once,
    # as any regular install does, so that the command's start-up is measured as users get it
    import compileall

    import globular

    compileall.compile_dir(Path(globular.__file__).parent, quiet=1)
    with tempfile.TemporaryDirectory(prefix="globular-bench-") as tmp:
        glob = Globular(Path(tmp))
        for rep in range(args.repeats):
            print(f"round {rep + 1}/{args.repeats}", file=sys.stderr)
            # who goes first alternates from round to round; the work figures are taken
            # with both clusters up, alternating, so that drift of this machine hits both alike
            order = ("globular", "plain") if rep % 2 == 0 else ("plain", "globular")
            runners = {"globular": glob, "plain": Plain()}
            clients = {}
            started = {}
            for system in order:
                runner = runners[system]
                t, clients[system] = runner.start(1, 2) if system == "globular" else runner.start(2)
                started[system] = t
                add("start 1 node x 2 engines (s)", system, t)
            for system in order + tuple(reversed(order)):
                for name, value in work_figures(clients[system]).items():
                    add(name, system, value)
            for system in order:
                t = runners[system].restart(clients[system], 2)
                add("restart all engines (s)", system, t)
                add("restart / start of the same cluster", system, t / started[system])
            for system in order:
                add("addnode until new engines work (s)", system, runners[system].addnode(clients[system], 2))
            for system in order:
                add("terminate (s)", system, runners[system].stop(clients[system]))
            for system in order:
                runner = runners[system]
                t, rc = runner.start(3, 1) if system == "globular" else runner.start(3)
                add("start 3 nodes x 1 engine (s)", system, t)
                stop = runner.stop_from_python if system == "globular" else runner.stop
                add("terminate 3 nodes, from Python (s)", system, stop(rc))
                # without the per-engine nanny process (no Client.send_signal); plain keeps its defaults
                t, rc = runner.start(1, 2, extra="engine_nanny = False\n") if system == "globular" else runner.start(2)
                add("start 1 node x 2 engines, engine_nanny = False (s)", system, t)
                runner.stop(rc)
        for packer in PACKERS:
            # both clusters up at once, samples alternating, so that drift of this machine hits both alike
            plain = Plain()
            _, grc = glob.start(1, 2, packer)
            _, prc = plain.start(2, packer)
            for size, label, samples in ((1 << 20, "1 MB", 5 * args.repeats), (100 << 20, "100 MB", 3 * args.repeats)):
                push_pull(grc, size), push_pull(prc, size)  # warm
                for i in range(samples):  # who goes first alternates: a transfer can warm the next one's memory
                    for system, rc in [("globular", grc), ("plain", prc)][:: 1 if i % 2 == 0 else -1]:
                        add(f"push+pull {label} to 2 engines, {packer} (s)", system, push_pull(rc, size))
            glob.stop(grc)
            plain.stop(prc)

    rows = []
    for row, values in figures.items():
        g, p = statistics.median(values["globular"]), statistics.median(values["plain"])
        higher_is_better = row.endswith("/s")
        ratio = g / p
        better = ratio >= 1 if higher_is_better else ratio <= 1
        # run-to-run noise: half the spread of the samples, relative to their median
        noise = {
            k: (max(v) - min(v)) / 2 / statistics.median(v) if statistics.median(v) else 0.0 for k, v in values.items()
        }
        rows.append(
            {
                "row": row,
                "globular": g,
                "plain": p,
                "ratio": ratio,
                "noise_globular": noise["globular"],
                "noise_plain": noise["plain"],
                "globular_better_or_equal": better,
            }
        )
    Path(args.json).write_text(
        json.dumps(
            {
                "repeats": args.repeats,
                "cpus": os.cpu_count(),
                "rows": rows,
                "samples": figures,
                "seconds": time.perf_counter() - began,
            },
            indent=2,
        )
    )
    width = max(len(r["row"]) for r in rows)
    print(f"{'figure (median)':<{width}}  {'globular':>10}  {'plain ipp':>10}  {'ratio':>6}  {'noise g/p':>11}")
    for r in rows:
        within = abs(r["ratio"] - 1) <= max(r["noise_globular"], r["noise_plain"])
        mark = (
            "" if r["globular_better_or_equal"] else ("  (slower, within noise)" if within else "  <- globular slower")
        )
        noise = f"±{r['noise_globular']:.0%}/±{r['noise_plain']:.0%}"
        print(
            f"{r['row']:<{width}}  {r['globular']:>10.3f}  {r['plain']:>10.3f}  {r['ratio']:>6.2f}  {noise:>11}{mark}"
        )
    print(f"(ratio = globular / plain; {time.perf_counter() - began:.0f} s in all; figures in {args.json})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
