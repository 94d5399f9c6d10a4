"""IPython parallel on the cluster: StarCluster's IPCluster, IPClusterRestartEngines, IPClusterStop.

The controller runs on the master, one engine per core runs on every node (the
master keeps a core for the controller unless ``master_engines`` says otherwise),
and the client connection file is copied to
``~/.globular/ipcluster/<cluster>-<region>.json``.  Every process is started
and stopped by pid through the node's runner.

The hooks live here; the work is in the modules beside this one: ``lifecycle`` (the
processes as one), ``controller``, ``engines``, ``notebook``, ``idle`` (idle shutdown),
``preflight`` and ``status``; the commands are :mod:`globular.cli.ipcluster`'s.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from globular.errors import BadInput, GlobularError
from globular.fanout import each_node
from globular.ipcluster.controller import (
    controller_address,
    controller_ip,
    forget_files,
)
from globular.ipcluster.engines import retire_engines, start_engines, wait_for_engines
from globular.ipcluster.gpus import engine_count, gpu_table
from globular.ipcluster.idle import start_idle_watchers
from globular.ipcluster.lifecycle import (
    client_of,
    mark_restart,
    running_data,
    start_controller_and_engines,
    stop_engines_and_controller,
    stop_ipcluster,
)
from globular.ipcluster.notebook import (
    NotebookInfo,
    notebook_certificate,
    notebook_folder,
    start_notebook,
)
from globular.ipcluster.preflight import Questions, Requirement, local_version, run_preflight
from globular.ipcluster.roles import DATA_KEY, ipython_dir
from globular.ipcluster.settings import IPClusterSettings, encryption_of, engines_for
from globular.plugins.base import LoadWatcher, NodeCheck, Plugin, PluginContext, PluginReport, PluginStatus, StatusView
from globular.results import counted
from globular.spec import Settings as SettingsModel
from globular.state import ClusterRecord, NodeRecord


def client_lines(local_file: Path, local_master: bool, key: str | None) -> tuple[str, str]:
    """The import and the ``Client(...)`` call that connect to the cluster from this machine:
    ipyparallel's own for a master here; globular's (whose SSH tunnel carries the CURVE keys,
    and does not race SIGHUP) for a remote master, in the seed's ``Client(path, sshkey=...)`` form."""
    if local_master:
        return "from ipyparallel import Client", f"Client({str(local_file)!r})"
    key_arg = f", sshkey={key!r}" if key else ""
    return "from globular import Client", f"Client({str(local_file)!r}{key_arg})"


def settings_of(ctx: PluginContext) -> IPClusterSettings:
    """The settings of the cluster's IPCluster plugin (restart needs them)."""
    settings = ctx.settings_of(IPCluster)
    if not isinstance(settings, IPClusterSettings):
        raise GlobularError(f"cluster {ctx.name!r} does not run the ipcluster plugin")
    return settings


def cluster_encryption(ctx: PluginContext, settings: IPClusterSettings) -> str:
    """The cluster's encryption, decided once (the setting, else curve when a node is remote)
    and kept in the record: preflight, start, the report and a new controller read it there."""
    data = ctx.plugin_data(DATA_KEY)
    if data.get("encryption") not in ("curve", "none"):
        data["encryption"] = encryption_of(settings, ctx.remote_nodes)
    encryption: str = data["encryption"]
    return encryption


