"""IPCluster's engines: started (alone or under a supervisor), waited for until they
register, identified by node, retired and stopped by pid."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

from globular.errors import GlobularError, NodeError
from globular.fanout import each_node
from globular.ipcluster import userconfig
from globular.ipcluster.gpus import ENGINE_GPUS, assign, gpu_env, gpu_table, held, node_devices
from globular.ipcluster.node import source
from globular.ipcluster.roles import DATA_KEY, ENGINE, SUPERVISOR, ipython_dir
from globular.ipcluster.settings import IPClusterSettings, engine_heartbeat_misses
from globular.ipcluster.userconfig import engine_arguments
from globular.plugins.base import PluginContext
from globular.providers.base import ProcessSpec, Runner
from globular.state import NodeRecord, ProcessRecord

if TYPE_CHECKING:
    from ipyparallel import Client


log = logging.getLogger(__name__)
SUPERVISOR_SOURCE = source("supervisor")
# read, not imported: it imports ipyparallel, which globular loads only when it needs a client
FORKSTART_SOURCE = source("forkstart")
ENGINE_MODULE = ["-m", "ipyparallel.engine"]  # an engine's argv: python, these, its arguments
ENGINE_RETRIES = 2  # times an engine that dies before registering is started again
RETIRE_GRACE = 3.0  # s the engines asked to shut down get before they are stopped by pid
ENGINE_REGISTRATION_TIMEOUT = 60  # s an engine waits for the controller's answer (it may start first)


def claim_engine_ids(ctx: PluginContext, node: NodeRecord, count: int, floor: int = 0) -> list[int]:
    """The next ``count`` engine ids, recorded as ``node``'s.

    Each engine asks the controller for its id, so the record knows which node
    an id runs on without asking the engine.  ``floor``: ids below it are taken.
    """
    data = ctx.plugin_data(DATA_KEY)
    first = max(data.get("next_engine_id", 0), floor)
    data["next_engine_id"] = first + count
    mapping = data.setdefault("engine_ids", {})
    ids = list(range(first, first + count))
    mapping.update({str(i): node.name for i in ids})
    return ids


def engine_file(node: NodeRecord) -> str:
    """The engines' connection file on ``node`` (0600)."""
    return f"{node.workdir}/security/ipcontroller-engine.json"


def engine_env(ctx: PluginContext, node: NodeRecord, settings: IPClusterSettings) -> dict[str, str]:
    return {
        "OMP_NUM_THREADS": "1",
        **settings.engine_env,
        "GLOBULAR_CLUSTER": ctx.name,
        "GLOBULAR_NODE": node.name,
        "IPYTHONDIR": ipython_dir(node),
    }


def engine_spec(
    ctx: PluginContext, node: NodeRecord, engine_id: int, settings: IPClusterSettings, gpu: str | None = None
) -> ProcessSpec:
    """How engine ``engine_id`` of ``node`` is started (it asks the controller for that id),
    pinned to GPU ``gpu`` (a UUID) under ``gpu_engines``."""
    return ProcessSpec(
        argv=[
            node.python,
            *ENGINE_MODULE,
            f"--file={engine_file(node)}",
            f"--IPEngine.id={engine_id}",
            f"--IPEngine.timeout={ENGINE_REGISTRATION_TIMEOUT}",
            f"--IPEngine.enable_nanny={settings.engine_nanny}",
            f"--IPEngine.max_heartbeat_misses={engine_heartbeat_misses(settings.heartbeat_period)}",
            *engine_arguments(node, settings),
        ],
        log=f"{node.workdir}/logs/engine-{engine_id}.log",
        role=ENGINE,
        env=engine_env(ctx, node, settings) | gpu_env(settings, gpu),
        cwd=settings.engine_workdir or node.workdir,
        ident=str(engine_id),
    )


def own_env(engine: ProcessSpec, common: dict[str, str]) -> dict[str, str]:
    """What of ``engine``'s environment differs from the one its starter runs with (its GPU)."""
    return {k: v for k, v in (engine.env or {}).items() if common.get(k) != v}


