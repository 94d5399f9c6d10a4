"""Where globular keeps its files on the machine that runs it."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def globular_home() -> Path:
    """``~/.globular``, or ``$GLOBULAR_HOME`` when set (tests use it)."""
    env = os.environ.get("GLOBULAR_HOME")
    return Path(env).expanduser() if env else Path.home() / ".globular"


def default_config_path() -> Path:
    """The config file used when no ``-c FILE`` is given."""
    env = os.environ.get("GLOBULAR_CONFIG")
    return Path(env).expanduser() if env else globular_home() / "config"


def umask() -> int:
    """This process's umask, read without changing it (Linux's /proc; else set and set back)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def landed_mode(mode: int) -> int:
    """The mode a file fetched from a node gets here: the node's permission bits, never setuid,
    setgid or sticky (a node is not trusted to plant a setuid program at home), less the umask."""
    return mode & 0o777 & ~umask()


def private_dir(path: Path) -> Path:
    """Create ``path`` readable by the owner only, and every missing folder above it too
    (0700 whatever the umask; folders that were there already are left as they are)."""
    missing = []
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing.append(folder)
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=0o700)
        except FileExistsError:
            pass  # made meanwhile by another process
        os.chmod(folder, 0o700)
    if not missing:
        os.chmod(path, 0o700)
    return path


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically with mode 0600."""
    private_dir(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
