"""IPython parallel on the cluster: StarCluster's IPCluster, IPClusterRestartEngines, IPClusterStop.

The controller runs on the master, one engine per core runs on every node (the
master keeps a core for the controller unless ``master_engines`` says otherwise),
and the client connection file is copied to
``~/.globular/ipcluster/<cluster>-<region>.json``.  Every process is started
and stopped by pid through the node's runner.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import AfterValidator, Field

from globular.errors import GlobularError, NodeError
from globular.fanout import each_node
from globular.paths import connection_file_path, write_private
from globular.plugins.base import Plugin, PluginReport
from globular.plugins.notebook import NotebookInfo, notebook_certificate, start_notebook, stop_notebook
from globular.providers.base import ProcessSpec, Runner
from globular.spec import Settings
from globular.state import NodeRecord

if TYPE_CHECKING:
    from ipyparallel import Client

    from globular.cluster import Cluster

CONTROLLER = "ipcontroller"
ENGINE = "ipengine"
DATA_KEY = "ipcluster"  # where IPCluster keeps its part of the state record

PACKERS = {
    "json": ("json", "json"),
    "pickle": ("pickle", "pickle"),
    "msgpack": ("msgpack.packb", "msgpack.unpackb"),
}


MIN_CONTROLLER_PORTS = 20  # the controller and its schedulers listen on 18 ports
PORT_KEYS = ("registration", "control", "mux", "task", "iopub", "notification", "broadcast")


def port_range(text: str) -> range:
    """``"10000-10030"`` -> the ports it names (ValueError if it is not FIRST-LAST)."""
    low, high = (int(part) for part in text.split("-"))
    return range(low, high + 1)


def _check_ports(text: str | None) -> str | None:
    if text is None:
        return None
    try:
        ports = port_range(text)
    except ValueError:
        raise ValueError("expected a port range FIRST-LAST, such as 10000-10030") from None
    low, high = ports.start, ports.stop - 1
    if not 1024 <= low <= high <= 65535:
        raise ValueError("ports must lie in 1024-65535, the first no higher than the last")
    if high - low + 1 < MIN_CONTROLLER_PORTS:
        raise ValueError(f"the controller needs at least {MIN_CONTROLLER_PORTS} ports")
    return f"{low}-{high}"


def _check_interface(text: str | None) -> str | None:
    if text is not None and text.strip() in ("*", "0.0.0.0", "::", ""):
        raise ValueError("that listens on every interface; name one interface (eth0) or address")
    return text


def _is_address(text: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


class IPClusterSettings(Settings):
    enable_notebook: bool = Field(default=False, description="JupyterLab on the master, HTTPS and password only")
    notebook_passwd: str | None = Field(default=None, description="default: a random one, shown once by start")
    notebook_directory: str | None = Field(default=None, description="relative to home, or absolute; default: home")
    notebook_port: int = Field(default=8888, ge=1, le=65535, description="the next free one is taken if it is in use")
    notebook_certfile: str | None = Field(default=None, description="your own certificate (PEM); default: a self-signed one")
    notebook_keyfile: str | None = Field(default=None, description="the key of notebook_certfile (PEM, unencrypted)")
    packer: Literal["json", "pickle", "msgpack"] = "json"
    master_engines: int | None = Field(default=None, ge=0, description="engines on the master; default cores - 1 (at least 1)")
    heartbeat_period: int = Field(default=500, ge=50, le=60_000, description="controller heartbeat, ms")
    engine_timeout: float = Field(default=120.0, gt=0, description="seconds to wait for engines to register")
    controller_interface: Annotated[str | None, AfterValidator(_check_interface)] = Field(
        default=None, description="interface name (eth0) or address the controller listens on; default: the master's address"
    )
    controller_ports: Annotated[str | None, AfterValidator(_check_ports)] = Field(
        default=None, description="FIRST-LAST: the ports the controller may use; default: random free ports"
    )


def ipython_dir(node: NodeRecord) -> str:
    return f"{node.workdir}/.ipython"


def profile_dir(node: NodeRecord) -> str:
    return f"{ipython_dir(node)}/profile_default"


def engines_for(node: NodeRecord, settings: IPClusterSettings) -> int:
    if node.is_master:
        if settings.master_engines is not None:
            return settings.master_engines
        return max(1, node.cores - 1)
    return node.cores


def ipcluster_settings(cluster: Cluster) -> IPClusterSettings:
    """The settings of the cluster's IPCluster plugin (restart and addnode need them)."""
    for spec in cluster.record.spec.plugins:
        if spec.setup_class == f"{IPCluster.__module__}:{IPCluster.__qualname__}":
            return IPClusterSettings.model_validate(spec.settings)
    raise GlobularError(f"cluster {cluster.name!r} does not run the ipcluster plugin")


