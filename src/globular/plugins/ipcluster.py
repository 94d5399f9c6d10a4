"""IPython parallel on the cluster: StarCluster's IPCluster, IPClusterRestartEngines, IPClusterStop.

The controller runs on the master, one engine per core runs on every node (the
master keeps a core for the controller unless ``master_engines`` says otherwise),
and the client connection file is copied to
``~/.globular/ipcluster/<cluster>-<region>.json``.  Every process is started
and stopped by pid through the node's runner.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import math
import re
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Field

from globular.errors import GlobularError, NodeError
from globular.fanout import each_node
from globular.paths import connection_file_path, write_private
from globular.plugins.base import Plugin, PluginReport
from globular.plugins.engines import engine_processes, retire_engines, start_engines, wait_for_engines
from globular.plugins.idle import start_idle_watchers
from globular.plugins.notebook import NotebookInfo, notebook_certificate, start_notebook, stop_notebook
from globular.plugins.roles import CONTROLLER, DATA_KEY, IDLE_WATCHER, ipython_dir, profile_dir
from globular.preflight import NodeCheck, Requirement, local_version, run_preflight
from globular.providers.base import ProcessSpec, Runner
from globular.spec import Settings
from globular.state import NodeRecord, ProcessRecord

if TYPE_CHECKING:
    from ipyparallel import Client

    from globular.cluster import Cluster

DEATH_WINDOW_MS = 5000  # the controller drops an engine silent for this long

PACKERS = {
    "json": ("json", "json"),
    "pickle": ("pickle", "pickle"),
    "msgpack": ("msgpack.packb", "msgpack.unpackb"),
}


MIN_CONTROLLER_PORTS = 20  # the controller and its schedulers listen on 18 ports
# engine-facing ports, in the order the controller takes them from engine_ports
ENGINE_PORT_KEYS = ("registration", "control", "mux", "task", "iopub", "hb_ping", "hb_pong")
BROADCAST_DEPTH = 1
BROADCAST_LEAVES = 2**BROADCAST_DEPTH
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


_DURATION = re.compile(r"^\s*(?:(\d+(?:\.\d+)?)\s*h)?\s*(?:(\d+(?:\.\d+)?)\s*m)?\s*(?:(\d+(?:\.\d+)?)\s*s)?\s*$")


def parse_duration(value: Any) -> Any:
    """``30m``, ``2h``, ``1h30m``, ``90s`` (a bare number is minutes) -> seconds."""
    if value is None or isinstance(value, (int, float)):
        return value
    text = str(value).strip().lower()
    if re.fullmatch(r"\d+(?:\.\d+)?", text):
        return float(text) * 60
    match = _DURATION.match(text)
    if not text or not match or not any(match.groups()):
        raise ValueError(f"{value!r} is not a duration (such as 30m, 2h, 1h30m, 90s)")
    hours, minutes, seconds = (float(g) if g else 0.0 for g in match.groups())
    return hours * 3600 + minutes * 60 + seconds


class IPClusterSettings(Settings):
    enable_notebook: bool = Field(default=False, description="JupyterLab on the master, HTTPS and password only")
    notebook_passwd: str | None = Field(default=None, description="default: a random one, shown once by start")
    notebook_directory: str | None = Field(default=None, description="relative to home, or absolute; default: home")
    notebook_port: int = Field(default=8888, ge=1, le=65535, description="the next free one is taken if it is in use")
    notebook_certfile: str | None = Field(
        default=None, description="your own certificate (PEM); default: a self-signed one"
    )
    notebook_keyfile: str | None = Field(default=None, description="the key of notebook_certfile (PEM, unencrypted)")
    packer: Literal["json", "pickle", "msgpack"] = "json"
    master_engines: int | None = Field(
        default=None, ge=0, description="engines on the master; default cores - 1 (at least 1)"
    )
    heartbeat_period: int = Field(
        default=200,
        ge=50,
        le=60_000,
        description="controller heartbeat, ms; engines register on a beat, dead ones are noticed after 5 s or 10 beats",
    )
    engine_nanny: bool = Field(
        default=True,
        description="a nanny process per engine: needed to interrupt one engine (Client.send_signal); False starts engines faster",
    )
    restart_dead_engines: bool = Field(
        default=False, description="a supervisor on each node restarts engines that die (they rejoin with new ids)"
    )
    idle_shutdown: Annotated[float | None, BeforeValidator(parse_duration)] = Field(
        default=None,
        gt=0,
        description="30m, 2h: when no task ran for that long, stop engines and controller (and release rented machines)",
    )
    engine_timeout: float = Field(default=120.0, gt=0, description="seconds to wait for engines to register")
    controller_interface: Annotated[str | None, AfterValidator(_check_interface)] = Field(
        default=None,
        description="interface name (eth0) or address the controller listens on; default: the master's address",
    )
    controller_ports: Annotated[str | None, AfterValidator(_check_ports)] = Field(
        default=None, description="FIRST-LAST: the ports the controller may use; default: random free ports"
    )
    encryption: Literal["curve", "none"] | None = Field(
        default=None,
        description="curve: CurveZMQ encrypts all traffic between clients, controller and engines; "
        "default: curve where nodes are other machines (ssh, ec2), none on the local provider (loopback)",
    )


def heartbeat_misses(period_ms: int) -> int:
    """Missed beats before the controller drops an engine: about 5 s, and at least ipyparallel's 10."""
    return max(10, math.ceil(DEATH_WINDOW_MS / period_ms))


