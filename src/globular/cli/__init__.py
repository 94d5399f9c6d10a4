"""The ``globular`` command line: click commands over the library, and the one renderer.

``main`` (the console script) and ``cli`` (the click group) are in :mod:`globular.cli.main`;
``config`` in :mod:`globular.cli.config`; the root group and the options every command takes in
:mod:`globular.cli.group`; ``sshmaster``/``sshnode`` in :mod:`globular.cli.ssh`;
the renderer in :mod:`globular.cli.render`.  Installed plugins add commands through the
``globular.commands`` entry points (ipcluster's ``shell``, ``notebook`` and
``restart-controller`` come that way too); each gets ``--output`` if it lacks it.

Nothing outside this package imports it, except the modules those entry points name: they
are command-line code, and render through :func:`globular.cli.render.output`.
"""

import gc

# A command is short and imports much (pydantic's models, click, rich): the collector's default
# threshold (700 new objects) has it sweep again and again while it starts, ~10 ms of every
# command.  Collections are rarer, not off: a long command (top, start) still collects.
gc.set_threshold(20_000, 10, 10)

from globular.cli.main import cli, entry, main  # noqa: E402 - after the collector's threshold

__all__ = ["cli", "entry", "main"]