def running_data(cluster: Cluster) -> dict[str, Any]:
    data = cluster.record.plugin_data.get(DATA_KEY) or {}
    if not data.get("connection_file"):
        raise GlobularError(f"no IPython controller is running on cluster {cluster.name!r}")
    return data


async def reachable_info(runner: Runner, info: dict[str, Any]) -> dict[str, Any]:
    """Client connection info that works from this machine.

    For a master reached by ssh, each controller port is forwarded through the
    runner's SSH connection, so nothing but SSH has to be reachable.
    """
    if runner.node.login is None:
        return info
    host = info["interface"].split("://", 1)[1]
    forwarded = dict(info, interface="tcp://127.0.0.1", location="127.0.0.1", ssh="")
    for key in PORT_KEYS:
        forwarded[key] = (await runner.forward_port(host, info[key]))[1]
    return forwarded


async def open_client(cluster: Cluster, timeout: float = 10.0) -> Client:
    """A Client for the cluster's controller (tunnelled through ssh when the master is remote)."""
    from ipyparallel import Client

    data = running_data(cluster)
    try:
        info = json.loads(Path(data["connection_file"]).read_text())
    except (OSError, ValueError) as exc:
        raise GlobularError(f"cannot read the connection file {data['connection_file']}: {exc}") from None
    info = await reachable_info(cluster.runner(cluster.master), info)
    return await asyncio.to_thread(Client, info, timeout=timeout)


PACKER_MODULES = {"msgpack": "msgpack"}


async def require_modules(cluster: Cluster, nodes: list[NodeRecord], settings: IPClusterSettings) -> None:
    """Fail, naming each node, if a node's Python lacks a module the settings need (msgpack)."""
    needed = [m for m in [PACKER_MODULES.get(settings.packer)] if m]
    if not needed:
        return

    async def check(node: NodeRecord) -> None:
        missing = await cluster.runner(node)._nodeproc("modules", {"modules": needed})
        if missing:
            name, why = next(iter(missing.items()))
            raise NodeError(
                node.name,
                f"packer = {settings.packer} needs the {name} package, which {node.python} cannot import ({why}); "
                f"install it on every node (pip install {name})",
            )

    await each_node(nodes, check)


# -- engines -------------------------------------------------------------------


async def start_engines(cluster: Cluster, node: NodeRecord, count: int, engine_info: dict[str, Any]) -> int:
    """Write the engine connection file (0600) on ``node`` and start ``count`` engines."""
    if count <= 0:
        return 0
    runner = cluster.runner(node)
    info_path = f"{node.workdir}/security/ipcontroller-engine.json"
    await runner.write_file(info_path, json.dumps(engine_info).encode(), 0o600)
    env = {
        "GLOBULAR_CLUSTER": cluster.name,
        "GLOBULAR_NODE": node.name,
        "IPYTHONDIR": ipython_dir(node),
        "OMP_NUM_THREADS": "1",
    }
    specs = [
        ProcessSpec(
            argv=[node.python, "-m", "ipyparallel.engine", f"--file={info_path}"],
            log=f"{node.workdir}/logs/engine-{i}.log",
            role=ENGINE,
            env=env,
            cwd=node.workdir,
        )
        for i in range(count)
    ]
    cluster.track(node, await runner.spawn(specs))
    return count


async def stop_engines(cluster: Cluster, node: NodeRecord) -> int:
    engines = node.processes_with_role(ENGINE)
    await cluster.stop_processes(node, engines)
    return len(engines)


async def check_engines_alive(cluster: Cluster, nodes: list[NodeRecord]) -> None:
    """Raise NodeError (with the engine's log) if an engine process has died."""

    async def check(node: NodeRecord) -> None:
        engines = node.processes_with_role(ENGINE)
        for proc, alive in zip(engines, await cluster.runner(node).alive(engines)):
            if not alive:
                log = await cluster.runner(node).tail(proc.log) if proc.log else ""
                raise NodeError(node.name, f"engine (pid {proc.pid}) exited; its log ({proc.log}) ends:", log)

    await each_node(nodes, check)