async def start_engines(
    ctx: PluginContext,
    node: NodeRecord,
    count: int,
    engine_info: dict[str, Any],
    settings: IPClusterSettings,
    *,
    floor: int = 0,
) -> dict[int, str]:
    """Write the engine connection file (0600) on ``node`` and start ``count`` engines: id → node.

    With ``restart_dead_engines``, one supervisor process starts them and restarts any that dies
    (the record tracks the supervisor; its engines are its children, stopped with it).  Else,
    with ``engine_fork``, they are forked from one interpreter (:func:`fork_engines`), even one
    engine (its nanny is forked, not a second Python; the engine exits faster, see forkstart);
    else each is its own ``python -m ipyparallel.engine``.
    """
    if count <= 0:
        return {}
    # the ids are claimed before the first await: nodes started together (in the record's
    # order, the master first) get theirs in that order, whichever node answers first
    ids = claim_engine_ids(ctx, node, count, floor)
    data = ctx.plugin_data(DATA_KEY)
    gpu_of = assign(ids, node_devices(data, node.name)) if settings.wants_gpus else {}
    if gpu_of:  # which engine holds which GPU, as they are given
        data[ENGINE_GPUS] = {**gpu_table(data), **{str(i): uuid for i, uuid in gpu_of.items() if uuid}}
        data.pop("gpu_engines", None)
    runner = ctx.runner(node)
    await runner.write_file(engine_file(node), json.dumps(engine_info).encode(), 0o600)
    await userconfig.install(ctx, node, settings)
    env = engine_env(ctx, node, settings)
    engines = [engine_spec(ctx, node, engine_id, settings, gpu_of.get(engine_id)) for engine_id in ids]
    if settings.restart_dead_engines:
        request = f"{node.workdir}/run/engines-{ids[0]}.json"
        plan = {
            "engines": [{"argv": e.argv, "log": e.log, "env": own_env(e, env)} for e in engines],
            "restart_id_arg": "--IPEngine.id=",
        }
        await runner.write_file(request, json.dumps(plan).encode(), 0o600)
        supervised = ProcessSpec(
            argv=[node.python, "-c", SUPERVISOR_SOURCE, request],
            log=f"{node.workdir}/logs/supervisor-{ids[0]}.log",
            role=SUPERVISOR,
            env=env,
            cwd=settings.engine_workdir or node.workdir,
        )
        started = await runner.spawn([supervised])
    elif settings.engine_fork:
        started = await fork_engines(runner, node, engines, ids[0], env, settings)
    else:
        started = await runner.spawn(engines)
    ctx.track(node, started)
    ctx.node_step(node, "engines")
    return {i: node.name for i in ids}


async def fork_engines(
    runner: Runner, node: NodeRecord, engines: list[ProcessSpec], first: int, env: dict[str, str],
    settings: IPClusterSettings,
) -> list[ProcessRecord]:  # fmt: skip
    """Start ``engines`` (ids ``first``, ...) forked from one interpreter on ``node`` (see
    :mod:`~globular.ipcluster.node.forkstart`); their records, by pid and start time."""
    # names of this start's own: a file of an earlier engine set (stopped, then started again
    # with the same first id) must never be read as this one's pids
    tag = f"{first}-{secrets.token_hex(4)}"
    request, out = f"{node.workdir}/run/engines-{tag}.json", f"{node.workdir}/run/engines-{tag}.pids.json"
    plan = {
        "engines": [{"args": e.argv[1 + len(ENGINE_MODULE) :], "log": e.log, "env": own_env(e, env)} for e in engines],
        "nanny": settings.engine_nanny,
        "out": out,
    }
    script = f"{node.workdir}/run/forkstart.py"  # a file, not -c: ps shows the engines as forkstart.py
    await runner.write_file(script, FORKSTART_SOURCE.encode(), 0o600)
    await runner.write_file(request, json.dumps(plan).encode(), 0o600)
    [starter] = await runner.spawn(
        [
            ProcessSpec(
                argv=[node.python, script, request],
                log=f"{node.workdir}/logs/forkstart-{first}.log",
                role="forkstart",  # not recorded: the engines' parent, it exits with the last of them
                env=env,
                cwd=settings.engine_workdir or node.workdir,
            )
        ]
    )
    try:
        started = (await runner.wait_files([out], watch=[starter], timeout=ENGINE_REGISTRATION_TIMEOUT))[out]
    except BaseException:
        await runner.stop([starter], timeout=5)  # and the engines it forked: its children
        raise
    return [
        ProcessRecord(pid=p["pid"], start=p["start"], role=ENGINE, log=e.log, ident=e.ident)
        for p, e in zip(started, engines)
    ]


