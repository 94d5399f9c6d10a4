"""Process control on a node: start detached processes, check and stop them by pid.

(Longer than most modules: it is sent whole to the nodes and run there with their own
Python, standard library only, so it cannot lean on its siblings.)

This file runs on the node itself as ``python -c <this source> VERB``, reading a
JSON request on stdin and printing a JSON reply, so it uses the standard library
only (a node needs nothing but Python and ipyparallel).  Environment and other
data travel on stdin, never on a command line.

A process is ``{"pid": int, "start": int}``: the kernel's start time (field 22
of /proc/PID/stat) makes sure a reused pid is never signalled.  Every process is
started in a session of its own, so it and its children form one process group,
which is what gets signalled.  A zombie counts as stopped.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

Request = dict[str, Any]  # a verb's JSON request
Proc = dict[str, Any]  # {"pid": int, "start": int, ...}


class Refused(Exception):
    """A request that cannot be carried out: exit status 3, the message on stderr."""


def _stat(pid: int | str) -> tuple[str, int, int, int] | None:
    """``(state, ppid, pgrp, start)`` of process ``pid`` from /proc/PID/stat (None: gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(")") + 2 :].split()
    return fields[0], int(fields[1]), int(fields[2]), int(fields[19])


def _processes() -> dict[int, tuple[str, int, int, int]]:
    """Every live process: ``{pid: (state, ppid, pgrp, start)}``."""
    found: dict[int, tuple[str, int, int, int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(entry)
            if st is not None and st[0] not in ("Z", "X"):
                found[int(entry)] = st
    return found


def _alive(proc: Proc) -> bool:
    st = _stat(proc["pid"])
    return st is not None and st[0] not in ("Z", "X") and st[3] == proc["start"]


def _signal(proc: Proc, sig: int) -> bool:
    if not _alive(proc):
        return False
    try:
        os.killpg(proc["pid"], sig)
    except OSError:
        try:
            os.kill(proc["pid"], sig)
        except OSError:
            return False
    return True


def cpus() -> int:
    """The cores this process may use: a Slurm job's allocation (SLURM_CPUS_ON_NODE), else the
    CPUs it is allowed to run on, else the machine's."""
    allocated = os.environ.get("SLURM_CPUS_ON_NODE", "")
    if allocated.isdigit() and int(allocated) > 0:
        return int(allocated)
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


_spawned: list[int] = []  # pids this process started (a keeper reaps them as they end)


def spawn(req: Request) -> Any:
    started = []
    try:
        for spec in req["procs"]:
            env = dict(os.environ)
            env.update(spec.get("env") or {})
            if req.get("mark"):
                env[MARK] = req["mark"]
            log_dir = os.path.dirname(spec["log"])
            if log_dir:
                os.makedirs(log_dir, mode=0o700, exist_ok=True)
            cwd = os.path.expanduser(spec["cwd"]) if spec.get("cwd") else None
            if cwd:
                if os.path.exists(cwd) and not os.path.isdir(cwd):
                    raise Refused(f"cannot start {spec['argv'][0]} in {cwd}: it is not a folder")
                os.makedirs(cwd, mode=0o700, exist_ok=True)
            with open(spec["log"], "ab") as log:
                child = subprocess.Popen(
                    spec["argv"],
                    cwd=cwd,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    umask=0o077,
                )
            st = _stat(child.pid)
            started.append({"pid": child.pid, "start": st[3] if st else 0})
            _spawned.append(child.pid)
    except OSError as exc:
        for proc in started:
            _signal(proc, signal.SIGKILL)
        raise Refused(f"cannot start {spec['argv'][0]!r}: {exc.strerror or exc}") from None
    return started


def alive(req: Request) -> Any:
    return [_alive(p) for p in req["procs"]]


def _wait_gone(procs: list[Proc], timeout: float) -> list[Proc]:
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in procs if _alive(p)]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.02)