async def wait_for_engines(
    cluster: Cluster,
    client: Client,
    *,
    new: int,
    before: set[int],
    gone: set[int],
    nodes: list[NodeRecord],
    timeout: float,
    key: str = "engines",
    description: str = "engines registered",
) -> set[int]:
    """Wait until ``new`` engines not in ``before`` are registered and every id in ``gone`` has left.

    Checks every second that the engine processes on ``nodes`` are alive, so a
    crashing engine fails at once with its log, not at the timeout.
    """
    reporter = cluster.reporter
    reporter.begin(key, description, new)
    deadline = time.monotonic() + timeout
    next_check = time.monotonic() + 1.0
    while True:
        ids = set(client.ids)
        fresh = ids - before
        reporter.set(key, min(len(fresh), new))
        if len(fresh) >= new and not (ids & gone):
            reporter.end(key)
            return fresh
        now = time.monotonic()
        if now >= deadline:
            raise GlobularError(
                f"only {len(fresh)} of {new} engines registered within {timeout:g}s "
                f"(engine logs are in <node workdir>/logs)"
            )
        if now >= next_check:
            await check_engines_alive(cluster, nodes)
            next_check = now + 1.0
        await asyncio.sleep(0.05)


def _engine_node() -> str:
    import os

    return os.environ.get("GLOBULAR_NODE", "?")


async def identify_engines(cluster: Cluster, client: Client, ids: set[int]) -> None:
    """Record which node each new engine id runs on (removenode and restart need it)."""
    targets = sorted(ids)
    nodes = []
    if targets:
        result = client[targets].apply_async(_engine_node)
        nodes = await asyncio.to_thread(result.get, 30)
    data = cluster.plugin_data(DATA_KEY)
    mapping = data.setdefault("engine_ids", {})
    for engine_id, node in zip(targets, nodes):
        mapping[str(engine_id)] = node
    data["engines"] = len(mapping)
    cluster.save()


def engine_ids_on(cluster: Cluster, nodes: list[NodeRecord]) -> set[int]:
    names = {n.name for n in nodes}
    mapping = cluster.plugin_data(DATA_KEY).get("engine_ids", {})
    return {int(i) for i, node in mapping.items() if node in names}


async def retire_engines(cluster: Cluster, client: Client, nodes: list[NodeRecord]) -> set[int]:
    """Ask the controller to shut down the engines of ``nodes`` (so they unregister
    at once), then stop their processes by pid whatever they did."""
    ids = engine_ids_on(cluster, nodes) & set(client.ids)
    if ids:
        try:
            client.shutdown(targets=sorted(ids), block=False)
        except Exception:  # a controller that cannot relay it: the pids are stopped anyway
            pass
    await each_node(nodes, lambda node: stop_engines(cluster, node))
    data = cluster.plugin_data(DATA_KEY)
    mapping = data.setdefault("engine_ids", {})
    for engine_id in ids:
        mapping.pop(str(engine_id), None)
    data["engines"] = len(mapping)
    cluster.save()
    return ids


async def wait_for_node_engines(cluster: Cluster, client: Client, node: NodeRecord, count: int, timeout: float) -> set[int]:
    """Wait until ``count`` engines registered *from ``node``*.

    Nodes added together register at the same time, so a new id may belong to
    another joining node: every unknown id is identified until ``node`` has its own.
    """
    before = set(client.ids)
    deadline = time.monotonic() + timeout
    fresh = await wait_for_engines(cluster, client, new=count, before=before, gone=set(), nodes=[node], timeout=timeout)
    await identify_engines(cluster, client, fresh)
    while len(engine_ids_on(cluster, [node])) < count:
        if time.monotonic() >= deadline:
            raise NodeError(node.name, f"only {len(engine_ids_on(cluster, [node]))} of {count} engines registered within {timeout:g}s")
        await check_engines_alive(cluster, [node])
        await asyncio.sleep(0.05)
        known = {int(i) for i in cluster.plugin_data(DATA_KEY).get("engine_ids", {})}
        await identify_engines(cluster, client, set(client.ids) - known)
    return engine_ids_on(cluster, [node])


# -- the plugins ---------------------------------------------------------------


