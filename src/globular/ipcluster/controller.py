"""IPCluster's controller: started on the master with keys and ports chosen here, waited
for, and reached from this machine (through SSH when the master is remote)."""

from __future__ import annotations

import asyncio
import glob
import json
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from globular.aio import in_thread
from globular.errors import GlobularError, NodeError
from globular.ipcluster import userconfig
from globular.ipcluster.engines import SUPERVISOR_SOURCE
from globular.ipcluster.node import source
from globular.ipcluster.roles import CONTROLLER, DATA_KEY, ipython_dir, profile_dir
from globular.ipcluster.settings import IPClusterSettings, heartbeat_misses, is_address
from globular.plugins.base import PluginContext
from globular.providers.base import ProcessSpec, Runner
from globular.state import ClusterRecord, NodeRecord, ProcessRecord

if TYPE_CHECKING:
    from ipyparallel import Client

# engine-facing ports, in the order the controller takes them from engine_ports
ENGINE_PORT_KEYS = ("registration", "control", "mux", "task", "iopub", "hb_ping", "hb_pong")
BROADCAST_DEPTH = 1
BROADCAST_LEAVES = 2**BROADCAST_DEPTH
# the ports a client connects to
PORT_KEYS = ("registration", "control", "mux", "task", "iopub", "notification", "broadcast")
CONTROLLER_PORTS = 18  # the controller and its schedulers listen on this many ports
CONTROLLER_TIMEOUT = 60.0  # s for the controller to write its connection files
# ipykernel 7 greets every subscriber of an engine's iopub socket (JEP 65's iopub_welcome, which
# ipyparallel 9 turns on by passing its session to IOPubThread); the controller's iopub relay
# subscribes with no topic, so the hub's monitor gets one greeting per engine without a topic
# and logs it as an ERROR it otherwise ignores.  Only those records are dropped.
QUIET_WELCOMES = (
    "import logging as _globular_logging\n"
    "_globular_logging.getLogger('IPController').addFilter(\n"
    "    lambda record: not (str(record.msg).startswith('Monitor message without topic')\n"
    '                        and \'"msg_type": "iopub_welcome"\' in repr(record.args))\n'
    ")\n"
)
CLUSTER_KEY = "globular_cluster"  # the client connection file's field that names its cluster


def connection_file_path(home: Path, cluster: str, region: str) -> Path:
    """``~/.globular/ipcluster/<cluster>-<region>.json``."""
    return home / "ipcluster" / f"{cluster}-{region}.json"


def forget_files(home: Path, cluster: str) -> None:
    """Remove this machine's client connection files of ``cluster`` (whatever its region: each
    names its cluster) and the notebook's beside them."""
    for path in (home / "ipcluster").glob(f"{glob.escape(cluster)}-*.json"):
        try:
            info = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(info, dict) and info.get(CLUSTER_KEY) == cluster:
            path.unlink(missing_ok=True)
            path.with_name(f"{path.stem}-notebook.json").unlink(missing_ok=True)


# In the connection file of a remote master, the controller's public key is kept under this name:
# ipyparallel's own Client would tunnel (the file names an ssh server) and give the tunnelled
# sockets no CURVE keys, so it would connect and then wait for ever; without the key its
# connection request fails at once ("Hub connection request timed out").  globular's Client and
# connection_info read it back.
SERVERKEY_FIELD = "globular_curve_serverkey"
NOTE_FIELD = "globular_note"
CURVE_NOTE = (
    "encrypted (CurveZMQ): connect with `from globular import Client`; ipyparallel's own Client "
    "gives the sockets it tunnels through ssh no CURVE keys (see globular's docs: connecting.md, 'Connecting from your laptop')"
)


def running_data(data: dict[str, Any], cluster: str) -> dict[str, Any]:
    """IPCluster's part of the record (``data``) of ``cluster``, whose controller must run."""
    if not data.get("connection_file"):
        raise GlobularError(f"no IPython controller is running on cluster {cluster!r}")
    return data


def record_data(record: ClusterRecord) -> dict[str, Any]:
    """IPCluster's part of ``record`` (empty when it has none)."""
    return record.plugin_data.get(DATA_KEY) or {}


