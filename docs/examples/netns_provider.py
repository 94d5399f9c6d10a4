"""A provider in one file whose nodes are not SSH hosts: each node is a Linux network namespace,
entered with ``ip netns exec`` (as ``kubectl exec`` enters a pod).

No sshd runs there and this machine need not reach the namespaces' addresses: every command
goes in through ``ip netns exec``, and the controller's and the notebook's ports come out
through the node programs (:class:`~globular.providers.exec_runner.ExecRunner`, as ``kubectl
port-forward`` does).  The namespaces exist already (as pods would), one node each, and can
reach each other; their files are this machine's (``python`` and ``remote_dir`` are paths
here).  Creating namespaces needs root, and so does entering them.

Installed with an entry point in the ``globular.providers`` group::

    [project.entry-points."globular.providers"]
    netns = "netns_provider:NetnsProvider"

and used with ``provider = netns`` in a ``[cluster]`` section; ``namespaces`` names them, the
first is the master.
"""

from __future__ import annotations

import os
import posixpath
import shlex
from collections.abc import Callable, Sequence

from pydantic import Field

from globular.errors import BadInput, CommandError, GlobularError, NodeError
from globular.fanout import each_node
from globular.providers.base import NodeProvider, NodeShell, Runner
from globular.providers.exec_runner import ExecRunner
from globular.spec import CommaList, Settings
from globular.spec import Settings as SettingsModel
from globular.state import NodeRecord


class NetnsSettings(Settings):
    namespaces: CommaList = Field(
        description="network namespaces (ip netns list), a node each; the first is the master"
    )
    python: str = Field(default="python3", description="the Python the nodes run (same major.minor as here)")
    remote_dir: str = Field(default="/tmp/globular-netns", description="where node folders go")
    cores_per_node: int = Field(default=1, ge=1, le=64, description="engines per node")


class NetnsRunner(ExecRunner):
    def entry(self) -> list[str]:
        return ["ip", "netns", "exec", self.node.data["netns"]]


class NetnsProvider(NodeProvider):
    name = "netns"
    where_nodes_come_from = "uses the namespaces of its config"
    Settings = NetnsSettings
    settings: NetnsSettings
    remote_nodes = True  # each has a network of its own: traffic between them is encrypted
    default_environment = "managed"  # globular builds each node's environment from ``python``

    @property
    def region(self) -> str:  # the connection file is ~/.globular/ipcluster/<cluster>-<region>.json
        return "netns"

    @classmethod
    def max_nodes(cls, settings: SettingsModel) -> int | None:
        assert isinstance(settings, NetnsSettings)
        return len(settings.namespaces)

    def envs_dir(self) -> str:
        return posixpath.join(self.settings.remote_dir, "envs")

    def make_runner(self, node: NodeRecord) -> Runner:
        return NetnsRunner(node)

    async def create_nodes(
        self,
        names: list[str],
        on_ready: Callable[[NodeRecord], None],
        *,
        existing: Sequence[NodeRecord] = (),
        hosts: list[str] | None = None,
    ) -> list[NodeRecord]:
        used = {n.data["netns"] for n in existing}
        free = [ns for ns in self.settings.namespaces if ns not in used]
        if len(free) < len(names):
            raise GlobularError(f"{len(names)} nodes asked for, but only {len(free)} namespaces are unused")
        nodes = [
            NodeRecord(
                name=name,
                address="",  # the namespace's own, asked below
                workdir=posixpath.join(self.settings.remote_dir, self.cluster, name),
                cores=self.settings.cores_per_node,
                python=self.settings.python,
                data={"netns": ns, "step_names": {"ssh": "entered"}},  # its step "ssh", in its words
            )
            for name, ns in zip(names, free)
        ]

        async def bring_up(node: NodeRecord) -> NodeRecord:
            runner = self.runner(node)
            try:
                facts = await runner.nodeproc("prepare", {"dir": node.workdir})
                addresses = await runner.nodeproc("addresses", {})
            except CommandError as exc:
                raise NodeError(node.name, f"namespace {node.data['netns']}: {exc.stderr.strip() or exc}") from None
            found = [a for name, a in sorted(addresses.items()) if name != "lo"]
            if not found:
                raise NodeError(node.name, f"namespace {node.data['netns']} has no address but loopback")
            node.address, node.workdir = found[0], facts["workdir"]
            self.on_step(node, "ssh")  # it answers: the step after provision
            on_ready(node)
            return node

        await each_node(nodes, bring_up)
        return nodes

    async def terminate_nodes(self, nodes: list[NodeRecord]) -> None:
        async def release(node: NodeRecord) -> None:
            if "netns" not in node.data:
                return
            request = {"root": self.settings.remote_dir, "path": node.workdir, "mark": self.mark(node.name)}
            try:
                await self.runner(node).nodeproc("remove_dir", request)  # its strays stopped first
            finally:
                runner = self._runners.pop(node.name, None)
                if runner is not None:
                    await runner.close()

        await each_node(nodes, release)

    def shell_argv(self, node: NodeRecord, command: str | None, user: str | None = None) -> NodeShell:
        if user:
            raise BadInput(f"{node.name} of {self.cluster!r} is a netns node: it takes no --user")
        shell = command if command is not None else f"exec {shlex.quote(os.environ.get('SHELL') or '/bin/sh')}"
        env = dict(os.environ, GLOBULAR_NODE=node.name, GLOBULAR_CLUSTER=self.cluster)
        return NodeShell(["ip", "netns", "exec", node.data["netns"], "/bin/sh", "-c", shell], cwd=node.workdir, env=env)