class IPCluster(Plugin):
    """Controller on the master, engines on every node; StarCluster's IPCluster."""

    Settings = IPClusterSettings
    secret_settings = frozenset({"notebook_passwd"})
    settings: IPClusterSettings

    async def run(self, cluster: Cluster) -> PluginReport:
        started = time.monotonic()
        master = cluster.master
        settings = self.settings
        await require_modules(cluster, cluster.nodes, settings)
        # a certificate that cannot be had fails the start before anything runs
        cert = notebook_certificate(cluster, settings, master.address) if settings.enable_notebook else None
        client_info, engine_info = await self._start_controller(cluster, master)

        local_file = connection_file_path(cluster.home, cluster.name, cluster.record.region)
        write_private(local_file, json.dumps(client_info, indent=2).encode())
        data = cluster.plugin_data(DATA_KEY)
        data.update(connection_file=str(local_file), engine_info=engine_info, packer=settings.packer)
        cluster.save()

        counts = {node.name: engines_for(node, settings) for node in cluster.nodes}
        total = sum(counts.values())
        cluster.reporter.begin("engine-start", "starting engines on nodes", len(cluster.nodes))
        await each_node(
            cluster.nodes,
            lambda node: start_engines(cluster, node, counts[node.name], engine_info),
            on_done=lambda node: cluster.reporter.advance("engine-start"),
        )
        cluster.reporter.end("engine-start")

        client = await open_client(cluster)
        try:
            fresh = await wait_for_engines(
                cluster, client, new=total, before=set(), gone=set(), nodes=cluster.nodes, timeout=settings.engine_timeout
            )
            await identify_engines(cluster, client, fresh)
        finally:
            client.close()
        notebook = None
        if cert is not None:
            notebook = await start_notebook(cluster, settings, master, ipython_dir(master), cert)
        return self._report(cluster, local_file, total, time.monotonic() - started, notebook)

    async def _controller_ip(self, cluster: Cluster, master: NodeRecord) -> str:
        """Where the controller listens: ``controller_interface`` (a name or an address), else the master's address."""
        wanted = self.settings.controller_interface
        if not wanted:
            return master.address
        if _is_address(wanted):
            return wanted
        found = await cluster.runner(master)._nodeproc("addresses", {})
        if wanted not in found:
            raise NodeError(master.name, f"controller_interface {wanted!r}: no such interface with an IPv4 address (has: {', '.join(sorted(found))})")
        return found[wanted]

    async def _start_controller(self, cluster: Cluster, master: NodeRecord) -> tuple[dict, dict]:
        runner = cluster.runner(master)
        security = f"{profile_dir(master)}/security"
        files = [f"{security}/ipcontroller-client.json", f"{security}/ipcontroller-engine.json"]
        await runner.run(["rm", "-f", *files])
        pack, unpack = PACKERS[self.settings.packer]
        ip = await self._controller_ip(cluster, master)
        argv = [
            master.python,
            "-m",
            "ipyparallel.controller",
            f"--profile-dir={profile_dir(master)}",
            f"--ip={ip}",
            f"--location={ip}",
            f"--HeartMonitor.period={self.settings.heartbeat_period}",
            f"--Session.packer={pack}",
            f"--Session.unpacker={unpack}",
        ]
        if self.settings.controller_ports:
            argv.append(f"--ports={self.settings.controller_ports}")
        env = {"IPYTHONDIR": ipython_dir(master), "GLOBULAR_CLUSTER": cluster.name}
        spec = ProcessSpec(argv=argv, log=f"{master.workdir}/logs/controller.log", role=CONTROLLER, env=env, cwd=master.workdir)
        cluster.reporter.begin("controller", "controller on master", 1)
        procs = await runner.spawn([spec])
        cluster.track(master, procs)
        found = await runner.wait_files(files, watch=procs, timeout=60)
        client_info, engine_info = found[files[0]], found[files[1]]
        self._check_ports(master, client_info, engine_info)
        # Client(path) from this machine tunnels through ssh to the master by itself.
        client_info["ssh"] = master.login or ""
        cluster.reporter.advance("controller")
        cluster.reporter.end("controller")
        return client_info, engine_info

    def _check_ports(self, master: NodeRecord, *infos: dict) -> None:
        if not self.settings.controller_ports:
            return
        allowed = port_range(self.settings.controller_ports)
        outside = sorted({info[k] for info in infos for k in PORT_KEYS + ("hb_ping", "hb_pong") if isinstance(info.get(k), int)} - set(allowed))
        if outside:
            raise NodeError(master.name, f"the controller took ports {outside} outside controller_ports = {self.settings.controller_ports}; widen the range")

    def _report(
        self, cluster: Cluster, local_file: Path, engines: int, elapsed: float, notebook: NotebookInfo | None
    ) -> PluginReport:
        client_line = f"Client({str(local_file)!r})"
        warnings = []
        summary = [
            ("engines", f"{engines} on {len(cluster.nodes)} nodes"),
            ("controller", f"{cluster.master.name} ({cluster.master.address})"),
            ("connection file", str(local_file)),
        ]
        if notebook is not None:
            summary += [
                ("notebook", notebook.url),
                ("password", notebook.password or "the notebook_passwd of your config"),
                ("certificate", f"self-signed, {notebook.fingerprint}" if not self.settings.notebook_certfile else "yours"),
            ]
            if cluster.master.login:
                summary.append(("from here", f"globular notebook --forward {cluster.name}"))
            if notebook.cert_note:
                warnings.append(notebook.cert_note)
        summary.append(("ready in", f"{elapsed:.1f} s"))
        return PluginReport(
            plugin=self.name,
            summary=summary,
            hints=[
                "from ipyparallel import Client",
                f"rc = {client_line}",
                "view = rc[:]",
                f"# or: globular shell --ipcluster={cluster.name}",
            ],
            warnings=warnings,
            data={"engines": engines, "connection_file": str(local_file), "client": client_line},
        )

    async def on_add_node(self, cluster: Cluster, node: NodeRecord) -> PluginReport | None:
        data = running_data(cluster)
        await require_modules(cluster, [node], self.settings)
        count = engines_for(node, self.settings)
        client = await open_client(cluster)
        try:
            await start_engines(cluster, node, count, data["engine_info"])
            fresh = await wait_for_node_engines(cluster, client, node, count, self.settings.engine_timeout)
        finally:
            client.close()
        return PluginReport(plugin=self.name, summary=[(node.name, f"{count} engines registered")], data={"ids": sorted(fresh)})

    async def on_remove_node(self, cluster: Cluster, node: NodeRecord) -> None:
        data = running_data(cluster)
        client = await open_client(cluster)
        try:
            retired = await retire_engines(cluster, client, [node])
            await wait_for_engines(
                cluster, client, new=0, before=set(client.ids), gone=retired, nodes=[], timeout=self.settings.engine_timeout,
                key="engines-leaving", description=f"engines of {node.name} leaving",
            )
        finally:
            client.close()

    async def on_shutdown(self, cluster: Cluster) -> None:
        await stop_ipcluster(cluster)


