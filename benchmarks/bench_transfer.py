"""``globular put`` of one file to N SSH hosts against ``scp`` to each host in turn (what a user
does by hand), interleaved.

    sudo .venv/bin/python benchmarks/bench_transfer.py [--sizes 3,16] [--mb 200] [--rounds 3]

Needs root, sshd and iproute2: it makes the netns test hosts of tests/testhosts.py
(198.18.0.0/24) and a running cluster on them (``environment = system``, one engine a host).
Each round, for each size: ``globular put`` of a fresh file of ``--mb`` MB (new bytes, so
nothing is skipped), then ``scp`` of another fresh file to every host one after the other,
with the same key and known_hosts; both timed from the outside as a user sees them.  Prints
the medians and the ratio put / scp.  Every host shares this machine's disk and cores, so
the absolute numbers are this machine's; the ratio is the point.  Opt-in (not in scripts/test).
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
from common import command_env, ssh_config


def fresh(path: Path, mb: int) -> Path:
    with path.open("wb") as f:
        for _ in range(mb):
            f.write(os.urandom(1 << 20))
    return path


def globular(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", "globular", *args], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"globular {' '.join(args)} failed:\n{done.stderr}")
    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="3,16")
    parser.add_argument("--mb", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    work = Path(tempfile.mkdtemp(prefix="bench-transfer-"))
    net = testhosts.HostNet(workdir=work / "net").up(max(sizes))
    rows = {}
    try:
        for size in sizes:
            hosts = net.hosts[:size]
            env = command_env(GLOBULAR_HOME=str(work / f"home{size}"))
            config = work / f"config{size}"
            config.write_text(ssh_config(net, hosts, python=sys.executable, remote_dir=work / f"nodes{size}"))
            globular(env, "-c", str(config), "start", "-s", str(size), "bench")
            put, scp = [], []
            try:
                for round_ in range(args.rounds):
                    source = fresh(work / f"put-{round_}.bin", args.mb)
                    t = time.perf_counter()
                    globular(env, "put", "bench", str(source), "incoming")
                    put.append(time.perf_counter() - t)
                    other = fresh(work / f"scp-{round_}.bin", args.mb)
                    t = time.perf_counter()
                    for host in hosts:  # what a user does by hand: one host after another
                        subprocess.run(
                            ["scp", "-q", "-i", str(net.key), "-o", f"UserKnownHostsFile={net.known_hosts}",
                             "-o", "StrictHostKeyChecking=yes", str(other),
                             f"root@{host.address}:{work / 'scp-target-'}{host.name}.bin"],
                            check=True,
                        )  # fmt: skip
                    scp.append(time.perf_counter() - t)
                    for path in (source, other, *work.glob("scp-target-*")):
                        path.unlink()
            finally:
                globular(env, "terminate", "-y", "bench")
            rows[size] = {"put_s": statistics.median(put), "scp_s": statistics.median(scp), "put": put, "scp": scp}
            row = rows[size]
            print(f"{size:>3} hosts, {args.mb} MB: put {row['put_s']:.2f} s, scp one by one {row['scp_s']:.2f} s, "
                  f"ratio {row['put_s'] / row['scp_s']:.2f}", flush=True)  # fmt: skip
    finally:
        net.down()
        shutil.rmtree(work, ignore_errors=True)
    out = Path(__file__).with_name("results-transfer.json")
    out.write_text(json.dumps({"mb": args.mb, "rounds": args.rounds, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
