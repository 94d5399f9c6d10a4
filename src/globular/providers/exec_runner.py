"""A runner for nodes entered by a command run here: ``ip netns exec NS``, ``kubectl exec POD --``,
``docker exec -i CONTAINER``.

A provider whose nodes are reached that way says only how a command is entered
(:meth:`ExecRunner.entry`); everything else follows from it, through the node programs:

- commands: ``entry + argv``, run here, their output captured;
- questions: one long-lived helper per node (``python -c NODE_SOURCE serve`` over the entered
  command's pipes, :class:`~globular.providers.helper.HelperRunner`);
- files: written by the helper (``write``), put and got in chunks (the base runner's);
- ports: :meth:`ExecRunner.forward_port` listens on 127.0.0.1 here and relays each connection
  through a ``python -c NODE_SOURCE pipe`` entered on the node, which connects there (as
  ``kubectl port-forward`` does): nothing of the node's network need be reachable from here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from abc import abstractmethod

from globular.errors import CommandError, GlobularError
from globular.providers.helper import PipedHelperRunner, ended, kill_child
from globular.providers.here import run_for_node
from globular.providers.runner import NODE_SOURCE, CommandResult, display
from globular.state import NodeRecord

log = logging.getLogger(__name__)

RELAY_BLOCK = 1 << 16  # bytes a forwarded connection's relay reads at a time


class ExecRunner(PipedHelperRunner):
    """Does work on a node entered by a command run here (see the module's doc)."""

    direct = False  # the node's addresses are reached through it, not from here

    def __init__(self, node: NodeRecord):
        super().__init__(node)
        self._servers: list[asyncio.Server] = []
        self._relays: set[asyncio.Task[None]] = set()  # one a forwarded connection
        self._pipes: set[asyncio.subprocess.Process] = set()  # their processes

    @abstractmethod
    def entry(self) -> list[str]:
        """The words, run here, before a command that runs it on the node with its stdin, stdout
        and stderr connected here (``["ip", "netns", "exec", NS]``)."""

    def entered(self, argv: list[str]) -> list[str]:
        """``argv`` run on the node, marked like every process globular starts there."""
        mark = [f"GLOBULAR_MARK={self.mark}"] if self.mark else []
        return [*self.entry(), "env", *mark, *argv]

    def _cannot_enter(self, command: str, exc: OSError) -> CommandError:
        return CommandError(self.node.name, command, 127, f"cannot run {self.entry()[0]} here: {exc.strerror or exc}")

    async def run(
        self, argv: list[str], *, input: bytes | None = None, timeout: float | None = 60.0, check: bool = True
    ) -> CommandResult:
        shown = display(argv)
        log.debug("%s: %s", self.node.name, shown)
        return await run_for_node(self.node.name, self.entered(argv), shown, input=input, timeout=timeout, check=check,
                                  cannot=lambda exc: self._cannot_enter(shown, exc))  # fmt: skip

    def helper_argv(self) -> list[str]:
        return self.entered([self.node.python, "-c", NODE_SOURCE, "serve"])

    def cannot_start(self, exc: OSError) -> CommandError:
        return self._cannot_enter("globular.node serve", exc)

    # -- ports --------------------------------------------------------------------------

    async def forward_port(self, host: str, port: int, local_port: int = 0) -> tuple[str, int]:
        """A port on 127.0.0.1 here; each connection to it is relayed to ``host:port`` as the
        node sees it by a ``pipe`` entered on the node, until either end closes."""

        async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            self._relays.add(task)
            try:
                await self._relay(host, port, reader, writer)
            finally:
                self._relays.discard(task)

        server = await asyncio.start_server(accepted, "127.0.0.1", local_port)
        self._servers.append(server)
        bound: int = server.sockets[0].getsockname()[1]
        log.debug("%s: 127.0.0.1:%d forwards to %s:%d there", self.node.name, bound, host, port)
        return "127.0.0.1", bound

    async def _relay(self, host: str, port: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = json.dumps({"host": host, "port": port})
        try:
            process = await asyncio.create_subprocess_exec(
                *self.entered([self.node.python, "-c", NODE_SOURCE, "pipe", request]),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            log.debug("%s: cannot forward to %s:%d: %s", self.node.name, host, port, exc)
            writer.close()
            return
        assert process.stdin and process.stdout and process.stderr
        self._pipes.add(process)

        async def inward() -> None:  # here -> the node
            assert process.stdin
            with contextlib.suppress(OSError):
                while block := await reader.read(RELAY_BLOCK):
                    process.stdin.write(block)
                    await process.stdin.drain()
            with contextlib.suppress(OSError):
                process.stdin.close()

        async def outward() -> None:  # the node -> here
            assert process.stdout
            with contextlib.suppress(OSError):
                while block := await process.stdout.read(RELAY_BLOCK):
                    writer.write(block)
                    await writer.drain()
            with contextlib.suppress(OSError):
                writer.close()

        sending = asyncio.ensure_future(inward())
        try:
            await outward()  # the node's end closed (or refused): this one closes too
        finally:
            sending.cancel()
            with contextlib.suppress(OSError):
                writer.close()
            _end_input(process)
            await ended(process)  # its output ended: it is ending
            self._pipes.discard(process)
            log.debug("%s: a relay to %s:%d ended (%s)", self.node.name, host, port, process.returncode)

    async def port_refuses(self, host: str, port: int) -> str | None:
        try:
            reply = await self.nodeproc("connect", {"host": host, "port": port, "timeout": 5}, timeout=30)
        except GlobularError:
            return None
        return None if reply.get("ok") else str(reply.get("error") or "refused")

    async def close(self) -> None:
        servers, self._servers = self._servers, []
        for server in servers:
            server.close()
        # each relay ends with its process (a relay is not cancelled: asyncio would print that)
        for process in list(self._pipes):
            kill_child(process)
        relays, self._relays = list(self._relays), set()
        if relays:
            await asyncio.wait(relays, timeout=10)
        await self.close_helper()


def _end_input(process: asyncio.subprocess.Process) -> None:
    if process.stdin is not None and not process.stdin.is_closing():
        process.stdin.close()
