"""How the node programs are run: one verb (``python -c SOURCE VERB``, its request on stdin),
the long-lived helper (``serve``: JSON lines, one thread a request), and a Slurm job's
``keeper`` (its batch step, which spawns what must outlive ``srun`` steps) and ``relay``, and
``pipe`` (one forwarded connection, :func:`globular.node.probe.pipe`).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Any

from globular.node.probe import pipe
from globular.node.proc import _spawned, _stat, stop
from globular.node.protocol import VERBS, Refused, Request


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
    # the request is the argument where stdin carries something else (a detached process has
    # none; env_build reads wheels there, pipe a connection's bytes): never a secret.  Else it
    # comes on stdin.
    request = json.loads(argv[2]) if len(argv) > 2 else json.loads(sys.stdin.read() or "{}")
    try:
        if argv[1] == "pipe":  # a stream, not an answer
            pipe(request)
            return
        json.dump(VERBS[argv[1]](request), sys.stdout)
    except Refused as exc:
        sys.stderr.write(f"{exc}\n")
        sys.exit(3)
    except OSError as exc:  # a full disk, a folder it may not write: one line that says so
        import errno

        code = errno.errorcode.get(exc.errno or 0, "")
        where = f": {exc.filename}" if exc.filename else ""
        sys.stderr.write(f"{exc.strerror or exc}{f' ({code})' if code else ''}{where}\n")
        sys.exit(3)