def connection_info(data: dict[str, Any], cluster: str) -> dict[str, Any]:
    """The client connection file's content."""
    path = Path(running_data(data, cluster)["connection_file"])
    try:
        info: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        raise GlobularError(f"the connection file of cluster {cluster!r} is missing: {path}") from None
    except (OSError, ValueError) as exc:
        raise GlobularError(f"cannot read the connection file {path}: {exc}") from None
    return with_serverkey(info)


def with_serverkey(info: dict[str, Any]) -> dict[str, Any]:
    """A connection file's content as ipyparallel reads it: the controller's public key back
    under ``curve_serverkey`` (see SERVERKEY_FIELD); ``info`` itself is changed."""
    if info.get(SERVERKEY_FIELD):
        info["curve_serverkey"] = info.pop(SERVERKEY_FIELD)
    info.pop(NOTE_FIELD, None)
    return info


def controller_address(info: dict[str, Any]) -> str:
    """The address the controller listens on, from a connection file (its ``interface``; its
    ``location`` is the master's hostname, as ipcontroller writes it, for ipyparallel's Client)."""
    return str(info["interface"]).split("://", 1)[1]


async def reachable_info(
    runner: Runner, info: dict[str, Any], far: dict[int, tuple[str, int]] | None = None
) -> dict[str, Any]:
    """Client connection info that works from this machine.

    For a master this machine does not reach directly, each controller port is forwarded
    by the runner (through its SSH connection; through the node programs of a node entered
    by a command), so nothing but that has to be reachable.  ``far``: filled
    with each port here -> the controller's (host, port) it stands for.
    """
    if runner.direct:
        return info

    async def forward(host: str, port: int) -> int:
        local = (await runner.forward_port(host, port))[1]
        if far is not None:
            far[local] = (host, port)
        return local

    return await forwarded_info(info, forward)


async def forwarded_info(info: dict[str, Any], forward: Callable[[str, int], Awaitable[int]]) -> dict[str, Any]:
    """``info`` with each controller port forwarded to 127.0.0.1 by ``forward(host, port)``
    (which returns the local port), as ipyparallel's Client reads it: no ssh, no tunnel of its own."""
    address = controller_address(info)
    host = "127.0.0.1" if address in ("0.0.0.0", "*", "") else address  # as the ssh server sees it
    forwarded = dict(info, interface="tcp://127.0.0.1", location="127.0.0.1", ssh="")
    for key in PORT_KEYS:
        if key in info:
            forwarded[key] = await forward(host, int(info[key]))
    return forwarded


ANSWER_TIMEOUT = 10.0  # s a request of globular's own clients waits for the controller's answer


class ControllerSilent(GlobularError):
    """The controller took a request and gave no answer in time: frozen (SIGSTOP), overloaded,
    or gone behind a link that never says so."""


def answer_within(client: Any, seconds: float = ANSWER_TIMEOUT) -> Any:
    """``client``'s requests to the controller (``queue_status``, ``db_query``, ...) raise
    :class:`ControllerSilent` after ``seconds`` instead of waiting for ever, as ipyparallel's
    own wait does.  The answer is matched to its request by id on the client's IO thread, so one
    that comes late is dropped there and the next request is not confused.  For globular's own
    clients (top, status, start): a user's client, and a long ``db_query`` of theirs, are left as
    ipyparallel makes them."""

    def send_recv(*args: Any, **kwargs: Any) -> Any:
        future = client._send(*args, **kwargs)
        if not future.wait(seconds):
            raise ControllerSilent(f"the controller did not answer within {seconds:g} s (frozen, or unreachable)")
        return future.result()

    client._send_recv = send_recv
    return client


async def open_client(data: dict[str, Any], cluster: str, runner: Runner, timeout: float = 10.0) -> Client:
    """A Client for the controller of ``cluster`` (IPCluster's record part ``data``); ``runner``
    is the master's (its SSH connection carries the traffic when the master is remote).  Each
    request it makes waits at most :data:`ANSWER_TIMEOUT` for its answer."""
    from ipyparallel import Client

    info = await reachable_info(runner, connection_info(data, cluster))
    return answer_within(await in_thread(Client, info, timeout=timeout))


async def controller_ip(ctx: PluginContext, settings: IPClusterSettings) -> str:
    """Where the controller listens: ``controller_interface`` (a name or an address), else the master's address."""
    master = ctx.master
    wanted = settings.controller_interface
    if not wanted:
        return master.address
    if is_address(wanted):
        return wanted
    found: dict[str, str] = await ctx.runner(master).nodeproc("addresses", {})
    if wanted not in found:
        raise NodeError(
            master.name,
            f"controller_interface {wanted!r}: no such interface with an IPv4 address (has: {', '.join(sorted(found))})",
        )
    return found[wanted]


