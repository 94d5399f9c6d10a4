"""StarCluster's PyPkgInstaller: Python packages on every node.

``[plugin pypkginstaller]`` with ``setup_class =
starcluster.plugins.pypkginstaller.PyPkgInstaller`` (or ``pypkginstaller``) and
``packages = numpy, scipy`` works as it did in StarCluster, except that nothing
is fetched on the nodes: the packages join the node environment, whose wheels
globular resolves on this machine and ships over SSH (see
:mod:`globular.environment`).  Requirements may carry versions
(``numpy>=2, scipy==1.14.1``).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, Field

from globular.plugins.base import Plugin
from globular.spec import CommaList, Settings, check_requirements
from globular.state import NodeRecord


class PyPkgInstallerSettings(Settings):
    packages: Annotated[CommaList, AfterValidator(check_requirements)] = Field(
        description="requirements to install on every node: numpy, scipy>=1.14"
    )


class PyPkgInstaller(Plugin):
    Settings = PyPkgInstallerSettings
    settings: PyPkgInstallerSettings
    needs_managed_environment = True

    def node_packages(self, node: NodeRecord) -> list[str]:
        return list(self.settings.packages)
