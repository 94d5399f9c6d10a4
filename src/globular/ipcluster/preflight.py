"""Preflight: before any engine starts, ask every node (at once, bounded) whether it can run one.

Per node: its Python runs and is the same major.minor as here (functions travel by
value), ipyparallel is installed with a version compatible with the local one,
the modules the settings need are there (msgpack for ``packer = msgpack``,
jupyterlab on the master for the notebook), how many cores are free, and whether
the node can open a connection to the controller's address (a stand-in listener
on the master, on a port the controller could use).  Problems fail the check;
warnings (a different minor version, more engines than free cores) do not.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.metadata
import ipaddress
import json
import logging
import sys
from dataclasses import dataclass, field
from typing import Any

from globular.errors import GlobularError
from globular.ipcluster.gpus import judge_gpus
from globular.ipcluster.roles import DATA_KEY
from globular.ipcluster.settings import IPClusterSettings, engines_for
from globular.plugins.base import NodeCheck, PluginContext
from globular.providers.base import NODE_SOURCE, ProcessSpec
from globular.state import NodeRecord, ProcessRecord

log = logging.getLogger(__name__)

CHECK_TIMEOUT = 30.0


@dataclass(frozen=True)
class Requirement:
    """A module the nodes need: ``compare`` its version with ours; ``load`` it for real
    (cheap modules: a broken install shows), else read its metadata only; ``need``
    says who needs it, for the message."""

    module: str
    compare: bool = False
    load: bool = False
    need: str = ""
    fix: str = ""  # how to get it, when it is not installed (else: pip install it on every node)


# asked of each node's Python in the preflight's one round trip (the node programs know no pyzmq)
CURVE_QUESTION = "import zmq\nanswer = bool(zmq.has('curve'))\n"
ANSWERS_FILE = "globular-preflight.json"


def answers_file(node: NodeRecord) -> str | None:
    """Where the node's managed environment keeps what its Python answered the preflight: its
    modules and a plugin's questions do not change while it exists (it is made once, under a
    name that is the digest of its packages, and never changed).  None for a Python globular
    did not make.  With the answers kept, a later start asks only the node's own facts, which
    the helper already running answers: no second Python on the node."""
    env = node.data.get("env") or {}
    if not env.get("root") or not env.get("name"):
        return None
    return f"{env['root']}/{env['name']}/{ANSWERS_FILE}"


def answers_key(request: dict[str, Any]) -> str:
    """The questions of a preflight request (modules, modules loaded, plugin questions), as a key."""
    asked = [sorted(request["modules"]), sorted(request["load"]), request["questions"]]
    return hashlib.sha256(json.dumps(asked, sort_keys=True).encode()).hexdigest()[:16]


def local_version(module: str) -> str | None:
    try:
        return importlib.metadata.version(module)
    except importlib.metadata.PackageNotFoundError:
        return None


def _major_minor(version: str | None) -> tuple[int, ...]:
    parts = []
    for piece in (version or "").split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def judge(check: NodeCheck, facts: dict[str, Any], wanted: list[Requirement]) -> None:
    """Fill ``check`` from the node's ``facts``."""
    here = ".".join(map(str, sys.version_info[:2]))
    check.python = facts["python"]
    there = ".".join(facts["python"].split(".")[:2])
    if there != here:
        check.problems.append(
            f"Python {facts['python']} at {facts['executable']}, {here} here: functions sent from here would not run there"
        )
    for req in wanted:
        found = facts["modules"].get(req.module, {})
        if found.get("error") == "not installed" and req.fix:
            check.modules[req.module] = None
            check.problems.append(f"{req.module} is not installed for {facts['executable']}; {req.fix}")
            continue
        if "error" in found:
            check.modules[req.module] = None
            check.problems.append(
                f"{req.need + ' needs the ' + req.module + ' package, which' if req.need else req.module + ' is not usable:'} "
                f"{facts['executable']} cannot import ({found['error']}); install it on every node (pip install {req.module})"
            )
            continue
        version = found.get("version")
        check.modules[req.module] = version
        ours = local_version(req.module)
        if not req.compare or not version or not ours:
            continue
        if _major_minor(version)[:1] != _major_minor(ours)[:1]:
            check.problems.append(
                f"{req.module} {version} there, {ours} here: major versions differ (install {ours} there)"
            )
        elif _major_minor(version) != _major_minor(ours):
            check.warnings.append(f"{req.module} {version} there, {ours} here")
    check.cpus = facts["cpus"]
    check.load = round(facts["load"][0], 2)
    if check.engines > facts["cpus"]:
        check.warnings.append(f"{check.engines} engines for {facts['cpus']} cores: they will share them")
    elif facts["load"][0] >= facts["cpus"] and check.engines:
        check.warnings.append(
            f"the node is busy (its load is at least its {facts['cpus']} cores): engines will share it"
        )


