"""Process limits a cluster of many nodes needs from the process that runs globular."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def raise_open_file_limit() -> None:
    """Every node holds a connection or two: let this process open as many files as it may
    (the soft limit up to the hard one), so that a big cluster, and its cleanup, never run out."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 1 << 20, hard))
        except (ValueError, OSError) as exc:
            log.debug("open file limit stays %s: %s", soft, exc)