def _descendants(procs: list[Proc]) -> list[Proc]:
    """Processes that stopping ``procs`` must stop too: children (and theirs) that left the
    process group, such as ipyparallel's engine nanny (a session of its own), and what is
    left of the group of a leader that died (SIGKILL)."""
    parents: dict[int, list[Proc]] = {}
    for pid, (_, ppid, pgrp, start) in _processes().items():
        parents.setdefault(ppid, []).append({"pid": pid, "start": start, "pgrp": pgrp})
    found, todo = [], [p["pid"] for p in procs if _alive(p)]
    groups = {p["pid"] for p in procs}
    # a dead leader's group lives on in its children (the controller's forked schedulers);
    # the kernel never hands out a pid still in use as a group id, so these are ours
    dead = groups - set(todo)
    for members in parents.values():
        for child in members:
            if child["pgrp"] in dead and child["pid"] not in dead:
                found.append({"pid": child["pid"], "start": child["start"]})
                todo.append(child["pid"])
    while todo:
        for child in parents.get(todo.pop(), []):
            todo.append(child["pid"])
            if child["pgrp"] not in groups:
                groups.add(child["pgrp"])
                found.append({"pid": child["pid"], "start": child["start"]})
    return found


def stop(req: Request) -> Any:
    """SIGTERM (with strays of their process groups), wait up to ``timeout`` s, then SIGKILL what is left."""
    strays = _descendants(req["procs"])
    running = [p for p in req["procs"] if _signal(p, signal.SIGTERM)]
    for proc in strays:
        _signal(proc, signal.SIGTERM)
    left = _wait_gone(running + strays, float(req.get("timeout", 10)))
    for proc in left:
        _signal(proc, signal.SIGKILL)
    remaining = _wait_gone(left, 5.0)
    requested = {(p["pid"], p["start"]) for p in req["procs"]}
    return {
        "stopped": len(running),
        "killed": sum(1 for p in left if (p["pid"], p["start"]) in requested),
        "remaining": [p for p in remaining if (p["pid"], p["start"]) in requested],
    }


MARK = "GLOBULAR_MARK"  # in the environment of every process globular starts: "<home id>/<cluster>/<node>"


def _marked(prefix: str) -> list[Proc]:
    """Live processes (of this user) whose GLOBULAR_MARK is ``prefix`` or starts with ``prefix/``."""
    found = []
    wanted = f"{MARK}={prefix}".encode()
    mine = {os.getpid(), os.getppid()}
    for pid, (_, _, _, start) in _processes().items():
        if pid in mine:
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                entries = f.read().split(b"\0")
        except OSError:  # gone, or another user's
            continue
        if any(e == wanted or e.startswith(wanted + b"/") for e in entries):
            found.append({"pid": pid, "start": start})
    return found


def sweep(req: Request) -> Any:
    """Stop every process marked ``req["mark"]`` (see MARK) that is not in ``req["known"]``:
    those a start that was killed between spawning and recording left behind.  Like ``stop``:
    SIGTERM to each process group, SIGKILL after ``timeout`` s."""
    known = {(p["pid"], p["start"]) for p in req.get("known", [])}
    strays = [p for p in _marked(req["mark"]) if (p["pid"], p["start"]) not in known]
    if not strays:
        return {"stopped": 0, "killed": 0, "remaining": []}
    return stop({"procs": strays, "timeout": req.get("timeout", 5)})


def wait_files(req: Request) -> Any:
    """Wait until every file exists and parses as JSON, or a watched process dies."""
    deadline = time.monotonic() + float(req.get("timeout", 30))
    while True:
        found = {}
        for path in req["files"]:
            try:
                with open(path) as f:
                    found[path] = json.load(f)
            except (OSError, ValueError):
                break
        if len(found) == len(req["files"]):
            return {"files": found}
        dead = [p for p in req.get("watch", []) if not _alive(p)]
        if dead:
            return {"dead": dead}
        if time.monotonic() >= deadline:
            return {"timeout": True}
        time.sleep(0.02)


def write(req: Request) -> Any:
    """Write ``req["data"]`` (base64) to ``req["path"]`` atomically, with mode ``req["mode"]``;
    the folder is made (0700) if need be.  (It travels on stdin: it may be a secret.)"""
    import base64
    import tempfile

    path = os.path.expanduser(req["path"])
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, mode=0o700, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(base64.b64decode(req["data"]))
        os.chmod(tmp, int(req.get("mode", 0o600)))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return True


