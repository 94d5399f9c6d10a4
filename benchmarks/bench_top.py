"""What watching costs: the tasks per second of a running map with and without ``globular top``
watching (a frame a second, as ``top`` does), interleaved.

    .venv/bin/python benchmarks/bench_top.py [--tasks 3000] [--rounds 5]

A local cluster of 2 nodes x 2 cores (3 engines); each round maps ``--tasks`` short tasks
(a millisecond of work each) through a load-balanced view, once alone and once while a
``globular top NAME`` process refreshes every second in a pseudo-terminal.  Prints the
medians and the ratio (watched / alone): 1.0 is free; the spread between rounds is the noise.
"""

from __future__ import annotations

import argparse
import os
import pty
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_env

CONFIG = """\
[global]
default_template = t
[cluster t]
provider = local
cores_per_node = 2
plugins = ipcluster
[plugin ipcluster]
setup_class = ipcluster
"""


def work(x: int) -> int:
    import time

    t = time.perf_counter()
    while time.perf_counter() - t < 0.001:
        pass
    return x


work.__module__ = "__main__"


def drain(fd: int) -> None:
    try:
        while os.read(fd, 65536):
            pass
    except OSError:
        pass


def rate(client: object, tasks: int) -> float:
    view = client.load_balanced_view()  # type: ignore[attr-defined]
    started = time.perf_counter()
    view.map_async(work, range(tasks), chunksize=1).get(timeout=600)
    return tasks / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a timeout's SIGTERM still terminates the cluster
    home = Path(tempfile.mkdtemp(prefix="bench-top-"))
    env = command_env(GLOBULAR_HOME=str(home / "home"), COLUMNS="160", LINES="30")
    (home / "config").write_text(CONFIG)
    globular = [sys.executable, "-m", "globular"]
    subprocess.run([*globular, "-c", str(home / "config"), "start", "-s", "2", "bench"], env=env, check=True,
                   capture_output=True)  # fmt: skip
    os.environ["GLOBULAR_HOME"] = env["GLOBULAR_HOME"]
    import globular as g

    client = g.connect("bench")
    alone, watched = [], []
    try:
        rate(client, 200)  # warm
        for _ in range(args.rounds):
            alone.append(rate(client, args.tasks))
            pid, fd = pty.fork()  # top in a terminal of its own, refreshing every second
            if pid == 0:
                os.execvpe(globular[0], [*globular, "top", "bench"], env)
            reader = threading.Thread(target=drain, args=(fd,), daemon=True)  # a terminal someone reads
            reader.start()
            time.sleep(2)
            watched.append(rate(client, args.tasks))
            os.kill(pid, signal.SIGINT)
            os.waitpid(pid, 0)
            os.close(fd)
            reader.join(timeout=5)
    finally:
        client.close()
        subprocess.run([*globular, "terminate", "-y", "bench"], env=env, capture_output=True)
        shutil.rmtree(home, ignore_errors=True)
    a, w = statistics.median(alone), statistics.median(watched)
    spread = (max(alone) - min(alone)) / a
    print(f"tasks/s alone {a:.0f} (rounds {', '.join(f'{r:.0f}' for r in alone)}; spread {spread:.0%})")
    print(f"tasks/s with top watching {w:.0f} (rounds {', '.join(f'{r:.0f}' for r in watched)})")
    print(f"ratio watched/alone {w / a:.2f}")


if __name__ == "__main__":
    main()