def encryption_of(settings: IPClusterSettings, remote_nodes: bool) -> str:
    """``curve`` or ``none``: the setting, else curve where the nodes are other machines."""
    return settings.encryption or ("curve" if remote_nodes else "none")


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


# -- the plugins ---------------------------------------------------------------


class IPCluster(Plugin):
    """Controller on the master, engines on every node; StarCluster's IPCluster."""

    Settings = IPClusterSettings
    secret_settings = frozenset({"notebook_passwd"})
    settings: IPClusterSettings

    async def run(self, cluster: Cluster) -> PluginReport:
        started = time.monotonic()
        # the client library loads while the processes start
        client_import = asyncio.create_task(asyncio.to_thread(importlib.import_module, "ipyparallel"))
        master = cluster.master
        settings = self.settings
        # a certificate that cannot be had fails the start before anything runs
        cert = notebook_certificate(cluster, settings, master.address) if settings.enable_notebook else None
        controller, engine_info = await self._launch_controller(cluster, master)

        # Engines start with the controller, not after it: their registration
        # request waits on the (pre-chosen) registration port until it listens.
        counts = {node.name: engines_for(node, settings) for node in cluster.nodes}
        total = sum(counts.values())
        cluster.reporter.begin("engine-start", "starting engines on nodes", len(cluster.nodes))
        started_ids = await each_node(
            cluster.nodes,
            lambda node: start_engines(
                cluster,
                node,
                counts[node.name],
                engine_info,
                nanny=settings.engine_nanny,
                supervise=settings.restart_dead_engines,
            ),
            on_done=lambda node: cluster.reporter.advance("engine-start"),
        )
        cluster.reporter.end("engine-start")
        client_info, engine_info = await self._controller_ready(cluster, master, controller, engine_info)

        local_file = connection_file_path(cluster.home, cluster.name, cluster.record.region)
        write_private(local_file, json.dumps(client_info, indent=2).encode())
        data = cluster.plugin_data(DATA_KEY)
        data.update(
            connection_file=str(local_file),
            engine_info=engine_info,
            packer=settings.packer,
            encryption=self.encryption(cluster),
        )
        cluster.save()

        await client_import
        client = await open_client(cluster)
        try:
            wanted = {i: n for ids in started_ids.values() for i, n in ids.items()}
            await wait_for_engines(cluster, client, wanted=wanted, nodes=cluster.nodes, timeout=settings.engine_timeout)
        finally:
            client.close()
        if settings.idle_shutdown:
            await start_idle_watchers(cluster, settings, cluster.nodes)
        notebook = None
        if cert is not None:
            notebook = await start_notebook(cluster, settings, master, ipython_dir(master), cert)
        return self._report(cluster, local_file, total, time.monotonic() - started, notebook)

    def node_packages(self, node: NodeRecord) -> list[str]:
        """ipyparallel at exactly this machine's version; the packer's module; JupyterLab on the
        master for the notebook (each at this machine's version when it is installed here)."""
        modules = ["ipyparallel"]
        if PACKER_MODULES.get(self.settings.packer):
            modules.append(PACKER_MODULES[self.settings.packer])
        if node.is_master and self.settings.enable_notebook:
            modules.append("jupyterlab")
        return [f"{m}=={local_version(m)}" if local_version(m) else m for m in modules]

    async def preflight(self, cluster: Cluster, nodes: list[NodeRecord]) -> list[NodeCheck]:
        """Can each node run its engines? Python, ipyparallel's version, the packer's module,
        jupyterlab on the master for the notebook, free cores, the controller's address."""
        settings = self.settings
        modules = [Requirement("ipyparallel", compare=True)]
        packer_module = PACKER_MODULES.get(settings.packer)
        if packer_module:
            modules.append(Requirement(packer_module, load=True, need=f"packer = {settings.packer}"))
        master_modules = [Requirement("jupyterlab", need="enable_notebook")] if settings.enable_notebook else []
        master = cluster.master
        running = (cluster.record.plugin_data.get(DATA_KEY) or {}).get("engine_info") or {}
        ip = running.get("location") or await self._controller_ip(cluster, master)
        ports = list(port_range(settings.controller_ports)) if settings.controller_ports else None
        return await run_preflight(
            cluster,
            nodes,
            modules=modules,
            master_modules=master_modules,
            curve=self.encryption(cluster) == "curve",
            engines={n.name: engines_for(n, settings) for n in nodes},
            controller_ip=ip,
            port_candidates=ports,
        )

    def encryption(self, cluster: Cluster) -> str:
        return encryption_of(self.settings, cluster.provider.remote_nodes)

    async def _controller_ip(self, cluster: Cluster, master: NodeRecord) -> str:
        """Where the controller listens: ``controller_interface`` (a name or an address), else the master's address."""
        wanted = self.settings.controller_interface
        if not wanted:
            return master.address
        if _is_address(wanted):
            return wanted
        found = await cluster.runner(master)._nodeproc("addresses", {})
        if wanted not in found:
            raise NodeError(
                master.name,
                f"controller_interface {wanted!r}: no such interface with an IPv4 address (has: {', '.join(sorted(found))})",
            )
        return found[wanted]

    async def _launch_controller(self, cluster: Cluster, master: NodeRecord) -> tuple[list[ProcessRecord], dict]:
        """Start the controller with a key and registration port chosen here; return it and the
        engine connection info, which engines can use before the controller is up."""
        runner = cluster.runner(master)
        security = f"{profile_dir(master)}/security"
        await runner.run(["rm", "-f", f"{security}/ipcontroller-client.json", f"{security}/ipcontroller-engine.json"])
        ip = await self._controller_ip(cluster, master)
        allowed = list(port_range(self.settings.controller_ports)) if self.settings.controller_ports else None
        ports = await runner._nodeproc(
            "free_ports", {"ip": ip, "ports": allowed, "count": len(ENGINE_PORT_KEYS) + BROADCAST_LEAVES}
        )
        if len(ports) < len(ENGINE_PORT_KEYS) + BROADCAST_LEAVES:
            raise NodeError(
                master.name, f"not enough free ports in controller_ports = {self.settings.controller_ports} on {ip}"
            )
        keyfile = f"{security}/globular-session.key"
        key = secrets.token_hex(32)
        await runner.write_file(keyfile, key.encode(), 0o600)
        # CurveZMQ: the controller's key pair, made here for each start like the session key; the
        # secret half reaches the controller in its profile's config file (0600), never in argv or
        # the environment.  The session key stays too (ipyparallel drops it under curve otherwise):
        # clients and engines must both sign and know the server key.
        config_file = f"{profile_dir(master)}/ipcontroller_config.py"
        server_key = None
        if self.encryption(cluster) == "curve":
            import zmq

            public, secret = zmq.curve_keypair()
            server_key = public.decode("ascii")
            config = (
                f"c.IPController.curve_publickey = {public!r}\n"
                f"c.IPController.curve_secretkey = {secret!r}\n"
                "c.IPController.enable_curve = True\n"
                f"c.Session.key = {key.encode()!r}\n"
            )
            await runner.write_file(config_file, config.encode(), 0o600)
        else:
            await runner.run(["rm", "-f", config_file])
        pack, unpack = PACKERS[self.settings.packer]
        argv = [
            master.python,
            "-m",
            "ipyparallel.controller",
            f"--profile-dir={profile_dir(master)}",
            f"--ip={ip}",
            f"--location={ip}",
            f"--HeartMonitor.period={self.settings.heartbeat_period}",
            f"--HeartMonitor.max_heartmonitor_misses={heartbeat_misses(self.settings.heartbeat_period)}",
            f"--Session.packer={pack}",
            f"--Session.unpacker={unpack}",
            f"--Session.keyfile={keyfile}",  # the key itself never on a command line
            # the controller takes its engine ports in ENGINE_PORT_KEYS order, then the broadcast leaves
            f"--IPController.engine_ports={','.join(map(str, ports))}",
            f"--IPController.broadcast_scheduler_depth={BROADCAST_DEPTH}",
        ]
        if allowed:
            argv.append(f"--ports={','.join(str(p) for p in allowed if p not in ports)}")
        env = {"IPYTHONDIR": ipython_dir(master), "GLOBULAR_CLUSTER": cluster.name}
        spec = ProcessSpec(
            argv=argv, log=f"{master.workdir}/logs/controller.log", role=CONTROLLER, env=env, cwd=master.workdir
        )
        cluster.reporter.begin("controller", "controller on master", 1)
        procs = await runner.spawn([spec])
        cluster.track(master, procs)
        engine_info = {
            "key": key,
            "signature_scheme": "hmac-sha256",
            "interface": f"tcp://{ip}",
            "location": ip,
            **dict(zip(ENGINE_PORT_KEYS, ports)),
            "broadcast": ports[len(ENGINE_PORT_KEYS) :],
            "pack": pack,
            "unpack": unpack,
            "ssh": "",
            "curve_serverkey": server_key,
        }
        return procs, engine_info

    async def _controller_ready(
        self, cluster: Cluster, master: NodeRecord, procs: list[ProcessRecord], expected: dict
    ) -> tuple[dict, dict]:
        """Wait for the controller's connection files; check it took the key and port it was given."""
        security = f"{profile_dir(master)}/security"
        files = [f"{security}/ipcontroller-client.json", f"{security}/ipcontroller-engine.json"]
        found = await cluster.runner(master).wait_files(files, watch=procs, timeout=60)
        client_info, engine_info = found[files[0]], found[files[1]]
        for key in ("key", "signature_scheme", "pack", "unpack", "curve_serverkey", *ENGINE_PORT_KEYS, "broadcast"):
            if engine_info.get(key) != expected[key]:
                raise NodeError(
                    master.name,
                    f"the controller did not take the {key} it was given; this ipyparallel is not supported",
                )
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
        outside = sorted(
            {info[k] for info in infos for k in PORT_KEYS + ("hb_ping", "hb_pong") if isinstance(info.get(k), int)}
            - set(allowed)
        )
        if outside:
            raise NodeError(
                master.name,
                f"the controller took ports {outside} outside controller_ports = {self.settings.controller_ports}; widen the range",
            )

    def _report(
        self, cluster: Cluster, local_file: Path, engines: int, elapsed: float, notebook: NotebookInfo | None
    ) -> PluginReport:
        client_line = f"Client({str(local_file)!r})"
        warnings = []
        traffic = {
            "curve": "encrypted (CurveZMQ) and signed",
            "none": "signed, not encrypted" + ("" if cluster.provider.remote_nodes else " (loopback only)"),
        }[self.encryption(cluster)]
        summary = [
            ("engines", f"{engines} on {len(cluster.nodes)} nodes"),
            ("controller", f"{cluster.master.name} ({cluster.master.address})"),
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
        count = engines_for(node, self.settings)
        client = await open_client(cluster)
        try:
            floor = max(client.ids, default=-1) + 1
            wanted = await start_engines(
                cluster,
                node,
                count,
                data["engine_info"],
                nanny=self.settings.engine_nanny,
                supervise=self.settings.restart_dead_engines,
                floor=floor,
            )
            fresh = await wait_for_engines(
                cluster,
                client,
                wanted=wanted,
                nodes=[node],
                timeout=self.settings.engine_timeout,
                description=f"engines of {node.name} registered",
            )
        finally:
            client.close()
        if self.settings.idle_shutdown:
            await start_idle_watchers(cluster, self.settings, [node])
        return PluginReport(
            plugin=self.name, summary=[(node.name, f"{count} engines registered")], data={"ids": sorted(fresh)}
        )

    async def on_remove_node(self, cluster: Cluster, node: NodeRecord) -> None:
        running_data(cluster)  # fails, saying so, when no controller runs
        client = await open_client(cluster)
        try:
            retired = await retire_engines(cluster, client, [node])
            await wait_for_engines(
                cluster,
                client,
                wanted={},
                gone=retired,
                nodes=[],
                timeout=self.settings.engine_timeout,
                key="engines-leaving",
                description=f"engines of {node.name} leaving",
            )
        finally:
            client.close()

    async def on_shutdown(self, cluster: Cluster) -> None:
        await stop_ipcluster(cluster)


async def stop_ipcluster(cluster: Cluster) -> int:
    """Stop the notebook server, every engine, then the controller; remove the local files."""
    await stop_notebook(cluster)

    async def stop_node(node: NodeRecord) -> int:  # engines and controller together: one round trip a node
        engines = engine_processes(node)
        watchers = node.processes_with_role(IDLE_WATCHER)
        await cluster.stop_processes(node, watchers + engines + node.processes_with_role(CONTROLLER))
        return len(engines)

    counts = await each_node(cluster.nodes, stop_node)
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

            floor = max(old, default=-1) + 1
            wanted: dict[int, str] = {}

            async def restart(node: NodeRecord) -> None:
                await retire_engines(cluster, client, [node])
                wanted.update(
                    await start_engines(
                        cluster,
                        node,
                        counts[node.name],
                        data["engine_info"],
                        nanny=settings.engine_nanny,
                        supervise=settings.restart_dead_engines,
                        floor=floor,
                    )
                )

            await each_node(cluster.nodes, restart, on_done=lambda node: cluster.reporter.advance("restart"))
            cluster.reporter.end("restart")
            total = sum(counts.values())
            fresh = await wait_for_engines(
                cluster, client, wanted=wanted, gone=old, nodes=cluster.nodes, timeout=settings.engine_timeout
            )
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
