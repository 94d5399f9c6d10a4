"""globular: an interactive IPython-parallel cluster on a set of machines, in one command.

``globular.Cluster`` and ``globular.connect`` are the Python API (see globular.api);
``globular.Client`` is ipyparallel's Client whose SSH tunnel carries the CURVE keys
(the ipcluster plugin's, found through the plugin registry: see globular.client.connect).
"""

from globular.errors import GlobularError

__version__ = "0.1.0"

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