async def restart_engine(
    ctx: PluginContext, node: NodeRecord, engine_id: int, settings: IPClusterSettings
) -> list[ProcessRecord]:
    """Start engine ``engine_id`` of ``node`` again, the way its node's engines start (forked,
    or its own Python); its records."""
    gpu = held(ctx.plugin_data(DATA_KEY), [engine_id]).get(engine_id)
    spec = engine_spec(ctx, node, engine_id, settings, gpu)
    runner = ctx.runner(node)
    if settings.engine_fork:
        return await fork_engines(runner, node, [spec], engine_id, spec.env, settings)
    return await runner.spawn([spec])


def engine_processes(node: NodeRecord) -> list[ProcessRecord]:
    """The processes that stand for ``node``'s engines: the engines, or their supervisors."""
    return node.processes_with_role(ENGINE) + node.processes_with_role(SUPERVISOR)


async def stop_engines(ctx: PluginContext, node: NodeRecord) -> int:
    engines = engine_processes(node)
    await ctx.stop_processes(node, engines)
    return len(engines)


async def check_engines_alive(
    ctx: PluginContext,
    nodes: list[NodeRecord],
    *,
    settings: IPClusterSettings | None = None,
    registered: set[int] | frozenset[int] = frozenset(),
    retried: Counter[int] | None = None,
) -> None:
    """Raise NodeError (with the engine's log) if an engine process has died.

    With ``settings``, an engine that died before it registered is started again, at most
    ENGINE_RETRIES times (a node that was briefly out of memory, a slow disk), before that
    counts as the failure."""
    retried = retried if retried is not None else Counter()

    async def check(node: NodeRecord) -> None:
        engines = engine_processes(node)
        runner = ctx.runner(node)
        for proc, alive in zip(engines, await runner.alive(engines)):
            if alive:
                continue
            engine_id = int(proc.ident) if proc.role == ENGINE and proc.ident else None  # as recorded
            retry = settings is not None and engine_id is not None and engine_id not in registered
            if retry and settings is not None and engine_id is not None and retried[engine_id] < ENGINE_RETRIES:
                retried[engine_id] += 1
                log.warning("%s: engine %d died before it registered; starting it again", node.name, engine_id)
                await ctx.stop_processes(node, [proc])  # forget it (and whatever it left)
                ctx.track(node, await restart_engine(ctx, node, engine_id, settings))
                continue
            tail = await runner.tail(proc.log) if proc.log else ""
            what = "engine" if proc.role == ENGINE else "engine supervisor"
            tries = f" (started {retried[engine_id] + 1} times)" if engine_id is not None and retried[engine_id] else ""
            raise NodeError(node.name, f"{what} (pid {proc.pid}) exited{tries}; its log ({proc.log}) ends:", tail)

    await each_node(nodes, check)


def engine_node() -> str:
    """Run on an engine: the node it runs on."""
    import os

    return os.environ.get("GLOBULAR_NODE", "?")


engine_node.__module__ = "__main__"  # sent by value: nodes need not have globular installed


async def ask_engine_nodes(client: Client, ids: set[int]) -> dict[int, str]:
    """Which node each engine of ``ids`` runs on, asked of the engines themselves."""
    targets = sorted(ids)
    result = client[targets].apply_async(engine_node)
    return dict(zip(targets, await asyncio.to_thread(result.get, 30)))


