"""The plugin interface.

A plugin is a class named by ``setup_class`` in a ``[plugin NAME]`` section.  Its
typed settings are the rest of that section, validated by its ``Settings``
model.  Hooks run in the order of the cluster's ``plugins =`` list; removal and
shutdown run in reverse order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from globular.spec import PluginSpec, Settings

if TYPE_CHECKING:
    from globular.cluster import Cluster
    from globular.preflight import NodeCheck
    from globular.state import NodeRecord


@dataclass
class PluginReport:
    """What a hook wants the user to see, and data for programs."""

    plugin: str
    summary: list[tuple[str, str]] = field(default_factory=list)
    hints: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)


class Plugin:
    """Base class; every hook is optional."""

    Settings: ClassVar[type[Settings]] = Settings
    # settings kept out of the state record (passwords): the plugin gets them at start only
    secret_settings: ClassVar[frozenset[str]] = frozenset()
    # the plugin only works where globular makes the node environment (it installs packages)
    needs_managed_environment: ClassVar[bool] = False

    def __init__(self, name: str, settings: Settings):
        self.name = name
        self.settings = settings

    @classmethod
    def from_spec(cls, spec: PluginSpec) -> Plugin:
        return cls(spec.name, cls.Settings.model_validate(spec.settings))

    @classmethod
    def redacted(cls, spec: PluginSpec) -> PluginSpec:
        """``spec`` with secret settings replaced, for the state record."""
        hidden = {k: "(not kept)" for k in cls.secret_settings if spec.settings.get(k) is not None}
        return spec.model_copy(update={"settings": {**spec.settings, **hidden}}) if hidden else spec

    def node_packages(self, node: NodeRecord) -> list[str]:
        """Requirements (``name``, ``name==1.2``, ``name>=2``) this plugin needs in ``node``'s
        Python environment; globular installs them where it manages the environment."""
        return []

    async def preflight(self, cluster: Cluster, nodes: list[NodeRecord]) -> list[NodeCheck]:
        """Before anything starts on ``nodes``: can they run what this plugin starts?
        One :class:`~globular.preflight.NodeCheck` per node (none: nothing to check)."""
        return []

    async def run(self, cluster: Cluster) -> PluginReport | None:
        """The cluster's nodes are up (at start, or on ``runplugin``)."""
        return None

    async def on_add_node(self, cluster: Cluster, node: NodeRecord) -> PluginReport | None:
        """``node`` joined a running cluster."""
        return None

    async def on_remove_node(self, cluster: Cluster, node: NodeRecord) -> None:
        """``node`` is about to leave the cluster."""

    async def on_shutdown(self, cluster: Cluster) -> None:
        """The cluster is being terminated (or a start failed); undo ``run``.

        Must cope with a ``run`` that stopped half-way.
        """
