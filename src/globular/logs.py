"""The library's logging: every module logs through ``logging.getLogger(__name__)``, under
the ``globular`` logger; nothing is printed.  While an operation runs on a cluster, its
records (debug and up) also go to ``~/.globular/logs/<cluster>.log`` (0600), so a failed
start can be read afterwards.  Secrets are never logged: commands are logged as their
argv, which never holds one (keys and passwords travel in 0600 files or on stdin).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from globular.paths import private_dir

LOGGER = logging.getLogger("globular")
FORMAT = "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"


def log_file(home: Path, cluster: str) -> Path:
    return home / "logs" / f"{cluster}.log"


@contextmanager
def cluster_log(home: Path, cluster: str) -> Iterator[Path]:
    """Copy the ``globular`` logger's records to the cluster's log file while the block runs."""
    path = log_file(home, cluster)
    private_dir(path.parent)
    stream = open(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "a", encoding="utf-8")  # noqa: SIM115
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.setLevel(logging.DEBUG)
    level, propagate = LOGGER.level, LOGGER.propagate
    forward = _Forward(LOGGER.getEffectiveLevel())
    if LOGGER.getEffectiveLevel() > logging.DEBUG:
        # the file gets everything; the handlers above ours get what they got before
        LOGGER.setLevel(logging.DEBUG)
        if propagate:
            LOGGER.propagate = False
            LOGGER.addHandler(forward)
    LOGGER.addHandler(handler)
    try:
        yield path
    finally:
        LOGGER.removeHandler(handler)
        LOGGER.removeHandler(forward)
        LOGGER.setLevel(level)
        LOGGER.propagate = propagate
        handler.close()


class _Forward(logging.Handler):
    """Propagation with a threshold: passes records at ``level`` and up to the root's handlers."""

    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger().handle(record)