async def wait_for_engines(
    ctx: PluginContext,
    client: Client,
    *,
    wanted: dict[int, str],
    gone: set[int] = frozenset(),  # type: ignore[assignment]
    nodes: list[NodeRecord],
    timeout: float,
    key: str = "engines",
    description: str = "engines registered",
    settings: IPClusterSettings | None = None,
) -> set[int]:
    """Wait until the engines of ``wanted`` (id → node) registered and every id in ``gone`` left.

    An engine registers under the id it asked for; if the controller gave it
    another one (a foreign engine held it), the unknown id is identified by
    asking the engine.  Checks every second that the engine processes on
    ``nodes`` are alive, so a crashing engine fails at once with its log, not
    at the timeout.  Returns the ids now registered for the nodes of ``wanted``.
    """
    data = ctx.plugin_data(DATA_KEY)
    mapping: dict[str, str] = data.setdefault("engine_ids", {})
    need = Counter(wanted.values())
    reporter = ctx.reporter
    reporter.begin(key, description, len(wanted))
    unknown = {i for i in client.ids if str(i) not in mapping}  # foreign engines, there before us
    # engines registered before this wait that it does not wait for (a node's engines that kept
    # running while others of it start again) are not counted among the new
    earlier = {i for i in client.ids if i not in wanted}
    registered: set[str] = set()
    retried: Counter[int] = Counter()
    deadline = time.monotonic() + timeout
    next_check = time.monotonic() + 1.0
    while True:
        ids = set(client.ids)
        strays = {i for i in ids - unknown if str(i) not in mapping}
        if strays:
            unknown |= strays
            mapping.update({str(i): n for i, n in (await ask_engine_nodes(client, strays)).items() if n in need})
        mine = {i for i in ids - earlier if mapping.get(str(i)) in need}
        have = Counter(mapping[str(i)] for i in mine)
        done = sum(min(have[n], count) for n, count in need.items())
        for name, count in need.items():
            if have[name] >= count and name not in registered:
                registered.add(name)
                node = next((n for n in ctx.nodes if n.name == name), None)
                if node is not None:
                    ctx.node_step(node, "registered")
        reporter.set(key, done)
        if done >= len(wanted) and not ids & gone:
            reporter.end(key)
            # ids asked for but given to nobody (the controller chose others) are dropped
            for engine_id, owner in list(mapping.items()):
                if owner in need and int(engine_id) not in ids:
                    del mapping[engine_id]
            data["engines"] = len(mapping)
            ctx.save()
            return mine
        now = time.monotonic()
        if now >= deadline:
            if done >= len(wanted):
                raise GlobularError(f"engines {sorted(ids & gone)} did not leave within {timeout:g}s")
            lagging = sorted(n for n, c in need.items() if have[n] < c)
            short = ", ".join(f"{n} {have[n]} of {need[n]}" for n in lagging)
            first = next((n for n in ctx.nodes if n.name == lagging[0]), None)
            waited = [i for i, n in wanted.items() if n == lagging[0] and i not in ids]
            log_path = f"{first.workdir}/logs/engine-{waited[0]}.log" if first and waited else ""
            tail = await ctx.runner(first).tail(log_path) if first and log_path else ""
            raise NodeError(
                lagging[0],
                f"only {done} of {len(wanted)} engines registered within {timeout:g}s ({short}); "
                f"the log of one that did not ({log_path}) ends:",
                tail,
            )
        if now >= next_check:
            await check_engines_alive(ctx, nodes, settings=settings, registered=mine | earlier, retried=retried)
            if done < len(wanted) or ids & gone:
                await asyncio.to_thread(refresh_engine_list, client, set(wanted), set(gone))
            next_check = now + 1.0
        await asyncio.sleep(0.05)


