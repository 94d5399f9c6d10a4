"""The programs that travel to the nodes: standard library only, run by the node's own Python.

globular runs them on a node as ``python -c SOURCE VERB`` (a JSON request on stdin, a JSON
answer on stdout; exit status 3 and one line on stderr when the request is refused), or as
the long-lived helper ``python -c SOURCE serve`` that answers JSON lines, one per request
(:mod:`globular.providers.helper`), or as a Slurm job's ``keeper``/``relay``.  SOURCE is
:data:`SOURCE`: the modules of this package joined into one text by :func:`source`, the one
loader, so that a node needs nothing but Python.

- :mod:`~globular.node.protocol`: the request, the refusal, the verb registry;
- :mod:`~globular.node.proc`: processes, started detached, checked and stopped by pid;
- :mod:`~globular.node.gpus`: its GPUs, as ``nvidia-smi`` lists them;
- :mod:`~globular.node.facts`: what the node is (cores, GPUs, Python, modules, addresses);
- :mod:`~globular.node.files`: files and node folders;
- :mod:`~globular.node.transfer`: ``put``/``get``'s side: listings, checksums, files in chunks;
- :mod:`~globular.node.probe`: ports and connections as the node sees them;
- :mod:`~globular.node.env`: node environments (a venv built from shipped wheels, pruned);
- :mod:`~globular.node.serve`: one verb, the helper, Slurm's keeper and relay.

Imported here (the local provider runs verbs in its own process), the same modules are
ordinary modules; a test checks that they import nothing but the standard library and each
other, and that the joined source runs.
"""

from __future__ import annotations

import re
from pathlib import Path

MODULES = (
    "protocol",
    "proc",
    "gpus",
    "facts",
    "files",
    "transfer",
    "probe",
    "env",
    "serve",
)  # in the order they are joined
_OWN_IMPORT = re.compile(r"^from globular\.node(?:\.\w+)? import (?:\([^)]*\)|[^\n]*)\n", re.M)
_FUTURE = "from __future__ import annotations\n"


def source(modules: tuple[str, ...] = MODULES, main: str = "main(sys.argv)") -> str:
    """``modules`` of this package as one program: each one's text, its imports of the others
    dropped (their names are all at the top level of the one program), run with ``main``."""
    folder = Path(__file__).parent
    parts = [_OWN_IMPORT.sub("", (folder / f"{name}.py").read_text()).replace(_FUTURE, "") for name in modules]
    return _FUTURE + "\n".join(parts) + f'\n\nif __name__ == "__main__":\n    {main}\n'


SOURCE = source()

from globular.node import env, facts, files, gpus, probe, proc, serve, transfer  # noqa: E402 - every verb registered
from globular.node.protocol import ANY_PYTHON, VERBS, Refused  # noqa: E402

__all__ = [
    "ANY_PYTHON",
    "MODULES",
    "SOURCE",
    "VERBS",
    "Refused",
    "env",
    "facts",
    "files",
    "gpus",
    "probe",
    "proc",
    "serve",
    "source",
    "transfer",
]