async def launch_controller(
    ctx: PluginContext, settings: IPClusterSettings, *, curve: bool
) -> tuple[list[ProcessRecord], dict[str, Any]]:
    """Start the controller with a key and registration port chosen here; return it and the
    engine connection info, which engines can use before the controller is up."""
    master = ctx.master
    runner = ctx.runner(master)
    security = f"{profile_dir(master)}/security"
    await runner.run(["rm", "-f", f"{security}/ipcontroller-client.json", f"{security}/ipcontroller-engine.json"])
    ip = await controller_ip(ctx, settings)
    ports, others = await controller_ports(runner, settings, ip)
    keyfile = f"{security}/globular-session.key"
    key = secrets.token_hex(32)
    await runner.write_file(keyfile, key.encode(), 0o600)
    # The controller's config file (0600) carries what other users of the node must not see or
    # use first: its ports (a command line is public) and, with CurveZMQ, its key pair, made here
    # for each start like the session key.  The session key stays too (ipyparallel drops it under
    # curve otherwise): clients and engines must both sign and know the server key.
    # The controller takes its engine ports in ENGINE_PORT_KEYS order, then the broadcast leaves.
    await userconfig.install(ctx, master, settings)  # the profile's ipcontroller_config.py, loaded first
    config = userconfig.controller_config_prefix(settings) + QUIET_WELCOMES
    config += f"c.IPController.engine_ports = {ports!r}\n"
    if others:
        config += f"c.IPController.ports = {others!r}\n"
    server_key = None
    if curve:
        import zmq

        public, secret = zmq.curve_keypair()
        server_key = public.decode("ascii")
        config += (
            f"c.IPController.curve_publickey = {public!r}\n"
            f"c.IPController.curve_secretkey = {secret!r}\n"
            "c.IPController.enable_curve = True\n"
            f"c.Session.key = {key.encode()!r}\n"
        )
    await asyncio.gather(
        runner.write_file(f"{profile_dir(master)}/ipcontroller_config.py", config.encode(), 0o600),
        runner.write_file(controller_script(master), CONTROLLER_SOURCE.encode(), 0o600),
    )
    argv = controller_argv(master, settings, ip, keyfile)
    env = {"IPYTHONDIR": ipython_dir(master), "GLOBULAR_CLUSTER": ctx.name}
    spec = await _supervised(runner, settings, ProcessSpec(argv=argv, log=f"{master.workdir}/logs/controller.log",
                                                           role=CONTROLLER, env=env, cwd=master.workdir))  # fmt: skip
    ctx.reporter.begin("controller", "controller on master", 1)
    procs = await runner.spawn([spec])
    ctx.track(master, procs)
    packer = settings.packer_spec
    engine_info = {
        "key": key,
        "signature_scheme": "hmac-sha256",
        "interface": f"tcp://{ip}",
        "location": ip,  # the engines' copy, written before the controller writes its own (with its hostname)
        **dict(zip(ENGINE_PORT_KEYS, ports)),
        "broadcast": ports[len(ENGINE_PORT_KEYS) :],
        "pack": packer.pack,
        "unpack": packer.unpack,
        "ssh": "",
        "curve_serverkey": server_key,
    }
    return procs, engine_info


async def controller_ports(runner: Runner, settings: IPClusterSettings, ip: str) -> tuple[list[int], list[int]]:
    """Free ports on the master's ``ip``: the engines' (in ENGINE_PORT_KEYS order, then the
    broadcast leaves), and the rest of ``controller_ports`` for the controller's clients."""
    allowed = settings.allowed_ports
    wanted = len(ENGINE_PORT_KEYS) + BROADCAST_LEAVES
    if allowed:  # every free port of the range: the engines' first, the rest for the controller's clients
        free: list[int] = await runner.nodeproc("free_ports", {"ip": ip, "ports": allowed, "count": len(allowed)})
        if len(free) < CONTROLLER_PORTS:
            raise NodeError(
                runner.node.name,
                f"only {len(free)} of the {len(allowed)} ports of controller_ports = {settings.controller_ports} "
                f"are free on {ip}; the controller needs {CONTROLLER_PORTS} (other programs hold the rest)",
            )
        return free[:wanted], free[wanted:]
    ports: list[int] = await runner.nodeproc("free_ports", {"ip": ip, "ports": None, "count": wanted})
    if len(ports) < wanted:
        raise NodeError(runner.node.name, f"not enough free ports on {ip} for the controller")
    return ports, []


