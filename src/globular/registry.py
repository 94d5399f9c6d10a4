"""Finding providers and plugins.

Built-ins register through the same entry points third parties use:
``globular.providers``, ``globular.plugins`` and ``globular.commands`` (click commands
added to the ``globular`` CLI).
"""

from __future__ import annotations

import functools
import importlib
import logging
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from globular.plugins.base import Plugin
    from globular.providers.base import NodeProvider
    from globular.spec import ClusterSpec

log = logging.getLogger(__name__)

PROVIDER_GROUP = "globular.providers"
PLUGIN_GROUP = "globular.plugins"
COMMAND_GROUP = "globular.commands"

# StarCluster's class paths, accepted as they are in old config files.
STARCLUSTER_ALIASES = {
    "starcluster.plugins.ipcluster.IPCluster": "ipcluster",
    "starcluster.plugins.ipcluster.IPClusterRestartEngines": "ipclusterrestart",
    "starcluster.plugins.ipcluster.IPClusterStop": "ipclusterstop",
    "starcluster.plugins.pypkginstaller.PyPkgInstaller": "pypkginstaller",
    # where globular's own classes were before they moved into the ipcluster package
    "globular.plugins.ipcluster.IPCluster": "ipcluster",
    "globular.plugins.ipcluster:IPCluster": "ipcluster",
    "globular.plugins.ipcluster.IPClusterRestartEngines": "ipclusterrestart",
    "globular.plugins.ipcluster:IPClusterRestartEngines": "ipclusterrestart",
    "globular.plugins.ipcluster.IPClusterStop": "ipclusterstop",
    "globular.plugins.ipcluster:IPClusterStop": "ipclusterstop",
}

# StarCluster plugins globular does not carry, and what to do instead.
UNSUPPORTED = {
    "starcluster.plugins.pkginstaller.PackageInstaller": (
        "StarCluster's pkginstaller (apt packages) is not supported: globular installs Python packages only "
        "(packages = ... in [cluster], or the pypkginstaller plugin); install system packages on the hosts yourself"
    ),
}


class RegistryError(LookupError):
    """A name that does not resolve; the message says why."""


@functools.cache
def _read_groups() -> dict[str, tuple[tuple[str, str], ...]]:
    # a reading lists every installed package (tens of milliseconds): every group of ours is read
    # in one, once a process (a command looks at three, several times)
    every = entry_points()
    return {
        group: tuple((ep.name, ep.value) for ep in every.select(group=group))
        for group in (PROVIDER_GROUP, PLUGIN_GROUP, COMMAND_GROUP)
    }


def _group(group: str) -> dict[str, str]:
    return dict(_read_groups()[group])


def plugin_names() -> list[str]:
    return sorted(_group(PLUGIN_GROUP))


def provider_names() -> list[str]:
    return sorted(_group(PROVIDER_GROUP))


def load_object(target: str) -> object:
    """Import ``module:attr`` or ``module.attr``."""
    if ":" in target:
        module_name, _, attr = target.partition(":")
    else:
        module_name, _, attr = target.rpartition(".")
    if not module_name or not attr:
        raise RegistryError(f"{target!r} is not a dotted path to a class")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise RegistryError(f"cannot import module {module_name!r}: {exc}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise RegistryError(f"module {module_name!r} has no {attr!r}") from None


def provider_class(name: str) -> type[NodeProvider]:
    from globular.providers.base import NodeProvider

    targets = _group(PROVIDER_GROUP)
    if name not in targets:
        raise RegistryError(f"unknown provider {name!r} (available: {', '.join(sorted(targets)) or 'none'})")
    cls = load_object(targets[name])
    if not (isinstance(cls, type) and issubclass(cls, NodeProvider)):
        raise RegistryError(f"provider {name!r} ({targets[name]}) is not a NodeProvider")
    return cls


def resolve_plugin(setup_class: str) -> tuple[str, type[Plugin]]:
    """``setup_class`` -> (canonical ``module:Class``, class).

    Accepts an entry point name (``ipcluster``), a StarCluster class path, our own
    dotted path (``globular.plugins.ipcluster.IPCluster``), or any importable
    dotted path to a :class:`Plugin` subclass.
    """
    from globular.plugins.base import Plugin

    if setup_class in UNSUPPORTED:
        raise RegistryError(UNSUPPORTED[setup_class])
    targets = _group(PLUGIN_GROUP)
    name = STARCLUSTER_ALIASES.get(setup_class, setup_class)
    if name in targets:
        target = targets[name]
    else:
        dotted = {value.replace(":", "."): value for value in targets.values()}
        target = dotted.get(setup_class, setup_class)
    cls = load_object(target)
    if not (isinstance(cls, type) and issubclass(cls, Plugin)):
        raise RegistryError(
            f"{setup_class!r} is not a globular plugin class (a subclass of globular.plugins.base.Plugin)"
        )
    canonical = f"{cls.__module__}:{cls.__qualname__}"
    return canonical, cls


def make_provider(spec: ClusterSpec, *, cluster: str, home: Path) -> NodeProvider:
    """The provider ``spec`` names, for cluster ``cluster``."""
    return provider_class(spec.provider)(spec, cluster=cluster, home=home)


def _installed(group: str, what: str) -> list[object]:
    """Every object ``group``'s entry points name, by name; one that cannot be loaded is left
    out, with a warning in the log: a broken third-party plugin must not break the commands
    that do not use it."""
    found = []
    for name, target in sorted(_group(group).items()):
        try:
            found.append(load_object(target))
        except RegistryError as exc:
            log.warning("%s %s (%s) cannot be loaded: %s", what, name, target, exc)
    return found


def plugin_classes() -> list[type[Plugin]]:
    """Every installed plugin class (the ``globular.plugins`` entry points), each once."""
    from globular.plugins.base import Plugin

    found: list[type[Plugin]] = []
    for cls in _installed(PLUGIN_GROUP, "plugin"):
        if isinstance(cls, type) and issubclass(cls, Plugin) and cls not in found:
            found.append(cls)
    return found


def command_names() -> list[str]:
    """The installed ``globular.commands`` entry points' names (nothing loaded)."""
    return sorted(_group(COMMAND_GROUP))


def command(name: str) -> Any | None:
    """The click command installed as ``name`` (loaded now), or None: there is none, or it
    cannot be loaded, or it is not a click command (a warning in the log says which)."""
    import click

    target = _group(COMMAND_GROUP).get(name)
    if target is None:
        return None
    try:
        found = load_object(target)
    except RegistryError as exc:
        log.warning("command %s (%s) cannot be loaded: %s", name, target, exc)
        return None
    if not isinstance(found, click.Command):
        log.warning("command %r is not a click command", found)
        return None
    return found


def commands() -> list[Any]:
    """Every installed ``globular.commands`` entry point's click command (one that is not a
    click command, or cannot be loaded, is left out, with a warning in the log)."""
    return [found for name in command_names() if (found := command(name)) is not None]
