"""globular: an interactive IPython-parallel cluster on a set of machines, in one command."""

from globular.errors import GlobularError

__version__ = "0.1.0"

__all__ = ["GlobularError", "__version__"]
