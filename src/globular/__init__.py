"""globular: an interactive IPython-parallel cluster on a set of machines, in one command.

``globular.Cluster`` and ``globular.connect`` are the Python API (see globular.api);
``globular.Client`` is ipyparallel's Client whose SSH tunnel carries the CURVE keys
(the ipcluster plugin's, found through the plugin registry: see globular.client.connect).
"""

import warnings

from globular.errors import GlobularError

__version__ = "0.1.0"


def _quiet_libraries() -> None:
    """Silence, narrowly, the warnings that globular's own imports of libraries raise and that are
    not the user's business: asyncssh reads cryptography's deprecated DSA names when it is
    imported (cryptography 51 and newer warn, five times).  Only that category from asyncssh's
    own modules: a warning about the user's code, or asyncssh's others, still shows."""
    try:
        from cryptography.utils import CryptographyDeprecationWarning
    except ImportError:  # cryptography comes with asyncssh: without it, there is nothing to silence
        return
    warnings.filterwarnings("ignore", category=CryptographyDeprecationWarning, module=r"asyncssh(\.|$)")


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