def logs(req: Request) -> Any:
    """The last ``req["bytes"]`` of every file in the folder ``req["dir"]``: name -> text."""
    folder = os.path.expanduser(req["dir"])
    found = {}
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return {}
    for name in names:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            found[name] = tail({"path": path, "bytes": req.get("bytes", 65536)})
    return found


def tail(req: Request) -> Any:
    try:
        with open(req["path"], "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - int(req.get("bytes", 4000))))
            return f.read().decode("utf-8", "replace")
    except OSError as exc:
        return f"(no log: {exc.strerror})"


def prepare(req: Request) -> Any:
    """Make the node's folder (0700) and say what the node has: cores, Python, modules."""
    import importlib.util

    path = os.path.realpath(os.path.expanduser(req["dir"]))
    os.makedirs(path, mode=0o700, exist_ok=True)
    missing = [m for m in req.get("modules", []) if importlib.util.find_spec(m) is None]
    return {
        "workdir": path,
        "cpus": cpus(),
        "python": sys.executable,
        "version": ".".join(map(str, sys.version_info[:3])),
        "missing": missing,
    }


def remove_dir(req: Request) -> Any:
    """Remove a node's folder, and its parent when that is left empty; only inside ``root``.
    With ``mark``, first stop the processes marked with it (see ``sweep``): one round trip."""
    import shutil

    if req.get("mark"):
        swept = sweep({"mark": req["mark"]})
        if swept["remaining"]:
            raise Refused(f"processes {[p['pid'] for p in swept['remaining']]} survived SIGKILL")

    root = os.path.realpath(os.path.expanduser(req["root"]))
    path = os.path.realpath(req["path"])
    if os.path.commonpath([root, path]) != root or path == root:
        raise Refused(f"refusing to remove {path}: not inside {root}")
    shutil.rmtree(path, ignore_errors=True)
    parent = os.path.dirname(path)
    if parent != root:
        try:
            os.rmdir(parent)
        except OSError:
            pass
    return not os.path.exists(path)


def addresses(req: Request) -> Any:
    """IPv4 address of each network interface: ``{"eth0": "10.0.0.5", ...}``."""
    import fcntl
    import socket
    import struct

    found = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
            except OSError:
                continue
            found[name] = socket.inet_ntoa(packed[20:24])
    return found


def _quiet_ports() -> list[int]:
    """Ports in a random order that no process is handed without asking for them by number:
    below the kernel's ephemeral range (bind to port 0) and below pyzmq's random ports (49152
    and up: engines, their nannies and kernels bind those while the controller starts)."""
    import random

    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            ephemeral = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral = 32768
    ports = list(range(20000, max(20000 + 1000, min(ephemeral, 49152))))
    random.shuffle(ports)
    return ports


def free_ports(req: Request) -> Any:
    """``req["count"]`` distinct TCP ports free on ``req["ip"]``, taken from ``req["ports"]``
    when given (else from :func:`_quiet_ports`, then any); fewer when not enough are free."""
    import socket

    held: list[Any] = []
    try:
        for port in req.get("ports") or [*_quiet_ports()[: req["count"] * 4], *[0] * req["count"]]:
            if len(held) == req["count"]:
                break
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.bind((req["ip"], port))
            except OSError:
                s.close()
                continue
            held.append(s)
        return [s.getsockname()[1] for s in held]
    finally:
        for s in held:
            s.close()


def children(req: Request) -> Any:
    """How many live children each process of ``req["procs"]`` has (a supervisor's engines)."""
    counts = {p["pid"]: 0 for p in req["procs"] if _alive(p)}
    for _, ppid, _, _ in _processes().values():
        if ppid in counts:
            counts[ppid] += 1
    return [counts.get(p["pid"], 0) for p in req["procs"]]


def facts(req: Request) -> Any:
    """What preflight needs to know of this node: Python, cores, load, uptime, and the
    version of each module of ``req["modules"]`` (read from its metadata: no import)."""
    import importlib
    import importlib.metadata
    import importlib.util

    found: dict[str, dict[str, str | None]] = {}
    for name in req.get("modules", []):
        try:
            if name in req.get("load", []):
                importlib.import_module(name)
            elif importlib.util.find_spec(name) is None:
                found[name] = {"error": "not installed"}
                continue
            found[name] = {"version": importlib.metadata.version(name)}
        except importlib.metadata.PackageNotFoundError:
            found[name] = {"version": None}
        except Exception as exc:  # noqa: BLE001 - a broken install raises anything; its message is the answer
            found[name] = {"error": f"{type(exc).__name__}: {exc}"}
    curve: bool | str | None = None
    if req.get("curve"):  # can this Python's pyzmq encrypt (CurveZMQ)?
        try:
            import zmq

            curve = bool(zmq.has("curve"))
        except Exception as exc:  # noqa: BLE001 - a broken pyzmq: its message is the answer
            curve = f"{type(exc).__name__}: {exc}"
    try:
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError):
        uptime = None
    return {
        "alive": [_alive(p) for p in req.get("procs", [])],
        "children": children({"procs": req.get("parents", [])}) if req.get("parents") else [],
        "python": ".".join(map(str, sys.version_info[:3])),
        "executable": sys.executable,
        "cpus": cpus(),
        "load": list(os.getloadavg()),
        "uptime": uptime,
        "modules": found,
        "curve": curve,
        # folders something will be made in that exist as something else (a file)
        "not_folders": [
            p
            for p in req.get("folders", [])
            if os.path.lexists(os.path.expanduser(p)) and not os.path.isdir(os.path.expanduser(p))
        ],
    }


