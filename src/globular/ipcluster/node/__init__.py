"""IPCluster's programs that travel to the nodes (standard library only, like :mod:`globular.node`;
``forkstart`` imports ipyparallel, which the node's Python has by then):

- ``supervisor``: runs a node's engines (or the controller) and restarts one that dies
  (``restart_dead_engines``), as ``python -c SOURCE REQUEST-FILE``;
- ``forkstart``: a node's engines forked from one warm interpreter (``engine_fork``), written
  to ``<node>/run/forkstart.py`` and run as a file, so that ``ps`` names it;
- ``idlewatch``: idle shutdown's watcher, as ``python -c SOURCE REQUEST-FILE``;
- ``ipcontroller``: ipyparallel's controller, as ``python -c SOURCE ARGS``, which ends without
  the interpreter's finalization once the controller has stopped (about 40 ms of CPU less).

Their text is what travels: :func:`source` is the one way it is read.
"""

from __future__ import annotations

from pathlib import Path

PROGRAMS = ("supervisor", "forkstart", "idlewatch", "ipcontroller")


def source(program: str) -> str:
    """The text of node program ``program`` (one of PROGRAMS), as it runs on the node."""
    if program not in PROGRAMS:
        raise ValueError(f"no node program {program!r}")
    return (Path(__file__).parent / f"{program}.py").read_text()