@dataclass
class Questions:
    """What the preflight asks of every node (and of the master alone)."""

    modules: list[Requirement]
    master_modules: list[Requirement]
    engines: dict[str, int]  # node -> the engines it is to run
    controller_ip: str | None  # where the controller will listen (a stand-in listens there first)
    port_candidates: list[int] | None
    curve: bool = False  # does its pyzmq have CURVE?
    master_folders: dict[str, str] = field(default_factory=dict)  # setting -> a folder the master makes
    gpu_settings: IPClusterSettings | None = None  # gpu_engines set: its GPUs, judged
    timeout: float = CHECK_TIMEOUT

    def request(self, node: NodeRecord) -> dict[str, Any]:
        """What ``node`` is asked (``facts``/``node_facts``)."""
        wanted = self.wanted(node)
        return {
            "modules": [r.module for r in wanted],
            "load": [r.module for r in wanted if r.load],
            "questions": {"curve": CURVE_QUESTION} if self.curve else {},
            "folders": list(self.master_folders.values()) if node.is_master else [],
            "gpus": self.gpu_settings is not None,
        }

    def wanted(self, node: NodeRecord) -> list[Requirement]:
        return self.modules + (self.master_modules if node.is_master else [])


async def run_preflight(ctx: PluginContext, nodes: list[NodeRecord], questions: Questions) -> list[NodeCheck]:
    """Check ``nodes``; returns a NodeCheck per node (raise nothing: the caller decides).

    With ``gpu_settings`` (``gpu_engines`` set), each node's GPUs are asked for in the same round
    trip, judged, and the ones its engines get kept in the record (``gpus``, by node)."""
    return await Preflight(ctx, nodes, questions).run()


