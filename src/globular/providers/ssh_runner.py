"""A node's runner over SSH (the ssh and ec2 providers'): commands on its helper, files over
SFTP, ports forwarded, all on one asyncssh connection opened on first use."""

from __future__ import annotations

import asyncio
import logging
import os
import posixpath
import secrets
import shlex
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncssh

from globular.errors import CommandError, CommandTimeout, ConnectionLost, FileFailed, NodeError
from globular.providers.base import NODE_SOURCE, CommandResult, display
from globular.providers.helper import HelperRunner, NodeHelper
from globular.results import size_text
from globular.state import NodeRecord

log = logging.getLogger(__name__)

SFTP_BLOCK = 128 * 1024  # bytes per SFTP request (asyncssh's default, 16 KiB, costs a round of Python work per 16 KiB)


def _by_increments(progress: Callable[[int], None]) -> Callable[[bytes, bytes, int, int], None]:
    """asyncssh's progress handler (bytes copied so far) as ``progress(bytes since the last call)``."""
    done = 0

    def handler(_src: bytes, _dst: bytes, copied: int, _total: int) -> None:
        nonlocal done
        progress(copied - done)
        done = copied

    return handler


class SSHRunner(HelperRunner):
    """Runs commands on a node over one SSH connection (opened on first use)."""

    direct = False  # the node's ports are forwarded through the connection

    def __init__(self, node: NodeRecord, connect: Callable[[], Awaitable[asyncssh.SSHClientConnection]]):
        super().__init__(node)
        self._connect = connect
        self._conn: asyncssh.SSHClientConnection | None = None
        self._lock = asyncio.Lock()
        self._forwards: dict[tuple[str, int], asyncssh.SSHListener] = {}
        self._sftp: asyncssh.SFTPClient | None = None

    async def connection(self) -> asyncssh.SSHClientConnection:
        async with self._lock:
            if self._conn is None:
                self._conn = await self._connect()
            return self._conn

    async def start_helper(self) -> NodeHelper:
        conn = await self.connection()
        command = self._command([self.node.python, "-c", NODE_SOURCE, "serve"])
        log.debug("%s (%s): starting its helper", self.node.name, self.node.login)
        try:
            return await NodeHelper.start(conn, self.node.name, self.node.python, command)
        except (asyncssh.Error, OSError) as exc:
            raise ConnectionLost(self.node.name, "globular.node serve", str(exc)) from None

    def _command(self, argv: list[str]) -> str:
        return f"cd {shlex.quote(self.node.workdir)} 2>/dev/null; exec {shlex.join(argv)}"

    async def run(
        self, argv: list[str], *, input: bytes | None = None, timeout: float | None = 60.0, check: bool = True
    ) -> CommandResult:
        return await self._run(self._command(argv), display(argv), input=input, timeout=timeout, check=check)

    async def _run(
        self, command: str, shown: str, *, input: bytes | None, timeout: float | None, check: bool
    ) -> CommandResult:
        conn = await self.connection()
        log.debug("%s (%s): %s", self.node.name, self.node.login, shown)
        try:
            done = await conn.run(command, input=input, encoding=None, timeout=timeout, check=False)
        except asyncssh.TimeoutError:
            raise CommandTimeout(self.node.name, shown, timeout) from None
        except (asyncssh.Error, OSError) as exc:
            raise ConnectionLost(self.node.name, shown, f"ssh connection to {self.node.login} lost: {exc}") from None
        returncode = done.exit_status if done.exit_status is not None else 255
        out, err = done.stdout or b"", done.stderr or b""
        assert isinstance(out, bytes) and isinstance(err, bytes)  # encoding=None
        result = CommandResult(returncode, out.decode(errors="replace"), err.decode(errors="replace"))
        if check and returncode != 0:
            raise CommandError(self.node.name, shown, returncode, result.stderr, result.stdout)
        return result

    async def write_file(self, path: str, data: bytes, mode: int = 0o600) -> None:
        if self.helper_running:  # one round trip, no new shell
            await super().write_file(path, data, mode)
            return
        if not posixpath.isabs(path):
            path = posixpath.join(self.node.workdir, path)
        tmp = f"{path}.tmp-{secrets.token_hex(4)}"
        q = shlex.quote
        command = (
            f"umask 077 && mkdir -p {q(posixpath.dirname(path))} && cat > {q(tmp)} "
            f"&& chmod {mode:o} {q(tmp)} && mv -f {q(tmp)} {q(path)}"
        )
        await self._run(command, f"write {path}", input=data, timeout=60, check=True)

    async def _sftp_client(self) -> asyncssh.SFTPClient:
        conn = await self.connection()
        async with self._lock:
            if self._sftp is None:
                self._sftp = await conn.start_sftp_client()
            return self._sftp

    async def upload(self, local: Path, remote: str, progress: Callable[[int], None]) -> None:
        """Over SFTP on the node's own SSH connection: to a temporary name, renamed once whole.
        Names travel as bytes: one that is not UTF-8 arrives as it is."""
        sftp = await self._sftp_client()
        target = os.fsencode(remote)
        part = posixpath.join(
            posixpath.dirname(target), b"." + posixpath.basename(target) + f".part-{secrets.token_hex(4)}".encode()
        )
        try:
            await sftp.makedirs(posixpath.dirname(target), exist_ok=True)
            await sftp.put(
                os.fsencode(local),
                part,
                preserve=True,
                block_size=SFTP_BLOCK,
                progress_handler=_by_increments(progress),
            )
            await sftp.posix_rename(part, target)
        except BaseException as exc:
            await asyncio.shield(self._remove_quietly(sftp, part))
            if isinstance(exc, asyncssh.SFTPError):  # the node's sftp-server refused (it says only "Failure")
                why = (
                    await self._no_room(sftp, target, local.stat().st_size)
                    or f"the node's SFTP server said {exc.reason!r}"
                )
                raise NodeError(self.node.name, f"cannot write {remote}: {why}") from None
            if isinstance(exc, OSError):  # this side: the file to send
                raise FileFailed("read", local, exc) from None
            if isinstance(exc, asyncssh.Error):
                raise ConnectionLost(self.node.name, f"sftp put {remote}", str(exc)) from None
            raise

    async def download(self, remote: str, local: Path, size: int, mtime: int, progress: Callable[[int], None]) -> None:
        sftp = await self._sftp_client()
        local.parent.mkdir(parents=True, exist_ok=True)
        part = local.with_name(f".{local.name}.part-{secrets.token_hex(4)}")
        try:  # no preserve: the node's mode bits are not taken (see transfer.get), its mtime is
            await sftp.get(
                os.fsencode(remote), os.fsencode(part), block_size=SFTP_BLOCK, progress_handler=_by_increments(progress)
            )
            os.utime(part, (mtime, mtime))
            os.replace(part, local)
        except asyncssh.SFTPError as exc:  # the node's sftp-server refused
            raise NodeError(self.node.name, f"cannot read {remote}: {exc.reason}") from None
        except OSError as exc:  # this side: a full disk, a folder not writable
            raise FileFailed("write", local, exc) from None
        except asyncssh.Error as exc:
            raise ConnectionLost(self.node.name, f"sftp get {remote}", str(exc)) from None
        finally:
            part.unlink(missing_ok=True)

    @staticmethod
    async def _no_room(sftp: asyncssh.SFTPClient, target: bytes, size: int) -> str:
        """``no room: 12 KB free in /x for 200 MB (a full disk)`` when that is why a write
        failed (OpenSSH's sftp-server says only "Failure"), else empty."""
        folder = posixpath.dirname(target)
        try:
            found = await sftp.statvfs(folder)
        except (asyncssh.Error, OSError):
            return ""
        free = found.bavail * found.frsize
        if free >= size:
            return ""
        return f"no room: {size_text(free)} free in {os.fsdecode(folder)} for {size_text(size)} (a full disk)"

    @staticmethod
    async def _remove_quietly(sftp: asyncssh.SFTPClient, path: bytes) -> None:
        try:
            await sftp.remove(path)
        except (asyncssh.Error, OSError):
            pass

    async def forward_port(self, host: str, port: int, local_port: int = 0) -> tuple[str, int]:
        if (host, port) not in self._forwards:
            conn = await self.connection()
            self._forwards[(host, port)] = await conn.forward_local_port("127.0.0.1", local_port, host, port)
        return "127.0.0.1", self._forwards[(host, port)].get_port()

    async def port_refuses(self, host: str, port: int) -> str | None:
        return await refused_through(await self.connection(), host, port)

    async def close(self) -> None:
        await self.close_helper()
        if self._sftp is not None:
            self._sftp.exit()
            self._sftp = None
        forwards, self._forwards = list(self._forwards.values()), {}
        for listener in forwards:
            listener.close()
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
            try:
                await asyncio.wait_for(conn.wait_closed(), 5)
            except (TimeoutError, OSError, asyncssh.Error):
                pass


async def refused_through(conn: asyncssh.SSHClientConnection, host: str, port: int) -> str | None:
    """Why the far end of ``conn`` refuses a connection to ``host:port`` (its reason), or None."""
    try:
        _, writer = await conn.open_connection(host, port)
    except asyncssh.ChannelOpenError as exc:
        return exc.reason or "refused"
    writer.close()
    return None


def ssh_reason(exc: BaseException) -> str:
    """Why a connection failed, in the words of asyncssh's error or the system's."""
    return str(getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc)
