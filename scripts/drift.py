"""Which installed versions differ from uv.lock's, for this interpreter: ``./scripts/test --latest``
says so before it runs the suite against them.  The lock is universal (every Python and platform):
its markers say which of its lines apply here.

    python scripts/drift.py LOCKED.txt    (``uv export --format requirements-txt --no-hashes``)
"""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, version

from packaging.requirements import Requirement


def main(locked: str) -> None:
    print("--latest: the versions that differ from uv.lock (this run's, then the lock's):")
    differ = 0
    with open(locked) as lines:
        for line in lines:
            if not line.strip() or line.startswith(("#", "-")):
                continue
            wanted = Requirement(line.strip())
            if wanted.marker is not None and not wanted.marker.evaluate():
                continue  # a line for another Python or platform
            try:
                installed = version(wanted.name)
            except PackageNotFoundError:
                installed = "not installed"
            if installed not in wanted.specifier:
                differ += 1
                print(f"  {wanted.name} {installed} (lock {str(wanted.specifier).removeprefix('==')})")
    print(f"  {differ} in all" if differ else "  none")


if __name__ == "__main__":
    main(sys.argv[1])
