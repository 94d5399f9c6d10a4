"""``globular top`` (issue 30): a live view in a real terminal (tmux), and one frame for scripts."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import read_record, terminal_picture, wait_until

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux (apt-get install tmux)"),
]

CONFIG = """
[global]
default_template = t
[cluster t]
provider = local
cores_per_node = 2
plugins = ipcluster
[plugin ipcluster]
setup_class = ipcluster
"""

MAP = """
import globular, sys, time
rc = globular.connect(sys.argv[1])
view = rc.load_balanced_view()
pause = float(sys.argv[2])
view.map_async(lambda x, pause=pause: __import__("time").sleep(pause) or x, range(int(sys.argv[3]))).get(timeout=300)
rc.close()
"""

BLOCKED = """
import globular, json, os, sys, time
rc = globular.connect(sys.argv[1])
def wait(flag):
    import os, time
    while not os.path.exists(flag):
        time.sleep(0.05)
result = rc.load_balanced_view().map_async(wait, [sys.argv[2]] * 8)
while sum(s["queue"] + s["tasks"] for k, s in rc.queue_status().items() if k != "unassigned") < 5:
    time.sleep(0.05)  # every engine holds one task; three wait unassigned
time.sleep(0.5)
print(json.dumps(rc.queue_status()), flush=True)
sys.stdin.readline()  # the test reads `top` meanwhile, then says go on
open(sys.argv[2], "w").close()
result.get(timeout=60)
deadline = time.monotonic() + 30  # the hub counts a task done a moment after its result reached us
while sum(s["completed"] for k, s in rc.queue_status().items() if k != "unassigned") < 8 and time.monotonic() < deadline:
    time.sleep(0.05)
