"""One long-lived ``globular.node`` per node, over the connection the runner holds (an SSH
channel; for Slurm nodes, the pipes of an ``srun`` step).

Every question an operation asks a node (facts, spawn, alive, stop, ...) used to be a new SSH
command: a login shell (whose rc files may run a lot: ``pyenv init``, conda's hooks) and a new
Python, per question, per node.  The helper is started once (``python -c <node programs> serve``) and
answers JSON lines on its stdin, each request in a thread of its own, until the connection
closes.  It runs the node's Python, so that its answers (``facts``) are about that Python; when
the node's Python changes (its environment was built), a new helper replaces the old one.

:class:`HelperRunner` is the base for a provider's runner that keeps one: it starts the helper
on first use and again when the node's Python changed or the helper ended; a provider says
only how a helper starts on its nodes (:meth:`HelperRunner.start_helper`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import logging
import os
import posixpath
import signal
from abc import abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from globular.errors import CommandError, CommandTimeout, ConnectionLost, GlobularError
from globular.node import ANY_PYTHON
from globular.providers.base import Runner
from globular.state import NodeRecord

if TYPE_CHECKING:
    import asyncssh

log = logging.getLogger(__name__)


class NodeHelper:
    """The helper process on one node, and the requests waiting for its answers."""

    def __init__(
        self,
        node: str,
        python: str,
        *,
        send: Callable[[str], None],
        lines: AsyncIterator[str],
        stderr: Callable[[], Awaitable[str]],
        close: Callable[[], None],
        broken: tuple[type[BaseException], ...] = (OSError,),
    ):
        self.node = node
        self.python = python
        self._send, self._lines, self._stderr, self._close = send, lines, stderr, close
        self._broken = broken  # what the transport raises when its connection breaks
        self.ids = itertools.count()
        self.waiting: dict[int, asyncio.Future[Any]] = {}
        self.reader = asyncio.ensure_future(self._read())

    @classmethod
    async def start(cls, conn: asyncssh.SSHClientConnection, node: str, python: str, command: str) -> NodeHelper:
        """The helper on an SSH channel of ``conn``, running ``command``."""
        import asyncssh  # here, not above: the Slurm and local providers never load it

        process = await conn.create_process(command, encoding="utf-8")

        def close() -> None:
            try:
                process.stdin.write_eof()
            except (asyncssh.Error, OSError):
                pass
            process.close()

        return cls(
            node, python, send=process.stdin.write, lines=aiter(process.stdout), stderr=process.stderr.read,
            close=close, broken=(asyncssh.Error, OSError),
        )  # fmt: skip

    @classmethod
    def over_pipes(cls, process: asyncio.subprocess.Process, node: str, python: str) -> NodeHelper:
        """The helper at the other end of a local process's pipes (``srun ... relay``)."""
        assert process.stdin and process.stdout and process.stderr

        async def lines() -> AsyncIterator[str]:
            assert process.stdout
            async for line in process.stdout:
                yield line.decode()

        async def stderr() -> str:
            assert process.stderr
            return (await process.stderr.read()).decode(errors="replace")

        def close() -> None:
            assert process.stdin
            if not process.stdin.is_closing():
                process.stdin.close()  # end of requests: the relay, and the step, end

        return cls(
            node,
            python,
            send=lambda text: process.stdin.write(text.encode()),  # type: ignore[union-attr]
            lines=lines(),
            stderr=stderr,
            close=close,
        )

    async def _read(self) -> None:
        why = "its helper ended"
        broken: tuple[type[BaseException], ...] = (*self._broken, ValueError)  # ValueError: not JSON
        slow: tuple[type[BaseException], ...] = (*self._broken, TimeoutError)
        try:
            async for line in self._lines:
                message = json.loads(line)
                future = self.waiting.pop(message["id"], None)
                if future is None or future.done():
                    continue
                if "reply" in message:
                    future.set_result(message["reply"])
                else:
                    future.set_exception(
                        CommandError(self.node, "globular.node", 3 if "refused" in message else 1,
                                     message.get("refused") or message.get("error") or "")
                    )  # fmt: skip
        except broken as exc:
            why = f"its helper's connection broke: {exc}"
        finally:
            stderr = ""
            try:
                stderr = (await asyncio.wait_for(self._stderr(), 1)).strip()[-2000:]
            except slow:
                pass
            for future in self.waiting.values():
                if not future.done():
                    future.set_exception(ConnectionLost(self.node, "globular.node serve", f"{why} {stderr}".strip()))
            self.waiting.clear()

    @property
    def alive(self) -> bool:
        return not self.reader.done()

    async def ask(self, verb: str, request: dict[str, Any], timeout: float) -> Any:
        number = next(self.ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.waiting[number] = future
        log.debug("%s: nodeproc %s (helper)", self.node, verb)
        self._send(json.dumps({"id": number, "verb": verb, "request": request}) + "\n")
        try:
            async with asyncio.timeout(timeout):  # not wait_for: on 3.11 it can swallow a cancel (SIGTERM)
                return await future
        except TimeoutError:
            raise CommandTimeout(self.node, f"globular.node {verb}", timeout) from None
        finally:
            self.waiting.pop(number, None)

    def close(self) -> None:
        self._close()
        self.reader.cancel()


class HelperRunner(Runner):
    """A runner whose node questions (:meth:`nodeproc`) go to the node's one long-lived helper."""

    def __init__(self, node: NodeRecord):
        super().__init__(node)
        self._node_helper: NodeHelper | None = None
        self._helper_lock = asyncio.Lock()

    @abstractmethod
    async def start_helper(self) -> NodeHelper:
        """A new helper on the node, running ``self.node.python -c NODE_SOURCE serve`` (or a relay
        to it); a failure to start raises :class:`~globular.errors.NodeError` naming the node."""

    @property
    def helper_running(self) -> bool:
        return self._node_helper is not None and self._node_helper.alive

    async def helper(self, any_python: bool = False) -> NodeHelper:
        """The node's helper: the running one, else a new one (the first, or the node's Python
        changed, as it does once the node's environment is made: unless ``any_python``, for a
        question any Python answers alike, which the running one answers)."""
        async with self._helper_lock:
            helper = self._node_helper
            if helper is None or not helper.alive or (helper.python != self.node.python and not any_python):
                await self.close_helper()
                helper = self._node_helper = await self.start_helper()
            return helper

    async def nodeproc(self, verb: str, request: dict[str, Any], timeout: float = 60.0) -> Any:
        helper = await self.helper(any_python=verb in ANY_PYTHON)
        return await helper.ask(verb, request, timeout)

    async def write_file(self, path: str, data: bytes, mode: int = 0o600) -> None:
        """Written by the node's helper (``write``: atomically, with ``mode``); a relative
        ``path`` is in the node's folder."""
        if not posixpath.isabs(path):
            path = posixpath.join(self.node.workdir, path)
        await self.nodeproc("write", {"path": path, "data": base64.b64encode(data).decode(), "mode": mode})

    async def close_helper(self) -> None:
        helper, self._node_helper = self._node_helper, None
        if helper is not None:
            helper.close()


class PipedHelperRunner(HelperRunner):
    """A runner whose node helper is a process run here, talking over its pipes: an ``srun``
    step of the node's job, a command that enters the node (``ip netns exec``)."""

    def __init__(self, node: NodeRecord):
        super().__init__(node)
        self._helper_process: asyncio.subprocess.Process | None = None

    @abstractmethod
    def helper_argv(self) -> list[str]:
        """The command, run here, whose stdin and stdout are the helper's (or a relay to it)."""

    @abstractmethod
    def cannot_start(self, exc: OSError) -> GlobularError:
        """What to raise when :meth:`helper_argv` cannot be run here (naming the node)."""

    async def start_helper(self) -> NodeHelper:
        from globular.providers.runner import CHUNK

        try:
            self._helper_process = await asyncio.create_subprocess_exec(
                *self.helper_argv(),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                limit=4 * CHUNK,  # an answer is one line: a file's chunk (base64) is longer than asyncio's 64 KiB
            )
        except OSError as exc:
            raise self.cannot_start(exc) from None
        return NodeHelper.over_pipes(self._helper_process, self.node.name, self.node.python)

    async def close_helper(self) -> None:
        await super().close_helper()  # its input closed: it ends by itself
        process, self._helper_process = self._helper_process, None
        if process is not None:
            await ended(process)


def kill_child(process: asyncio.subprocess.Process) -> None:
    """SIGKILL ``process``, a child of this one, unless it ended.  By its pid, not
    ``process.kill()``: that polls first, reaping a child that has just ended under the feet of
    asyncio's watcher, which then prints "Unknown child process"."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGKILL)


async def ended(process: asyncio.subprocess.Process, grace: float = 5.0) -> None:
    """Wait for ``process`` to end (its input closed: it ends by itself), SIGKILL after ``grace`` s."""
    try:
        async with asyncio.timeout(grace):
            await process.wait()
    except TimeoutError:
        kill_child(process)
        await process.wait()
