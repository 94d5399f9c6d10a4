"""Running the library's coroutines from synchronous code: one way, used by the CLI,
``globular.Cluster`` (also inside Jupyter's running loop) and the client's SSH tunnel."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)


class LoopThread:
    """An event loop running in a thread of its own, until :meth:`close`."""

    def __init__(self, name: str = "globular-loop") -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop; wait for its result (or exception) here."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        if self.loop.is_closed():
            return
        try:  # the threads of its default executor (asyncssh reads keys there) go with it
            self.call(self.loop.shutdown_default_executor(), 5)
        except (TimeoutError, RuntimeError):
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        if not self.loop.is_running():
            self.loop.close()


async def in_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` in a daemon thread of its own, awaited.  Unlike ``asyncio.to_thread`` (the
    loop's default executor, which ``asyncio.run`` waits for as it ends), a call that hangs (a
    controller that stopped answering, a blocked socket) never holds up Ctrl-C, the loop's end
    or the process's exit: whoever awaits it can give up on it."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.done():  # given up on (cancelled) meanwhile
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def work() -> None:
        try:
            result, error = fn(*args, **kwargs), None
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task, whatever it is
            result, error = None, exc
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the loop has ended: nobody waits any more
            pass

    threading.Thread(target=work, name=f"globular-{getattr(fn, '__name__', 'call')}", daemon=True).start()
    return await future


def _quiet_about_cancelled(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """A future left with a CancelledError nobody retrieved is the interruption the user asked
    for (Ctrl-C, SIGTERM), not news: logged, not printed.  Anything else goes to asyncio."""
    if isinstance(context.get("exception"), asyncio.CancelledError):
        log.debug("after cancellation: %s", context.get("message"))
        return
    loop.default_exception_handler(context)


def run_sync(coro: Coroutine[Any, Any, T], *, sigterm_cancels: bool = False) -> T:
    """Run ``coro`` to the end, whether or not this thread already runs an event loop
    (in Jupyter it runs on a thread of its own).  With ``sigterm_cancels`` (the CLI),
    SIGTERM cancels it like Ctrl-C does, so the library's cleanup runs; both end in
    :class:`KeyboardInterrupt`."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        runner = LoopThread("globular-operation")
        try:
            return runner.call(coro)
        finally:
            runner.close()

    async def main() -> T:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(_quiet_about_cancelled)
        if not sigterm_cancels:
            return await coro
        task = asyncio.current_task()
        assert task is not None
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
        try:
            return await coro
        finally:
            loop.remove_signal_handler(signal.SIGTERM)

    try:
        return asyncio.run(main())
    except asyncio.CancelledError:
        raise KeyboardInterrupt from None