print(json.dumps(rc.queue_status()), flush=True)
rc.close()
"""


class Tmux:
    def __init__(self, name: str, command: str, env: dict):
        self.name = name
        env_words = " ".join(f"{k}={v}" for k, v in env.items())
        subprocess.run(["tmux", "new-session", "-d", "-s", name, "-x", "160", "-y", "30", f"env {env_words} {command}"],
                       check=True)  # fmt: skip

    def screen(self, ansi: bool = False) -> str:
        escapes = ["-e"] if ansi else []
        return subprocess.run(["tmux", "capture-pane", "-p", *escapes, "-t", self.name], capture_output=True,
                              text=True).stdout  # fmt: skip

    def alive(self) -> bool:
        return subprocess.run(["tmux", "has-session", "-t", self.name], capture_output=True).returncode == 0

    def kill(self) -> None:
        subprocess.run(["tmux", "kill-session", "-t", self.name], capture_output=True)


def node_line(screen: str, node: str) -> list[str]:
    return next(line.split() for line in screen.splitlines() if line.split()[:1] == [node])


def test_top_shows_busy_engines_tasks_per_second_then_idle_and_a_dead_engine(cli, home, write_config, tmp_path):
    config = str(write_config(CONFIG))
    started = cli("-c", config, "start", "-s", "3", "live")
    assert started.returncode == 0, started.output
    terminal_picture(started.stderr + started.stdout, "start.svg", "globular start -s 3 live", home=home)
    session = Tmux(f"top{os.getpid()}", f"{sys.executable} -m globular top live",
                   {"GLOBULAR_HOME": home, "PATH": os.environ["PATH"], "COLUMNS": "160", "LINES": "30"})  # fmt: skip
    try:
        mapping = subprocess.Popen([sys.executable, "-c", MAP, "live", "0.2", "200"])
        busy = wait_until(lambda: "running" in session.screen() and " 0 running" not in session.screen()
                          and "(0/s)" not in session.screen(), timeout=60)  # fmt: skip
        during = session.screen()
        terminal_picture(session.screen(ansi=True), "top.svg", "globular top live")
        terminal_picture(cli("status", "live").stdout, "status.svg", "globular status live", home=home)
        assert mapping.wait(timeout=120) == 0
        idle = wait_until(lambda: " 0 running" in session.screen() and node_line(session.screen(), "node001")[-1] == "0/2/0",
                          timeout=30)  # fmt: skip
        after = session.screen()
        victim = next(p for p in read_record(home, "live")["nodes"][2]["processes"] if p["role"] == "ipengine")
        os.kill(victim["pid"], signal.SIGKILL)
        killed_at = time.monotonic()
        dead = wait_until(lambda: node_line(session.screen(), "node002")[-1].endswith("/1"), timeout=10)
        noticed = time.monotonic() - killed_at
        death = session.screen()
        session_before_q = session.alive()
        subprocess.run(["tmux", "send-keys", "-t", session.name, "q"], check=True)
        quit_ok = wait_until(lambda: not session.alive(), timeout=10)
    finally:
        session.kill()
        stopped = cli("terminate", "-y", "live")
    assert busy, during
    assert "5/5 registered" in during and any(
        int(node_line(during, n)[-1].split("/")[0]) > 0 for n in ("master", "node001", "node002")
    ), during
    assert idle, after
    assert dead and noticed < 3.0, (noticed, death)  # within 2 refreshes (1 s each) of the kill
    assert f"died (pid {victim['pid']})" in death, death
    assert session_before_q and quit_ok  # q quits
    assert stopped.returncode == 0, stopped.output


def test_one_frame_as_json_has_queue_status_counts(cli, home, write_config, tmp_path):
    config = str(write_config(CONFIG))
    started = cli("-c", config, "start", "-s", "3", "frame")
    assert started.returncode == 0, started.output
    flag = tmp_path / "go"
    blocked = subprocess.Popen([sys.executable, "-c", BLOCKED, "frame", str(flag)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        theirs = json.loads(blocked.stdout.readline())
        frame = cli("top", "frame", "--once", "--output", "json")
        blocked.stdin.write("go\n")
        blocked.stdin.flush()
        done = json.loads(blocked.stdout.readline())
        assert blocked.wait(timeout=60) == 0
        later = cli("top", "frame", "--once", "--output", "json")
    finally:
        blocked.kill()
        stopped = cli("terminate", "-y", "frame")
    assert frame.returncode == 0, frame.output
    ours = json.loads(frame.stdout)["result"]
    engines = {k: v for k, v in theirs.items() if k != "unassigned"}
    assert ours["queue_status"] == {
        "unassigned": theirs["unassigned"],
        "queue": sum(s["queue"] for s in engines.values()),
        "tasks": sum(s["tasks"] for s in engines.values()),
        "completed": sum(s["completed"] for s in engines.values()),
    }
    assert ours["running"] == 5 and ours["waiting"] == 3 and ours["registered"] == ours["expected"] == 5
    assert sum(n["busy"] for n in ours["nodes"]) == 5
    after = json.loads(later.stdout)["result"]
    assert after["queue_status"]["completed"] == sum(s["completed"] for k, s in done.items() if k != "unassigned")
    assert after["running"] == 0 and after["waiting"] == 0
    assert stopped.returncode == 0, stopped.output


def test_top_never_hangs_on_a_controller_that_stopped_answering(cli, home, write_config):
    """The controller frozen (SIGSTOP): `top --once` ends within its deadline and says so; the
    live view says "controller not answering since ..." and quits on q, and on Ctrl-C, within a
    second, while a frame is being made."""
    config = str(write_config(CONFIG))
    started = cli("-c", config, "start", "-s", "1", "frozen")
    assert started.returncode == 0, started.output
    [controller] = [
        p["pid"] for p in read_record(home, "frozen")["nodes"][0]["processes"] if p["role"] == "ipcontroller"
    ]
    env = {"GLOBULAR_HOME": home, "PATH": os.environ["PATH"], "COLUMNS": "160", "LINES": "30"}
    sessions = []
    try:
        os.kill(controller, signal.SIGSTOP)
        began = time.monotonic()
        once = cli("top", "frozen", "--once", "--output", "json", timeout=60)
        once_took = time.monotonic() - began
        results = {}
        for key in ("q", "C-c"):
            session = Tmux(f"frozen{key[0]}{os.getpid()}", f"{sys.executable} -m globular top frozen", env)
            sessions.append(session)
            results[key] = wait_until(lambda s=session: "controller not answering since" in s.screen(), timeout=30)
            shown = session.screen()
            time.sleep(1.5)  # the next frame is being made now, waiting on the controller
            subprocess.run(["tmux", "send-keys", "-t", session.name, key], check=True)
            sent = time.monotonic()
            quit_in_time = wait_until(lambda s=session: not s.alive(), timeout=10)
            results[key] = (results[key], shown, quit_in_time, time.monotonic() - sent)
    finally:
        os.kill(controller, signal.SIGCONT)
        for session in sessions:
            session.kill()
        stopped = cli("terminate", "-y", "frozen")
    assert once.returncode == 0, once.output
    frame = json.loads(once.stdout)["result"]
    assert frame["controller_problem"].startswith("controller not answering since"), frame
    assert once_took < 20, once_took  # two frames, each waiting 3 s at most on the controller
    for key, (said, shown, quit_in_time, took) in results.items():
        assert said, shown
        assert quit_in_time and took < 1.5, (key, took)
    assert stopped.returncode == 0, stopped.output
