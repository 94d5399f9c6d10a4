"""Engines as their user configures them: ``engine_args``, ``engine_env``, ``engine_startup``,
``engine_workdir`` and ``profile`` (a local IPython profile whose ``ipengine_config.py``,
``ipcontroller_config.py`` and ``startup/`` files are copied to the nodes).

Engines run with ``IPYTHONDIR`` in the node's folder (:func:`~.roles.ipython_dir`), so a
profile on this machine would never reach them: its files are written into each node's
``profile_default`` (0600) before the node's engines start.  The user's controller config is
loaded first by the controller's own (``load_subconfig``), so what globular sets (ports, keys)
still holds.
"""

from __future__ import annotations

from pathlib import Path

from globular.errors import GlobularError
from globular.ipcluster.roles import local_profile, profile_dir
from globular.ipcluster.settings import IPClusterSettings
from globular.plugins.base import PluginContext
from globular.state import NodeRecord

USER_CONTROLLER_CONFIG = "user_ipcontroller_config.py"  # the profile's ipcontroller_config.py, on the master
STARTUP_SCRIPT = "globular_engine_startup.py"  # engine_startup, in each node's profile folder


def user_files(settings: IPClusterSettings) -> dict[str, bytes]:
    """What goes into every node's ``profile_default``: relative path -> content."""
    files: dict[str, bytes] = {}
    if settings.profile:
        folder = local_profile(settings.profile)
        for name, target in (
            ("ipengine_config.py", "ipengine_config.py"),
            ("ipcontroller_config.py", USER_CONTROLLER_CONFIG),
        ):
            if (folder / name).is_file():
                files[target] = (folder / name).read_bytes()
        startup = folder / "startup"
        for script in sorted([*startup.glob("*.py"), *startup.glob("*.ipy")]):
            files[f"startup/{script.name}"] = script.read_bytes()
    if settings.engine_startup:
        try:
            files[STARTUP_SCRIPT] = Path(settings.engine_startup).expanduser().read_bytes()
        except OSError as exc:
            raise GlobularError(f"engine_startup = {settings.engine_startup}: {exc.strerror or exc}") from None
    return files


async def install(ctx: PluginContext, node: NodeRecord, settings: IPClusterSettings) -> None:
    """Write the user's configuration into ``node``'s profile (before its engines, or its controller, start)."""
    files = user_files(settings)
    if not node.is_master:
        files.pop(USER_CONTROLLER_CONFIG, None)
    runner = ctx.runner(node)
    for name, data in files.items():
        await runner.write_file(f"{profile_dir(node)}/{name}", data, 0o600)


def engine_arguments(node: NodeRecord, settings: IPClusterSettings) -> list[str]:
    """What the user adds to every ipengine command line of ``node``."""
    extra = list(settings.engine_args)
    if settings.engine_startup:
        extra.append(f"--IPEngine.startup_script={profile_dir(node)}/{STARTUP_SCRIPT}")
    return extra


def controller_config_prefix(settings: IPClusterSettings) -> str:
    """The first line of the controller's config: the user's, loaded first (globular's lines win)."""
    if settings.profile and (local_profile(settings.profile) / "ipcontroller_config.py").is_file():
        return f"load_subconfig({USER_CONTROLLER_CONFIG!r})\n"
    return ""