class IPCluster(Plugin):
    """Controller on the master, engines on every node; StarCluster's IPCluster."""

    Settings = IPClusterSettings
    secret_settings = frozenset({"notebook_passwd"})
    warm_modules = ("ipyparallel",)  # its Client waits for the engines
    settings: IPClusterSettings

    def working_folder(self, node: NodeRecord) -> str | None:
        return self.settings.engine_workdir or None

    @classmethod
    def effective_settings(cls, settings: SettingsModel, remote_nodes: bool) -> dict[str, str]:
        assert isinstance(settings, IPClusterSettings)
        return {"encryption": encryption_of(settings, remote_nodes)}

    async def before_terminate(self, ctx: PluginContext, discard: bool) -> PluginReport | None:
        """The master's notebooks copied home (see :mod:`~globular.ipcluster.keep`)."""
        from globular.ipcluster.keep import left_out_text, not_saved, save_notebooks

        if not self.settings.enable_notebook or not ctx.nodes:
            return None
        folder = notebook_folder(self.settings)
        if not ctx.remote_nodes:
            return PluginReport(plugin=self.name, summary=[("notebooks", f"kept in {folder} (this machine's)")])
        if discard:
            return PluginReport(plugin=self.name, summary=[("notebooks", "not copied home (discarded)")])
        try:
            saved = await save_notebooks(
                ctx.name, ctx.region, ctx.master, ctx.runner(ctx.master), self.settings, ctx.home
            )
        except GlobularError as exc:
            raise not_saved(ctx.name, exc) from None
        what = f"{saved.files} files in {saved.folder}" + (
            f" ({saved.copied} copied, the rest unchanged)" if saved.copied != saved.files else ""
        )
        return PluginReport(
            plugin=self.name,
            summary=[("notebooks", what + left_out_text(saved.left_out))],
            data={"notebooks": str(saved.folder), "notebooks_left_out": saved.left_out},
        )

    def facts_request(self, record: ClusterRecord, deep: bool) -> dict[str, Any]:
        return {"gpus": True} if deep and self.settings.wants_gpus else {}

    @classmethod
    def client_for(cls, record: ClusterRecord, home: Path, timeout: float) -> Any | None:
        if DATA_KEY not in record.plugin_data:
            return None  # this plugin never ran here
        from globular.ipcluster.client import connect

        return connect(record.name, home=home, timeout=timeout)

    @classmethod
    def client_class(cls) -> type | None:
        from globular.ipcluster.client import Client

        return Client

    @classmethod
    def load_watcher(cls, record: ClusterRecord, home: Path) -> LoadWatcher | None:
        if DATA_KEY not in record.plugin_data:
            return None
        from globular.ipcluster.load import ControllerLoad

        return ControllerLoad(record.name, home)

    @classmethod
    def forget(cls, home: Path, cluster: str) -> None:
        forget_files(home, cluster)

    def encryption(self, ctx: PluginContext) -> str:
        return cluster_encryption(ctx, self.settings)

    async def run(self, ctx: PluginContext) -> PluginReport:
        if ctx.plugin_data(DATA_KEY).get("connection_file"):
            raise BadInput(
                f"cluster {ctx.name!r} runs its controller and engines already: `globular runplugin "
                f"ipclusterrestart {ctx.name}` starts new engines, `globular runplugin ipclusterstop {ctx.name}` stops them"
            )
        started = time.monotonic()
        settings = self.settings
        master = ctx.master
        # a certificate that cannot be had fails the start before anything runs
        cert = notebook_certificate(ctx, settings, master.address) if settings.enable_notebook else None
        local_file, total = await start_controller_and_engines(ctx, settings, self.encryption(ctx))
        if settings.idle_shutdown:
            await start_idle_watchers(ctx, settings, ctx.nodes)
        notebook = None
        if cert is not None:
            notebook = await start_notebook(ctx, settings, master, ipython_dir(master), cert)
        return self._report(ctx, local_file, total, time.monotonic() - started, notebook)

    def node_packages(self, node: NodeRecord) -> list[str]:
        """ipyparallel at exactly this machine's version; the packer's module; JupyterLab on the
        master for the notebook (each at this machine's version when it is installed here)."""
        modules = ["ipyparallel"]
        if self.settings.packer_spec.module:
            modules.append(self.settings.packer_spec.module)
        if node.is_master and self.settings.enable_notebook:
            modules.append("jupyterlab")
        return [f"{m}=={local_version(m)}" if local_version(m) else m for m in modules]

    async def preflight(self, ctx: PluginContext, nodes: list[NodeRecord]) -> list[NodeCheck]:
        """Can each node run its engines? Python, ipyparallel's version, the packer's module,
        jupyterlab on the master for the notebook, free cores, the controller's address."""
        settings = self.settings
        modules = [
            Requirement(
                "ipyparallel",
                compare=True,
                fix="install it there, or drop environment = system and globular installs it",
            )
        ]
        if settings.packer_spec.module:
            modules.append(Requirement(settings.packer_spec.module, load=True, need=f"packer = {settings.packer}"))
        master_modules = [Requirement("jupyterlab", need="enable_notebook")] if settings.enable_notebook else []
        running = ctx.plugin_data(DATA_KEY).get("engine_info") or {}
        ip = controller_address(running) if running else await controller_ip(ctx, settings)
        questions = Questions(
            modules=modules,
            master_modules=master_modules,
            curve=self.encryption(ctx) == "curve",
            gpu_settings=settings if settings.wants_gpus else None,
            engines={n.name: engines_for(n, settings) for n in nodes},
            controller_ip=ip,
            port_candidates=settings.allowed_ports,
            master_folders={"notebook_directory": notebook_folder(settings)} if settings.enable_notebook else {},
        )
        checks = await run_preflight(ctx, nodes, questions)
        # two nodes of one machine (local nodes) see the same GPUs
        known = ctx.plugin_data(DATA_KEY).get("gpus") or {}
        names = {n.name for n in nodes}
        holder = {d["uuid"]: node for node, devices in known.items() if node not in names for d in devices}
        for check in checks:
            shared = sorted({holder[u] for u in check.gpus if u in holder})
            if shared:
                check.warnings.append(
                    f"its GPUs are {' and '.join(shared)}'s too (the same machine): their engines share them"
                )
            for uuid in check.gpus:
                holder.setdefault(uuid, check.node)
        return checks

    def _gpu_note(self, ctx: PluginContext) -> str:
        held = len(gpu_table(ctx.plugin_data(DATA_KEY)))
        return f", {held} of them on a GPU each" if held else ""

    def _report(
        self, ctx: PluginContext, local_file: Path, engines: int, elapsed: float, notebook: NotebookInfo | None
    ) -> PluginReport:
        import_line, client_line = client_lines(local_file, ctx.runner(ctx.master).direct, ctx.login_key)
        warnings = []
        if notebook is not None and self.settings.idle_shutdown and ctx.rents_machines:
            warnings.append(
                "idle shutdown releases the master from the master itself: its notebooks are not copied home "
                f"then (`globular notebook --save {ctx.name}` copies them)"
            )
        traffic = {
            "curve": "encrypted (CurveZMQ) and signed",
            "none": "signed, not encrypted" + ("" if ctx.remote_nodes else " (loopback only)"),
        }[self.encryption(ctx)]
        summary = [
            ("engines", f"{engines} on {len(ctx.nodes)} nodes" + self._gpu_note(ctx)),
            ("controller", f"{ctx.master.name} ({ctx.master.address})"),
            ("traffic", traffic),
            ("connection file", str(local_file)),
        ]
        if notebook is not None:
            summary += [
                ("notebook", notebook.url),
                ("password", notebook.password or "the notebook_passwd of your config"),
                (
                    "certificate",
                    f"self-signed, {notebook.fingerprint}" if not self.settings.notebook_certfile else "yours",
                ),
            ]
            if not ctx.runner(ctx.master).direct:
                summary.append(("from here", f"globular notebook --forward {ctx.name}"))
            if notebook.cert_note:
                warnings.append(notebook.cert_note)
        summary.append(("ready in", f"{elapsed:.1f} s"))
        return PluginReport(
            plugin=self.name,
            summary=summary,
            hints=[
                import_line,
                f"rc = {client_line}",
                "view = rc[:]",
                f"# or: globular shell --ipcluster={ctx.name}",
            ],
            warnings=warnings,
            data={"engines": engines, "connection_file": str(local_file), "client": client_line},
        )

    async def on_add_node(self, ctx: PluginContext, node: NodeRecord) -> PluginReport | None:
        data = running_data(ctx)
        count = engine_count(data, node, self.settings)
        client = await client_of(ctx)
        try:
            floor = max(client.ids, default=-1) + 1
            wanted = await start_engines(ctx, node, count, data["engine_info"], self.settings, floor=floor)
            fresh = await wait_for_engines(
                ctx,
                client,
                wanted=wanted,
                nodes=[node],
                timeout=self.settings.engine_timeout,
                key=f"engines:{node.name}",
                description=f"engines of {node.name} registered",
                settings=self.settings,
            )
        finally:
            client.close()
        if self.settings.idle_shutdown:
            await start_idle_watchers(ctx, self.settings, [node])
        return PluginReport(
            plugin=self.name, summary=[(node.name, f"{count} engines registered")], data={"ids": sorted(fresh)}
        )

    async def on_remove_node(self, ctx: PluginContext, node: NodeRecord) -> None:
        client = await client_of(ctx)  # fails, saying so, when no controller runs
        try:
            if ctx.is_lost(node):  # the controller is told its engines are gone (unregistration): nothing to wait for
                await retire_engines(ctx, client, [node], lost=True)
            else:
                retired = await retire_engines(ctx, client, [node])
                await wait_for_engines(
                    ctx,
                    client,
                    wanted={},
                    gone=retired,
                    nodes=[],
                    timeout=self.settings.engine_timeout,
                    key=f"engines-leaving:{node.name}",
                    description=f"engines of {node.name} leaving",
                )
        finally:
            client.close()
        (ctx.plugin_data(DATA_KEY).get("gpus") or {}).pop(node.name, None)

    async def on_restart_node(self, ctx: PluginContext, node: NodeRecord) -> PluginReport | None:
        from globular.ipcluster.revive import revive_engines

        revived = await revive_engines(ctx, node, self.settings)
        if not revived:
            return None
        pairs = ", ".join(f"{old} -> {new}" for old, new in sorted(revived.items()))
        return PluginReport(
            plugin=self.name,
            summary=[(node.name, f"{counted(len(revived), 'engine')} started again in place ({pairs})")],
            data={"engines": {str(old): new for old, new in revived.items()}},
        )

    async def on_shutdown(self, ctx: PluginContext) -> None:
        await stop_ipcluster(ctx)

    async def status(self, view: StatusView) -> PluginStatus:
        from globular.ipcluster.status import ipcluster_status

        return await ipcluster_status(view, self.settings)


