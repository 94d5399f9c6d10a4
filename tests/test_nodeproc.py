"""Process control on a node: start detached, check and stop by pid (never by name)."""

from __future__ import annotations

import asyncio
import sys

import pytest

from conftest import gone
from globular.errors import CommandError, NodeError
from globular.providers.base import ProcessSpec
from globular.providers.local import LocalRunner
from globular.state import NodeRecord


@pytest.fixture
def runner(tmp_path):
    node = NodeRecord(name="node001", address="127.0.0.1", workdir=str(tmp_path), cores=1, python=sys.executable)
    return LocalRunner(node)


def sleeper(tmp_path, role="sleeper", child=False):
    code = "import time; time.sleep(300)"
    if child:  # a process that starts a child of its own: the group must go too
        code = "import subprocess, time; subprocess.Popen(['sleep', '300']); time.sleep(300)"
    return ProcessSpec(argv=[sys.executable, "-c", code], log=str(tmp_path / "logs" / f"{role}.log"), role=role)


def test_spawn_alive_stop(runner, tmp_path):
    async def scenario():
        procs = await runner.spawn([sleeper(tmp_path), sleeper(tmp_path, child=True)])
        assert await runner.alive(procs) == [True, True]
        result = await runner.stop(procs, timeout=5)
        assert (result.stopped, result.killed) == (2, 0)
        assert await runner.alive(procs) == [False, False]
        return procs

    procs = asyncio.run(scenario())
    assert all(gone(p.pid) for p in procs)
    assert (tmp_path / "logs" / "sleeper.log").exists()


def test_reused_pid_is_never_signalled(runner, tmp_path):
    async def scenario():
        [proc] = await runner.spawn([sleeper(tmp_path)])
        impostor = proc.model_copy(update={"start": proc.start + 1})  # same pid, other start time
        assert await runner.alive([impostor]) == [False]
        result = await runner.stop([impostor], timeout=1)
        assert result.stopped == 0
        assert await runner.alive([proc]) == [True]
        await runner.stop([proc])
        return proc

    proc = asyncio.run(scenario())
    assert gone(proc.pid)


def test_process_ignoring_sigterm_is_killed(runner, tmp_path):
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(300)"
    spec = ProcessSpec(argv=[sys.executable, "-c", code], log=str(tmp_path / "stubborn.log"), role="stubborn")

    async def scenario():
        [proc] = await runner.spawn([spec])
        for _ in range(100):
            if "ready" in (tmp_path / "stubborn.log").read_text():
                break
            await asyncio.sleep(0.05)
        result = await runner.stop([proc], timeout=0.5)
        assert (result.stopped, result.killed) == (1, 1)
        return proc

    assert gone(asyncio.run(scenario()).pid)


def test_wait_files_reports_the_log_of_a_dead_process(runner, tmp_path):
    spec = ProcessSpec(
        argv=[sys.executable, "-c", "import sys; print('cannot bind port', file=sys.stderr); sys.exit(1)"],
        log=str(tmp_path / "ctl.log"),
        role="ipcontroller",
    )

    async def scenario():
        procs = await runner.spawn([spec])
        await runner.wait_files([str(tmp_path / "never.json")], watch=procs, timeout=20)

    with pytest.raises(NodeError) as info:
        asyncio.run(scenario())
    assert "node001: ipcontroller" in str(info.value) and "cannot bind port" in str(info.value)


def test_command_failure_names_node_and_stderr(runner):
    with pytest.raises(CommandError) as info:
        asyncio.run(runner.run(["sh", "-c", "echo broken pipe dream >&2; exit 4"]))
    assert info.value.returncode == 4
    assert str(info.value).startswith("node001: `sh -c") and "broken pipe dream" in str(info.value)
    with pytest.raises(CommandError, match="exited with 127"):
        asyncio.run(runner.run(["/no/such/program"]))
    with pytest.raises(CommandError, match="timed out"):
        asyncio.run(runner.run(["sleep", "5"], timeout=0.2))


def test_spawn_of_missing_program_fails_cleanly(runner, tmp_path):
    spec = ProcessSpec(argv=["/no/such/binary"], log=str(tmp_path / "x.log"), role="x")
    with pytest.raises(CommandError, match="cannot start '/no/such/binary'"):
        asyncio.run(runner.spawn([sleeper(tmp_path), spec]))


def test_a_working_folder_that_is_a_file_is_named(runner, tmp_path):
    """engine_workdir = /etc/passwd: said as a folder that is not one, not as 'File exists'."""
    afile = tmp_path / "passwd"
    afile.write_text("x")
    spec = ProcessSpec(argv=[sys.executable, "-c", "pass"], log=str(tmp_path / "x.log"), role="x", cwd=str(afile))
    with pytest.raises((CommandError, NodeError), match=f"in {afile}: it is not a folder"):
        asyncio.run(runner.spawn([spec]))


def test_pipe_relays_one_connection_both_ways_and_ends_with_its_input():
    """``python -c SOURCE pipe`` (a forwarded port's node end): bytes in on stdin reach the
    server, its answer comes out on stdout; stdin's end closes the connection, and the process
    ends.  A port where nothing listens is refused (exit 3, the reason on stderr)."""
    import json
    import socket
    import subprocess
    import threading

    from globular.node import SOURCE

    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    seen: list[bytes] = []

    def answer() -> None:
        conn, _ = server.accept()
        with conn:
            while data := conn.recv(100):
                seen.append(data)
                conn.sendall(data.upper())
            seen.append(b"<closed>")

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    request = json.dumps({"host": "127.0.0.1", "port": port})
    piped = subprocess.run([sys.executable, "-c", SOURCE, "pipe", request], input=b"hello", capture_output=True,
                           timeout=30)  # fmt: skip
    thread.join(10)
    server.close()
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout == b"HELLO" and b"".join(seen) == b"hello<closed>"

    refused = subprocess.run([sys.executable, "-c", SOURCE, "pipe", request], input=b"x", capture_output=True,
                             timeout=30)  # fmt: skip
    assert refused.returncode == 3 and refused.stderr.decode().strip() == "Connection refused"
    assert refused.stdout == b""