CONTROLLER_SOURCE = source("ipcontroller")


def controller_script(master: NodeRecord) -> str:
    """Where the controller's program is written on the master: a file, not ``-c``, so that
    ``ps`` shows ``python .../run/ipcontroller.py ARGS``, not its source."""
    return f"{master.workdir}/run/ipcontroller.py"


def controller_argv(master: NodeRecord, settings: IPClusterSettings, ip: str, keyfile: str) -> list[str]:
    packer = settings.packer_spec
    return [
        master.python,
        controller_script(master),  # python -m ipyparallel.controller, that stops faster (node/ipcontroller.py)
        f"--profile-dir={profile_dir(master)}",
        f"--ip={ip}",
        f"--HeartMonitor.period={settings.heartbeat_period}",
        f"--HeartMonitor.max_heartmonitor_misses={heartbeat_misses(settings.heartbeat_period)}",
        f"--Session.packer={packer.pack}",
        f"--Session.unpacker={packer.unpack}",
        f"--Session.keyfile={keyfile}",  # the key itself never on a command line
        f"--IPController.broadcast_scheduler_depth={BROADCAST_DEPTH}",
    ]


async def _supervised(runner: Runner, settings: IPClusterSettings, spec: ProcessSpec) -> ProcessSpec:
    """With ``restart_dead_engines``, the controller too is brought back if it dies: on the same
    ports, with the same keys (its config and key files stay), restoring its engines' state, so
    the engines keep their ids.  The supervisor stands for it: stopping it stops the controller."""
    if not settings.restart_dead_engines:
        return spec
    master = runner.node
    request = f"{master.workdir}/run/controller-supervisor.json"
    plan = {"engines": [{"argv": spec.argv, "log": spec.log}], "restart_id_arg": "--IPEngine.id=",
            "restart_args": ["--restore"]}  # fmt: skip
    await runner.write_file(request, json.dumps(plan).encode(), 0o600)
    return ProcessSpec(
        argv=[master.python, "-c", SUPERVISOR_SOURCE, request],
        log=f"{master.workdir}/logs/controller-supervisor.log",
        role=CONTROLLER,
        env=spec.env,
        cwd=master.workdir,
    )


async def controller_ready(
    ctx: PluginContext, settings: IPClusterSettings, procs: list[ProcessRecord], expected: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Wait for the controller's connection files; check it took the key and ports it was given."""
    master = ctx.master
    security = f"{profile_dir(master)}/security"
    files = [f"{security}/ipcontroller-client.json", f"{security}/ipcontroller-engine.json"]
    found = await ctx.runner(master).wait_files(files, watch=procs, timeout=CONTROLLER_TIMEOUT)
    client_info, engine_info = found[files[0]], found[files[1]]
    for key in ("key", "signature_scheme", "pack", "unpack", "curve_serverkey", *ENGINE_PORT_KEYS, "broadcast"):
        if engine_info.get(key) != expected[key]:
            raise NodeError(
                master.name, f"the controller did not take the {key} it was given; this ipyparallel is not supported"
            )
    allowed = settings.allowed_ports
    if allowed:
        keys = (*PORT_KEYS, "hb_ping", "hb_pong")
        taken = {info[k] for info in (client_info, engine_info) for k in keys if isinstance(info.get(k), int)}
        outside = sorted(taken - set(allowed))
        if outside:
            raise NodeError(
                master.name,
                f"the controller took ports {outside} outside controller_ports = {settings.controller_ports}; widen the range",
            )
    # Client(path) from this machine tunnels through ssh to the master by itself; the file
    # names its cluster, whose record globular's Client reads for the key and known_hosts
    client_info["ssh"] = master.login or ""
    client_info[CLUSTER_KEY] = ctx.name
    if master.login and client_info.get("curve_serverkey"):
        client_info[SERVERKEY_FIELD] = client_info.pop("curve_serverkey")
        client_info[NOTE_FIELD] = CURVE_NOTE
    ctx.reporter.advance("controller")
    ctx.reporter.end("controller")
    return client_info, engine_info