class IPClusterRestartEngines(Plugin):
    """Kill every engine on every node and start new ones against the same controller."""

    async def run(self, ctx: PluginContext) -> PluginReport:
        started = time.monotonic()
        data = running_data(ctx)
        settings = settings_of(ctx)
        client = await client_of(ctx)
        try:
            old = set(client.ids)
            counts = {node.name: engine_count(data, node, settings) for node in ctx.nodes}
            ctx.reporter.begin("restart", "restarting engines (nodes)", len(ctx.nodes))
            floor = max(old, default=-1) + 1
            wanted: dict[int, str] = {}

            mark_restart(ctx.nodes)
            # one shutdown request for every old engine, one wait for them to leave (one client:
            # its sockets serve one thread at a time), then the new engines everywhere at once
            await retire_engines(ctx, client, ctx.nodes)

            async def restart(node: NodeRecord) -> None:
                wanted.update(
                    await start_engines(ctx, node, counts[node.name], data["engine_info"], settings, floor=floor)
                )

            await each_node(ctx.nodes, restart, on_done=lambda node: ctx.reporter.advance("restart"))
            ctx.reporter.end("restart")
            fresh = await wait_for_engines(
                ctx, client, wanted=wanted, gone=old, nodes=ctx.nodes, timeout=settings.engine_timeout
            )
        finally:
            client.close()
        return PluginReport(
            plugin=self.name,
            summary=[
                ("engines", f"{sum(counts.values())} new engines on {len(ctx.nodes)} nodes"),
                ("restarted in", f"{time.monotonic() - started:.1f} s"),
            ],
            data={"old_ids": sorted(old), "new_ids": sorted(fresh)},
        )


