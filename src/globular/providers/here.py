"""Commands run on this machine (``sbatch``, pip, a local node's command), stopped cleanly
when their caller is cancelled or their time is up."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Mapping

from globular.errors import CommandError, CommandTimeout
from globular.providers.base import CommandResult


async def run_here(
    argv: list[str],
    *,
    input: bytes | None = None,
    timeout: float | None = None,
    cwd: str | None = None,
    env: Mapping[str, str] | None = None,
) -> CommandResult:
    """Run ``argv`` on this machine, its output captured (``env``: added to this process's).
    A process that cannot start raises OSError; one that outlives ``timeout`` (TimeoutError),
    or whose caller is cancelled, is stopped first: SIGTERM, so that it cleans up after itself
    (a node environment's builder stops its installer and removes its half-made folder), then
    SIGKILL after STOP_GRACE seconds.  Not ``wait_for``: on Python 3.11 it can swallow a
    cancel (the CLI's SIGTERM)."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=cwd,
        env={**os.environ, **env} if env else None,
    )
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate(input)
    except (TimeoutError, asyncio.CancelledError):
        await _stop_child(proc)
        raise
    return CommandResult(proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace"))


async def run_for_node(
    node: str,
    argv: list[str],
    shown: str,
    *,
    cannot: Callable[[OSError], CommandError],
    input: bytes | None = None,
    timeout: float | None = None,
    check: bool = True,
    cwd: str | None = None,
    env: Mapping[str, str] | None = None,
) -> CommandResult:
    """A runner's command on ``node``, run here as ``argv`` (the command itself, or entered into
    the node), shown as ``shown`` in errors: its time up is :class:`CommandTimeout`, a program
    that cannot start is ``cannot(exc)``, and with ``check`` a non-zero exit is :class:`CommandError`."""
    try:
        result = await run_here(argv, input=input, timeout=timeout, cwd=cwd, env=env)
    except TimeoutError:  # before OSError, which it is a kind of
        raise CommandTimeout(node, shown, timeout) from None
    except OSError as exc:
        raise cannot(exc) from None
    if check and result.returncode != 0:
        raise CommandError(node, shown, result.returncode, result.stderr, result.stdout)
    return result


STOP_GRACE = 3.0  # s a command stopped by a cancel or a timeout has to clean up before SIGKILL


async def _stop_child(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        try:
            proc.terminate()
        except ProcessLookupError:
            pass
    try:
        async with asyncio.timeout(STOP_GRACE):
            await proc.wait()
    except (TimeoutError, asyncio.CancelledError):
        pass
    if proc.returncode is None:
        try:
            proc.kill()
        except ProcessLookupError:
            pass
        await proc.wait()