def refresh_engine_list(client: Client, expected: set[int], gone: set[int]) -> None:
    """Ask the controller again which engines it has; tell the client of those of ``expected``
    it missed, and of those of ``gone`` that left without it hearing.

    ipyparallel's Client asks once (``connection_request``, in ``_connect``) and then
    follows the controller's notifications; one published before its notification
    socket has connected (a fresh client, a slow CURVE handshake) is lost, so an engine
    that registered is never seen, or one that left is never dropped.  Asking again
    (the same request) closes the gap.  The answer and the notifications travel on
    different sockets, so only ids we wait for are added (an engine that has just
    left may still be in an answer sent before it left), and only ids that must go
    are dropped (no id comes back once it has left).  The changes are made on the
    client's own IO thread, where its notification handlers run.
    """
    reply = client._send_recv(client._query_stream, "connection_request")
    content = reply["content"]
    if content.get("status") != "ok":
        return
    there = {int(k): v for k, v in content["engines"].items()}
    known = set(client.ids)
    missed = {k: v for k, v in there.items() if k in expected and k not in known}
    if missed:
        client._io_loop.add_callback(client._update_engines, missed)
    for engine_id in sorted((gone & known) - set(there)):
        client._io_loop.add_callback(client._unregister_engine, {"content": {"id": engine_id}})


def engine_ids_on(ctx: PluginContext, nodes: list[NodeRecord]) -> set[int]:
    names = {n.name for n in nodes}
    mapping = ctx.plugin_data(DATA_KEY).get("engine_ids", {})
    return {int(i) for i, node in mapping.items() if node in names}


def unregister_engines(client: Client, ids: set[int]) -> None:
    """Tell the controller that engines ``ids`` are gone with their node (lost: a job ended, a
    host cut off): ipyparallel's own ``unregistration_request``, the message an engine sends
    as it leaves.  The controller drops them at once, and its scheduler fails their tasks (or
    runs them again, with ``retries``) and sends them no more, instead of doing so only after
    its heartbeat window."""

    def send() -> None:  # on the client's IO thread, where its sockets are used
        for engine_id in sorted(ids):
            client.session.send(client._query_stream, "unregistration_request", content={"id": engine_id})

    client._io_loop.add_callback(send)


async def retire_engines(
    ctx: PluginContext, client: Client, nodes: list[NodeRecord], *, lost: bool = False
) -> set[int]:
    """Ask the controller to shut down the engines of ``nodes`` (so they unregister
    at once), then stop their processes by pid whatever they did.  ``lost``: the nodes are
    lost, nothing there answers: the controller is told they are gone
    (:func:`unregister_engines`), and their processes are stopped, or found gone, as the nodes
    are released."""
    recorded = engine_ids_on(ctx, nodes)
    ids = recorded & set(client.ids)
    if ids:
        try:
            if lost:
                await asyncio.to_thread(unregister_engines, client, ids)
            else:
                client.shutdown(targets=sorted(ids), block=False)
        except Exception as exc:  # noqa: BLE001 - a controller that cannot relay it: the pids are stopped anyway
            log.info("%s: the controller did not relay the shutdown of engines %s: %s", ctx.name, sorted(ids), exc)
        else:
            # An engine that shuts down on request unregisters at once; one stopped by a signal
            # first is dropped only after the controller's heartbeat window (8 s).  Give the
            # request its moment, then stop by pid whatever happened.
            deadline = time.monotonic() + RETIRE_GRACE
            next_ask = time.monotonic() + 0.5
            while ids & set(client.ids) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                if time.monotonic() >= next_ask:  # a notice of their leaving may have been missed
                    await asyncio.to_thread(refresh_engine_list, client, set(), ids)
                    next_ask = time.monotonic() + 0.5
    if not lost:
        await each_node(nodes, lambda node: stop_engines(ctx, node))
    data = ctx.plugin_data(DATA_KEY)
    mapping = data.setdefault("engine_ids", {})
    for engine_id in recorded:
        mapping.pop(str(engine_id), None)
    data["engines"] = len(mapping)
    ctx.save()
    return ids