class IPClusterStop(Plugin):
    """Stop the engines and the controller; the nodes stay."""

    async def run(self, ctx: PluginContext) -> PluginReport:
        running_data(ctx)
        stopped = await stop_ipcluster(ctx)
        return PluginReport(plugin=self.name, summary=[("stopped", f"{stopped} engines and the controller")])


class IPClusterRestartController(Plugin):
    """A new controller (new keys, new ports) and new engines on the same nodes, for a cluster
    whose controller died; the notebook server keeps running (its kernels' ``Client()`` reads
    the new connection file).  ``globular restart-controller NAME``."""

    async def run(self, ctx: PluginContext) -> PluginReport:
        started = time.monotonic()
        settings = settings_of(ctx)
        data = ctx.plugin_data(DATA_KEY)
        if not data.get("engine_info"):
            raise GlobularError(
                f"cluster {ctx.name!r} has no controller to restart: `globular runplugin ipcluster` starts one"
            )
        old = await stop_engines_and_controller(ctx)
        for key in ("engine_ids", "next_engine_id", "engines"):
            data.pop(key, None)
        mark_restart(ctx.nodes)
        local_file, total = await start_controller_and_engines(ctx, settings, cluster_encryption(ctx, settings))
        if settings.idle_shutdown:
            await start_idle_watchers(ctx, settings, ctx.nodes)
        return PluginReport(
            plugin=self.name,
            summary=[
                ("controller", f"new on {ctx.master.name}; {old} old engines stopped, {total} started"),
                ("connection file", str(local_file)),
                ("clients", "those connected before must connect again"),
                ("restarted in", f"{time.monotonic() - started:.1f} s"),
            ],
            data={"engines": total, "connection_file": str(local_file)},
        )
