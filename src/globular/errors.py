"""Errors the library raises.

Every failure a user can act on is a :class:`GlobularError`; its ``str()`` is the
one line the CLI prints, and ``exit_code`` is what the CLI exits with.
"""

from __future__ import annotations

import errno
from collections.abc import Mapping


class GlobularError(Exception):
    """A failure reported to the user in one line."""

    exit_code = 1


class BadInput(GlobularError):
    """An argument that cannot be right (a cluster name with a slash, say)."""

    exit_code = 2


class ConfigError(GlobularError):
    """Bad configuration: names the file, the section and the key."""

    exit_code = 2

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        section: str | None = None,
        key: str | None = None,
        line: int | None = None,
    ):
        self.message = message
        self.file = file
        self.section = section
        self.key = key
        self.line = line
        super().__init__(str(self))

    def __str__(self) -> str:
        where = []
        if self.file:
            where.append(f"{self.file}:{self.line}" if self.line else self.file)
        if self.section:
            where.append(f"[{self.section}]")
        if self.key:
            where.append(self.key)
        prefix = " ".join(where)
        return f"{prefix}: {self.message}" if prefix else self.message


class FileFailed(GlobularError):
    """A file could not be read or written (here, or on a node): the message names it, and why
    in the system's words with the error's name (``No space left on device (ENOSPC)``)."""

    def __init__(self, action: str, path: object, exc: OSError, where: str | None = None):
        code = errno.errorcode.get(exc.errno or 0, "")
        why = f"{exc.strerror or exc}" + (f" ({code})" if code else "")
        super().__init__(f"{where + ': ' if where else ''}cannot {action} {path}: {why}")


class ClusterNotFound(GlobularError):
    def __init__(self, name: str):
        self.name = name
        super().__init__(f"no cluster named {name!r} is running (see `globular listclusters`)")


class ClusterExists(GlobularError):
    def __init__(self, name: str, status: str):
        self.name = name
        how = f"--force {name}" if status == "unreadable" else name
        super().__init__(
            f"a cluster named {name!r} already exists ({status}); use another name or `globular terminate {how}` first"
        )


class ClusterBusy(GlobularError):
    def __init__(self, name: str):
        super().__init__(f"cluster {name!r} is busy with another globular command; try again when it ends")


class BalancerRunning(GlobularError):
    def __init__(self, name: str, pid: int, since: str):
        super().__init__(
            f"cluster {name!r} has a balancer already (pid {pid}, since {since}): stop it first "
            f"(Ctrl-C in its terminal, or kill {pid})"
        )


class StateError(GlobularError):
    """A state record that cannot be read."""


def _tail(text: str, lines: int = 12) -> str:
    parts = text.strip().splitlines()
    return "\n".join(parts[-lines:])


class CommandError(GlobularError):
    """A command on a node failed (like asyncssh's ProcessError)."""

    def _status(self) -> str:
        return "timed out" if self.returncode is None else f"exited with {self.returncode}"

    def __init__(self, node: str, command: str, returncode: int | None, stderr: str, stdout: str = ""):
        self.node = node
        self.command = command
        self.returncode = returncode
        self.stderr = stderr
        self.stdout = stdout
        status = self._status()
        detail = _tail(stderr or stdout)
        msg = f"{node}: `{command}` {status}"
        super().__init__(f"{msg}: {detail}" if detail else msg)


class CommandTimeout(CommandError):
    """A command on a node gave no answer in time (like asyncssh's TimeoutError)."""

    def __init__(self, node: str, command: str, timeout: float | None):
        self.timeout = timeout
        super().__init__(node, command, None, f"no answer within {timeout:g}s" if timeout else "no answer")


class ConnectionLost(CommandError):
    """The connection to a node broke while a command ran: its outcome is unknown."""

    def __init__(self, node: str, command: str, reason: str):
        super().__init__(node, command, None, reason)

    def _status(self) -> str:
        return "lost its connection"


class HostUnreachable(GlobularError):
    """A host does not answer (refused, no route, no answer in time); the message names it."""


class NodeError(GlobularError):
    """Something failed on one node, with the evidence (log tail, stderr)."""

    def __init__(self, node: str, message: str, detail: str = ""):
        self.node = node
        self.detail = detail
        tail = _tail(detail)
        super().__init__(f"{node}: {message}" + (f"\n{tail}" if tail else ""))


class NodeFailures(GlobularError):
    """Work fanned out over nodes failed on some of them; like fabric's ``GroupException``,
    it keeps what the others returned (``succeeded``) beside the failures."""

    def __init__(self, failures: Mapping[str, BaseException], succeeded: Mapping[str, object] | None = None):
        self.failures = dict(failures)
        self.succeeded = dict(succeeded or {})
        lines = []
        for node, exc in self.failures.items():
            text = str(exc) or type(exc).__name__
            lines.append(text if text.startswith(f"{node}:") else f"{node}: {text}")
        super().__init__("; ".join(lines) if len(lines) == 1 else "\n".join(lines))


class PluginFailed(GlobularError):
    """A plugin hook failed; wraps the cause."""

    def __init__(self, plugin: str, hook: str, cause: BaseException):
        self.plugin = plugin
        self.hook = hook
        self.cause = cause
        if isinstance(cause, GlobularError):
            self.exit_code = cause.exit_code  # bad input stays exit code 2
        super().__init__(f"plugin {plugin!r} failed in {hook}: {cause}")


class StartFailed(GlobularError):
    """``start`` failed; everything it made was cleaned up (or the cleanup error is given)."""

    def __init__(
        self, name: str, cause: BaseException, cleanup_error: BaseException | None = None, logs: str | None = None
    ):
        self.cause = cause
        self.cleanup_error = cleanup_error
        self.logs = logs
        if cleanup_error is None and isinstance(cause, GlobularError):
            self.exit_code = cause.exit_code  # bad input stays exit code 2
        msg = f"cluster {name!r} did not start: {cause}"
        if cleanup_error is None:
            msg += "\nEverything it started was stopped and removed."
        else:
            msg += f"\nCleanup also failed: {cleanup_error}\nRun `globular terminate {name}` to retry it."
        if logs:
            msg += f"\nThe nodes' logs are kept in {logs}"
        super().__init__(msg)
