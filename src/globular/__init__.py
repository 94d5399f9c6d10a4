"""globular: an interactive IPython-parallel cluster on a set of machines, in one command.

``globular.Cluster`` and ``globular.connect`` are the Python API (see globular.api);
``globular.Client`` is ipyparallel's Client whose SSH tunnel carries the CURVE keys
(the ipcluster plugin's, found through the plugin registry: see globular.client.connect).
"""

import importlib
import sys
import warnings
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import TYPE_CHECKING, cast

from globular.errors import GlobularError

if TYPE_CHECKING:
    from importlib.abc import Loader

__version__ = "0.1.0"


def _quiet_libraries() -> None:
    """Silence, narrowly, the warnings that globular's own imports of libraries raise and that are
    not the user's business: asyncssh reads cryptography's deprecated DSA names when it is
    imported (cryptography 51 and newer warn, five times).  Only that category from asyncssh's
    own modules: a warning about the user's code, or asyncssh's others, still shows.  Called as
    asyncssh is first imported (by :class:`_Finder`): a command that never loads it never loads
    cryptography either."""
    try:
        from cryptography.utils import CryptographyDeprecationWarning
    except ImportError:  # cryptography comes with asyncssh: without it, there is nothing to silence
        return
    warnings.filterwarnings("ignore", category=CryptographyDeprecationWarning, module=r"asyncssh(\.|$)")


class _Finder:
    """A meta path finder, first on ``sys.meta_path``, for two things:

    - ``globular.plugins.ipcluster[.X]`` is ``globular.ipcluster[.X]``, the same module objects:
      the ipcluster plugin moved out of plugins/ (which holds the plugin API alone), and Lab
      cluster files, records and users' imports that name the old path keep working;
    - the first import of ``asyncssh`` quiets its warnings first (:func:`_quiet_libraries`), and
      leaves the import itself to the finders after it.

    A finder and a loader by their methods (importlib.abc's bases would cost every command 12 ms)."""

    OLD, NEW = "globular.plugins.ipcluster", "globular.ipcluster"

    def __init__(self) -> None:
        self.specs: dict[str, ModuleSpec | None] = {}  # a module's own spec, given back once aliased
        self.quieted = False

    def find_spec(
        self, fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname == "asyncssh" and not self.quieted:
            self.quieted = True
            _quiet_libraries()
            return None
        if fullname != self.OLD and not fullname.startswith(self.OLD + "."):
            return None
        return ModuleSpec(fullname, cast("Loader", self))

    def create_module(self, spec: ModuleSpec) -> ModuleType:
        module = importlib.import_module(self.NEW + spec.name[len(self.OLD) :])
        self.specs[spec.name] = module.__spec__  # the import system sets the alias's spec on it
        return module

    def exec_module(self, module: ModuleType) -> None:
        for alias, own in list(self.specs.items()):
            if own is not None and own.name == module.__name__:
                module.__spec__ = self.specs.pop(alias)


sys.meta_path.insert(0, _Finder())  # before the path finder, which would load a second copy
if "asyncssh" in sys.modules:  # imported before globular: its warnings were shown already, if any
    _quiet_libraries()

__all__ = ["Client", "Cluster", "GlobularError", "__version__", "connect"]


def __getattr__(name: str) -> object:
    # loaded on first use, so that `import globular` (and the CLI) stay quick
    if name in ("Cluster", "connect"):
        from globular import api

        return getattr(api, name)
    if name == "Client":
        from globular.client.connect import client_class

        return client_class()
    raise AttributeError(f"module 'globular' has no attribute {name!r}")