async def stop_ipcluster(cluster: Cluster) -> int:
    """Stop the notebook server, every engine, then the controller; remove the local files."""
    await stop_notebook(cluster)
    counts = await each_node(cluster.nodes, lambda node: stop_engines(cluster, node))
    await cluster.stop_role(CONTROLLER)
    data = cluster.record.plugin_data.pop(DATA_KEY, None) or {}
    if data.get("connection_file"):
        Path(data["connection_file"]).unlink(missing_ok=True)
    cluster.save()
    return sum(counts.values())


class IPClusterRestartEngines(Plugin):
    """Kill every engine on every node and start new ones against the same controller."""

    async def run(self, cluster: Cluster) -> PluginReport:
        started = time.monotonic()
        data = running_data(cluster)
        settings = ipcluster_settings(cluster)
        client = await open_client(cluster)
        try:
            old = set(client.ids)
            counts = {node.name: engines_for(node, settings) for node in cluster.nodes}
            cluster.reporter.begin("restart", "restarting engines (nodes)", len(cluster.nodes))

            async def restart(node: NodeRecord) -> None:
                await retire_engines(cluster, client, [node])
                await start_engines(cluster, node, counts[node.name], data["engine_info"])

            await each_node(cluster.nodes, restart, on_done=lambda node: cluster.reporter.advance("restart"))
            cluster.reporter.end("restart")
            total = sum(counts.values())
            fresh = await wait_for_engines(
                cluster, client, new=total, before=old, gone=old, nodes=cluster.nodes, timeout=settings.engine_timeout
            )
            cluster.plugin_data(DATA_KEY)["engine_ids"] = {}
            await identify_engines(cluster, client, fresh)
        finally:
            client.close()
        return PluginReport(
            plugin=self.name,
            summary=[
                ("engines", f"{total} new engines on {len(cluster.nodes)} nodes"),
                ("restarted in", f"{time.monotonic() - started:.1f} s"),
            ],
            data={"old_ids": sorted(old), "new_ids": sorted(fresh)},
        )


class IPClusterStop(Plugin):
    """Stop the engines and the controller; the nodes stay."""

    async def run(self, cluster: Cluster) -> PluginReport:
        running_data(cluster)
        stopped = await stop_ipcluster(cluster)
        return PluginReport(plugin=self.name, summary=[("stopped", f"{stopped} engines and the controller")])