def listen(req: Request) -> Any:
    """Accept TCP connections on ``ip:port`` for ``seconds`` (preflight's stand-in controller)."""
    import socket

    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((req["ip"], int(req["port"])))
    server.listen(64)
    server.settimeout(0.2)
    deadline = time.monotonic() + float(req.get("seconds", 30))
    while time.monotonic() < deadline:
        try:
            conn, _ = server.accept()
            conn.close()
        except OSError:
            continue
    return True


def connect(req: Request) -> Any:
    """Can this node open a TCP connection to ``host:port``?"""
    import socket

    try:
        with socket.create_connection((req["host"], int(req["port"])), timeout=float(req.get("timeout", 5))):
            return {"ok": True}
    except OSError as exc:
        return {"ok": False, "error": exc.strerror or str(exc)}


def read_json(req: Request) -> Any:
    """The JSON file ``req["path"]``, or None."""
    try:
        with open(req["path"]) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


VERBS = {
    "read_json": read_json,
    "facts": facts,
    "listen": listen,
    "connect": connect,
    "children": children,
    "prepare": prepare,
    "free_ports": free_ports,
    "remove_dir": remove_dir,
    "addresses": addresses,
    "spawn": spawn,
    "alive": alive,
    "stop": stop,
    "sweep": sweep,
    "wait_files": wait_files,
    "tail": tail,
    "logs": logs,
    "write": write,
}


# verbs whose answer does not depend on the Python that runs them (the local provider
# runs these in globular's own process instead of starting an interpreter for each)
ANY_PYTHON = frozenset(
    {
        "free_ports",
        "remove_dir",
        "addresses",
        "spawn",
        "alive",
        "stop",
        "sweep",
        "wait_files",
        "tail",
        "logs",
        "children",
        "read_json",
        "connect",
    }
)


def serve(stdin: Any, stdout: Any) -> None:
    """Answer requests until stdin closes: one JSON line in, ``{"id", "verb", "request"}``; one JSON
    line out, ``{"id", "reply"}`` or ``{"id", "refused"}`` or ``{"id", "error"}``.  Each request
    runs in a thread of its own (``wait_files`` waits, ``stop`` waits), so that one long-lived
    process per node answers an operation's many questions: no login shell and no new Python
    each time."""
    import threading

    lock = threading.Lock()

    def answer(line: str) -> None:
        message = json.loads(line)
        try:
            out = {"id": message["id"], "reply": VERBS[message["verb"]](message["request"])}
        except Refused as exc:
            out = {"id": message["id"], "refused": str(exc)}
        except Exception as exc:  # noqa: BLE001 - sent back as the request's failure; the helper goes on
            out = {"id": message["id"], "error": f"{type(exc).__name__}: {exc}"}
        text = json.dumps(out) + "\n"
        with lock:
            stdout.write(text)
            stdout.flush()

    threads = []
    for line in stdin:
        if line.strip():
            thread = threading.Thread(target=answer, args=(line,), daemon=True)
            thread.start()
            threads.append(thread)
            threads = [t for t in threads if t.is_alive()]
    for thread in threads:  # stdin closed: finish what was asked (a stop in progress)
        thread.join(60)