class Preflight:
    """One preflight round: a stand-in controller on the master, each node asked at once."""

    def __init__(self, ctx: PluginContext, nodes: list[NodeRecord], questions: Questions):
        self.ctx, self.nodes, self.q = ctx, nodes, questions
        self.checks = {
            n.name: NodeCheck(node=n.name, address=n.address, engines=questions.engines.get(n.name, 0)) for n in nodes
        }
        self.port: int | None = None  # where the stand-in listens

    async def run(self) -> list[NodeCheck]:
        ctx, master = self.ctx, self.ctx.master
        ctx.reporter.begin("preflight", "preflight checks (nodes)", len(self.nodes))
        listener: list[ProcessRecord] = []
        try:
            listener = await self._listen()
            async with asyncio.timeout(self.q.timeout + 10):
                await asyncio.gather(*(self._check(n) for n in self.nodes))
        except TimeoutError:
            for check in self.checks.values():
                if check.python is None and not check.problems:
                    check.problems.append(f"no answer within {self.q.timeout:g}s")
        finally:
            if listener:
                await ctx.stop_processes(master, listener)
            ctx.reporter.end("preflight")
        return [self.checks[n.name] for n in self.nodes]

    async def _listen(self) -> list[ProcessRecord]:
        """A stand-in controller on the master's controller address, on a free port, for the
        nodes to reach; none when every node is the master's loopback (nothing to learn)."""
        master, ip = self.ctx.master, self.q.controller_ip
        if ip is None or (
            ipaddress.ip_address(ip).is_loopback
            and all(n.address == master.address and n.login == master.login for n in self.nodes)
        ):
            return []
        runner = self.ctx.runner(master)
        free = await runner.nodeproc("free_ports", {"ip": ip, "ports": self.q.port_candidates, "count": 1})
        if not free:
            for check in self.checks.values():
                check.problems.append(f"no free port on the master's {ip} for the controller")
            return []
        self.port = free[0]
        request = {"ip": ip, "port": self.port, "seconds": self.q.timeout + 5}
        spec = ProcessSpec(
            argv=[master.python, "-c", NODE_SOURCE, "listen", json.dumps(request)],
            log=f"{master.workdir}/logs/preflight-listener.log",
            role="preflight-listener",
            cwd=master.workdir,
        )
        listener = await runner.spawn([spec])
        self.ctx.track(master, listener)
        return listener

    async def _check(self, node: NodeRecord) -> None:
        check = self.checks[node.name]
        request = self.q.request(node)
        kept, key = answers_file(node), answers_key(request)
        try:
            facts, known = await self._facts(node, request, kept, key)
        except GlobularError as exc:
            check.problems.append(str(exc).removeprefix(f"{node.name}: "))
            return
        self._judge(node, check, facts)
        if self.port is not None:
            await self._reach(node, check)
        if known is not None and kept is not None and not check.problems:  # a good answer, kept for the next start
            known[key] = {k: facts[k] for k in ("python", "modules", "answers")}
            try:
                await self.ctx.runner(node).write_file(kept, json.dumps(known).encode(), 0o644)
            except GlobularError as exc:  # not kept (a read-only environment): asked again next time
                log.info("%s: the preflight's answers are not kept in %s: %s", node.name, kept, exc)
        self.ctx.reporter.advance("preflight")

    async def _facts(
        self, node: NodeRecord, request: dict[str, Any], kept: str | None, key: str
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """The node's answers, and the kept answers to add this one to (None: nothing new to
        keep).  Its environment's answers to these questions are kept beside it: asked once."""
        runner, timeout = self.ctx.runner(node), self.q.timeout
        known: dict[str, Any] = {}
        if kept is not None:
            found = await runner.nodeproc("read_json", {"path": kept}, timeout=timeout)
            known = found if isinstance(found, dict) else {}
        if isinstance(known.get(key), dict):  # this environment answered these questions before
            facts: dict[str, Any] = await runner.nodeproc("node_facts", request, timeout=timeout)
            return facts | {**known[key], "executable": node.python}, None
        facts = await runner.nodeproc("facts", request, timeout=timeout)
        return facts, known

    def _judge(self, node: NodeRecord, check: NodeCheck, facts: dict[str, Any]) -> None:
        gpu_settings = self.q.gpu_settings
        if gpu_settings is not None:
            devices, gpu_problems = judge_gpus(facts.get("gpus"), gpu_settings, node.cores)
            check.problems += gpu_problems
            check.gpus = [d["uuid"] for d in devices]
            check.engines = engines_for(node, gpu_settings, len(devices))
            self.ctx.plugin_data(DATA_KEY).setdefault("gpus", {})[node.name] = devices
        judge(check, facts, self.q.wanted(node))
        for setting, path in self.q.master_folders.items() if node.is_master else ():
            if path in facts.get("not_folders", []):
                check.problems.append(f"{setting} {path} exists and is not a folder")
        answer = facts.get("answers", {}).get("curve")
        if self.q.curve and answer is not True:
            why = answer or "zmq.has('curve') is False: its libzmq was built without CURVE"
            check.problems.append(
                f"encryption = curve needs pyzmq with CURVE support, which {facts['executable']} lacks ({why}); "
                "install pyzmq's wheel there (pip install pyzmq), or set encryption = none"
            )

    async def _reach(self, node: NodeRecord, check: NodeCheck) -> None:
        """Can ``node`` reach the stand-in controller?"""
        host, reply = self.q.controller_ip, {}
        for _ in range(100):  # the listener may still be starting (a Python's start: ~0.1 s)
            request = {"host": host, "port": self.port, "timeout": 3}
            reply = await self.ctx.runner(node).nodeproc("connect", request, timeout=self.q.timeout)
            if reply["ok"] or reply.get("error") not in ("Connection refused", None):
                break
            await asyncio.sleep(0.02)
        check.controller_reachable = reply["ok"]
        if not reply["ok"]:
            check.problems.append(f"cannot reach the controller's address {host}:{self.port} ({reply.get('error')})")