def keeper_socket() -> str:
    """Where the keeper of this Slurm job listens: a 0700 folder of this user and job in /tmp
    (the same path for the job's batch step and for the ``srun`` steps on its node)."""
    return f"/tmp/globular-{os.getuid()}-{os.environ['SLURM_JOB_ID']}/keeper.sock"


def keeper() -> None:
    """A Slurm job's batch step: answer ``serve`` requests from every connection to
    :func:`keeper_socket` (``relay`` brings them from globular), so that what it spawns lives in the
    batch step, as long as the job (an ``srun`` step's processes end with the step).  On SIGTERM
    (``scancel``, the walltime) it stops what it spawned and exits."""
    import socket
    import threading

    path = keeper_socket()
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    os.chmod(os.path.dirname(path), 0o700)
    if os.path.exists(path):
        os.unlink(path)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(16)

    def end(*_: Any) -> None:
        stats = {pid: _stat(pid) for pid in _spawned}
        stop({"procs": [{"pid": pid, "start": st[3]} for pid, st in stats.items() if st], "timeout": 5})
        for name in (path, os.path.dirname(path)):
            try:
                os.unlink(name) if name == path else os.rmdir(name)
            except OSError:
                pass
        os._exit(0)

    def reap() -> None:
        while True:
            for pid in list(_spawned):
                try:
                    if os.waitpid(pid, os.WNOHANG)[0]:
                        _spawned.remove(pid)
                except ChildProcessError:
                    _spawned.remove(pid)
            time.sleep(1)

    def answer(conn: Any) -> None:
        with conn, conn.makefile("r") as rfile, conn.makefile("w") as wfile:
            serve(rfile, wfile)

    signal.signal(signal.SIGTERM, end)
    threading.Thread(target=reap, daemon=True).start()
    print(f"globular keeper of job {os.environ['SLURM_JOB_ID']} on {socket.gethostname()}: {path}", flush=True)
    while True:
        conn, _ = server.accept()
        threading.Thread(target=answer, args=(conn,), daemon=True).start()


def relay(timeout: float = 60.0) -> None:
    """An ``srun`` step on a job's node, in the node's Python: the helper (``serve``), except that
    what it spawns, the job's keeper spawns (so that it outlives the step).  Waits up to
    ``timeout`` s for the keeper to listen."""
    import socket

    path, deadline = keeper_socket(), time.monotonic() + timeout

    def ask_keeper(req: Request) -> Any:
        while True:
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                conn.connect(path)
                break
            except OSError as exc:
                conn.close()
                if time.monotonic() > deadline:
                    raise Refused(
                        f"no keeper of job {os.environ.get('SLURM_JOB_ID')} listens at {path}: {exc}"
                    ) from None
                time.sleep(0.1)
        with conn, conn.makefile("r") as rfile, conn.makefile("w") as wfile:
            wfile.write(json.dumps({"id": 0, "verb": "spawn", "request": req}) + "\n")
            wfile.flush()
            answer = json.loads(rfile.readline() or "{}")
        if "reply" not in answer:
            raise Refused(answer.get("refused") or answer.get("error") or "the keeper did not answer")
        return answer["reply"]

    VERBS["spawn"] = ask_keeper
    serve(sys.stdin, sys.stdout)


def main(argv: list[str]) -> None:
    if argv[1] == "serve":
        serve(sys.stdin, sys.stdout)
        return
    if argv[1] in ("keeper", "relay"):
        keeper() if argv[1] == "keeper" else relay()
        return
    # a detached process (spawn) has no stdin: its request, never a secret, is the argument
    request = json.loads(argv[2]) if len(argv) > 2 else json.loads(sys.stdin.read() or "{}")
    try:
        json.dump(VERBS[argv[1]](request), sys.stdout)
    except Refused as exc:
        sys.stderr.write(f"{exc}\n")
        sys.exit(3)


if __name__ == "__main__":
    main(sys.argv)
