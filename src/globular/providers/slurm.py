"""The ``slurm`` provider: a node is a Slurm job on one compute node.

Each node is its own job (``sbatch --nodes=1 --ntasks=1``), so nodes come and go
independently: ``addnode`` submits one more job and never waits for a big block,
``removenode`` cancels one.  The controller runs in the first job (the master), like
the engines, under the same rules: a login node, shared by everyone, is no place for
long-running work, and many sites stop it there; a compute node's address is one the
other compute nodes reach, and globular, on the login node, reaches it directly.

The job's batch step runs ``globular.node keeper`` (standard library only, sent with
the job script).  globular's helper on the node is ``srun --jobid=J --overlap ... python
-c <node programs> relay``, in the node's Python, answering the same JSON lines as the SSH
helper; what it is asked to start (controller, engines) it hands to the keeper, so that it
lives as long as the job (an ``srun`` step's processes end with the step, on sites whose
Slurm tracks them with cgroups).  Every job carries the cluster's mark as its ``--comment``, so a cluster
whose record is lost is still found (``squeue``) and cancelled.  The job log of each
node is ``<remote_dir>/<cluster>/jobs/<node>.log`` on the shared file system.

(Longer than most modules: one provider read top to bottom — the job and its keeper, the
runner into its steps, release, discovery by job name; its settings and job queries are
:mod:`globular.providers.slurm_settings` and :mod:`globular.providers.slurm_jobs`.)
"""

from __future__ import annotations

import asyncio
import getpass
import logging
import os
import posixpath
import shlex
import shutil
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from globular.errors import BadInput, CommandError, ConnectionLost, NodeError
from globular.fanout import each_node
from globular.node.files import remove_dir
from globular.paths import private_dir
from globular.providers.base import (
    NODE_SOURCE,
    CommandResult,
    NodeProvider,
    NodeShell,
    ProviderStatus,
    Runner,
    StopResult,
    display,
)
from globular.providers.helper import PipedHelperRunner
from globular.providers.here import run_for_node
from globular.providers.slurm_jobs import (
    PENDING,
    RUNNING,
    Job,
    SlurmError,
    cancel,
    fraction_left,
    jobs,
    node_address,
    queued,
    seconds_of,
    slurm,
)
from globular.providers.slurm_settings import SlurmSettings
from globular.state import NodeRecord, ProcessRecord

log = logging.getLogger(__name__)
POLL = 1.0  # seconds between squeue calls while jobs wait
FIRST_POLL = 0.1  # ... after the first: doubled up to POLL (one squeue for all the jobs waited for)
LOG_POLL = 0.05  # s between looks at a waiting job's log, where its keeper writes a line as it starts
JOB_SCRIPT = """#!/bin/sh
# a globular node: the keeper of what globular starts here (see globular.providers.slurm)
exec {python} -c "$(cat <<'GLOBULAR_NODEPROC'
{source}
GLOBULAR_NODEPROC
)" keeper
"""


class JobEnded(NodeError):
    """The node's job is over: Slurm has stopped everything that ran in it."""


class SlurmRunner(PipedHelperRunner):
    """Does work on a node's job: through its keeper (the helper), or in an ``srun`` step."""

    def __init__(self, node: NodeRecord, state: Callable[[str], Awaitable[Job]]):
        super().__init__(node)
        self._job_state = state

    def _srun(self, argv: list[str]) -> list[str]:
        """``argv`` in a new step of the node's job."""
        return ["srun", f"--jobid={self.node.data['job_id']}", "--overlap", "--nodes=1", "--ntasks=1", "--quiet", *argv]

    def _no_srun(self, exc: OSError) -> CommandError:
        return CommandError(self.node.name, "srun", 127, f"cannot run srun here: {exc.strerror or exc}")

    def helper_argv(self) -> list[str]:
        """The relay, in a step of the node's job, to the keeper the job script started."""
        log.debug("%s (job %s): starting its relay", self.node.name, self.node.data["job_id"])
        return self._srun([self.node.python, "-c", NODE_SOURCE, "relay"])

    def cannot_start(self, exc: OSError) -> CommandError:
        return self._no_srun(exc)

    async def nodeproc(self, verb: str, request: dict[str, Any], timeout: float = 60.0) -> Any:
        try:
            return await super().nodeproc(verb, request, timeout)
        except ConnectionLost:
            job = await self._job_state(self.node.data["job_id"])
            if job.state not in PENDING | RUNNING:
                raise JobEnded(self.node.name, f"job {job.id} ended: {job.state}") from None
            raise

    async def stop(self, procs: list[ProcessRecord], timeout: float = 10.0) -> StopResult:
        try:
            return await super().stop(procs, timeout)
        except JobEnded:  # Slurm stopped them with the job
            return StopResult(0, 0, [])

    async def alive(self, procs: list[ProcessRecord]) -> list[bool]:
        try:
            return await super().alive(procs)
        except JobEnded:
            return [False] * len(procs)

    async def run(
        self, argv: list[str], *, input: bytes | None = None, timeout: float | None = 60.0, check: bool = True
    ) -> CommandResult:
        srun = self._srun([f"--chdir={self.node.workdir}", *argv])
        return await run_for_node(self.node.name, srun, display(argv), cannot=self._no_srun, input=input,
                                  timeout=timeout, check=check)  # fmt: skip

    async def close(self) -> None:
        await self.close_helper()


class SlurmProvider(NodeProvider):
    """Nodes are Slurm jobs, one compute node each (see the module's doc)."""

    name = "slurm"
    places_nodes = True
    Settings = SlurmSettings
    settings: SlurmSettings
    default_environment = "managed"
    remote_nodes = True
    rents_machines = True  # a node holds an allocation (core-hours) while it exists; idle shutdown ends its job

    def release_commands(self, node: NodeRecord) -> list[list[str]]:
        """The node ends its own job (never the machine: it is the site's)."""
        job = node.data.get("job_id")
        return [["scancel", str(job)]] if job else []

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._query: asyncio.Future[dict[str, Job]] | None = None
        self._queried = 0.0
        self._asked: set[str] = set()  # the jobs self._query asks of
        self._watched: set[str] = set()
        self._addresses: dict[str, asyncio.Future[str]] = {}  # Slurm node → its address (one scontrol each)

    @property
    def region(self) -> str:
        return "slurm"

    def envs_dir(self) -> str:
        return posixpath.join(self.settings.remote_dir, "envs")

    def account(self) -> object | None:
        return ("slurm", getpass.getuser())

    def make_runner(self, node: NodeRecord) -> Runner:
        return SlurmRunner(node, self._one)

    def _cluster_dir(self) -> Path:
        return Path(self.settings.remote_dir).expanduser() / self.cluster

    def shell_argv(self, node: NodeRecord, command: str | None, user: str | None = None) -> NodeShell:
        if user:
            raise BadInput(f"{node.name} of {self.cluster!r} is a {self.name} node: it takes no --user")
        job = node.data.get("job_id")
        base = ["srun", f"--jobid={job}", "--overlap", "--nodes=1", "--ntasks=1", f"--chdir={node.workdir}"]
        return NodeShell(
            base + (["--pty", os.environ.get("SHELL") or "/bin/sh"] if command is None else ["/bin/sh", "-c", command])
        )

    # -- jobs -------------------------------------------------------------------

    def sbatch_argv(self, node: str, host: str | None = None) -> list[str]:
        """The ``sbatch`` command of ``node``'s job (the script goes on its stdin)."""
        s = self.settings
        argv = [
            "sbatch",
            "--parsable",
            f"--job-name=glb-{self.cluster}-{node}",
            f"--comment={self.mark(node)}",
            "--nodes=1",
            "--ntasks=1",
            f"--output={self._log_path(node)}",  # where the waiter watches for the keeper's line
            "--open-mode=append",
        ]
        options = {"partition": s.partition, "account": s.account, "qos": s.qos, "time": s.time_limit}
        argv += [f"--{key}={value}" for key, value in options.items() if value]
        if s.constraint:
            argv.append(f"--constraint={s.constraint}")
        if s.cores_per_node:
            argv.append(f"--cpus-per-task={s.cores_per_node}")
        if s.gpus_per_node:
            argv.append(f"--gpus-per-node={s.gpus_per_node}")
        if host:
            argv.append(f"--nodelist={host}")
        return argv + s.sbatch_args

    async def _submit(self, node: str, host: str | None) -> str:
        private_dir(self._cluster_dir() / "jobs")
        script = JOB_SCRIPT.format(python=shlex.quote(self.settings.python), source=NODE_SOURCE.rstrip("\n"))
        try:
            done = await slurm(self.sbatch_argv(node, host), input=script.encode())
        except SlurmError as exc:
            raise NodeError(node, f"Slurm refused its job: {exc}") from None
        return done.stdout.strip().split(";")[0]

    async def _one(self, job: str) -> Job:
        return (await jobs([job]))[job]

    async def _state(self, job: str, since: float) -> Job:
        """``job``'s state, from an ``squeue`` begun at ``since`` or later: one for every job this
        provider waits for, however many nodes ask (a node that slept since its last look never
        reads an older answer)."""
        self._watched.add(job)
        if self._query is None or self._queried < since or job not in self._asked:
            self._queried, self._asked = time.monotonic(), set(self._watched)
            self._query = asyncio.ensure_future(jobs(sorted(self._asked)))
        return (await asyncio.shield(self._query))[job]  # jobs() answers for every id asked

    def _log_path(self, node: str) -> Path:
        return self._cluster_dir() / "jobs" / f"{node}.log"

    def _log_mark(self, node: str) -> tuple[int, int] | None:
        """The size and time of ``node``'s job log, or None while there is none."""
        try:
            found = os.stat(self._log_path(node))
        except OSError:
            return None
        return found.st_size, found.st_mtime_ns

    async def _log_moved(self, node: str, before: tuple[int, int] | None, seconds: float) -> tuple[int, int] | None:
        """Wait up to ``seconds`` for ``node``'s job log to differ from ``before``; its mark then."""
        deadline = time.monotonic() + seconds
        while True:
            now = self._log_mark(node)
            if now != before or time.monotonic() >= deadline:
                return now
            await asyncio.sleep(LOG_POLL)

    async def _wait_running(self, node: NodeRecord, job: str, mark: tuple[int, int] | None) -> Job:
        """Wait until ``job`` runs.  Slurm is asked (``squeue``) after FIRST_POLL s, then each
        time twice as long up to POLL s, and at once when the job's log (``mark``: as it was
        before ``sbatch``) changes: the keeper writes its first line there as it starts.  The
        log is on the shared file system, whose client may show a change late (NFS caches
        attributes for seconds); the polls do not depend on it."""
        began = since = time.monotonic()
        delay = FIRST_POLL
        try:
            while True:
                state = await self._state(job, since)
                waited = time.monotonic() - began
                if state.state in RUNNING:
                    return state
                if state.state not in PENDING:
                    log_tail = self._job_log(node.name)
                    raise NodeError(node.name, f"job {job} ended: {state.state} {state.reason}".strip(), log_tail)
                why = f"{state.state} ({state.reason})" if state.reason and state.reason != "None" else state.state
                self.reporter.node_waiting(node.name, why, waited)
                if waited > self.settings.queue_timeout:
                    raise NodeError(
                        node.name,
                        f"job {job} still {why} after {self.settings.queue_timeout:g}s (queue_timeout); cancelled",
                    )
                since = time.monotonic()  # an squeue another node begins while this one sleeps will do
                moved = await self._log_moved(node.name, mark, delay)
                if moved != mark:  # ... unless the job's log changed: then only a newer one
                    since, mark = time.monotonic(), moved
                delay = min(POLL, delay * 2)
        finally:
            self._watched.discard(job)

    def _address(self, host: str) -> asyncio.Future[str]:
        """Slurm node ``host``'s address, asked once however many of this start's nodes run there."""
        found = self._addresses.get(host)
        if found is None or (found.done() and (found.cancelled() or found.exception() is not None)):
            found = self._addresses[host] = asyncio.ensure_future(node_address(host))
            found.add_done_callback(lambda f: f.cancelled() or f.exception())  # a failure no node waits for: seen
        return found

    def _job_log(self, node: str) -> str:
        try:
            return self._log_path(node).read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    # -- nodes -------------------------------------------------------------------

    async def create_nodes(
        self,
        names: list[str],
        on_ready: Callable[[NodeRecord], None],
        *,
        existing: Sequence[NodeRecord] = (),
        hosts: list[str] | None = None,
    ) -> list[NodeRecord]:
        if hosts and len(hosts) != len(names):
            raise BadInput(f"{len(names)} nodes to add but {len(hosts)} Slurm nodes named")
        places: dict[str, str | None] = {name: hosts[i] if hosts else None for i, name in enumerate(names)}
        nodes = [
            NodeRecord(
                name=name,
                address="",
                workdir=posixpath.join(self.settings.remote_dir, self.cluster, name),
                cores=1,
                python=self.settings.python,
                data={"step_names": {"provision": "queued", "ssh": "running"}},  # submitted; its keeper answers
            )
            for name in names
        ]

        async def bring_up(node: NodeRecord) -> NodeRecord:
            mark = self._log_mark(node.name)  # before the job can write to it
            job = await self._submit(node.name, places[node.name])
            node.data["job_id"] = job
            try:
                self.on_step(node, "provision")
                state = await self._wait_running(node, job, mark)
                node.data["slurm_node"] = state.node
                address = self._address(state.node)  # asked while the relay starts: it needs none
                self.on_step(node, "ssh")  # "running": the job runs (its keeper answers below)
                runner = self.runner(node)
                facts = await runner.nodeproc("prepare", {"dir": node.workdir}, timeout=120)
                node.address = await asyncio.shield(address)  # shared: this node's cancel must not end it
                node.workdir = facts["workdir"]
                node.cores = self.settings.cores_per_node or facts["cpus"]
            except BaseException:
                runner_ = self._runners.pop(node.name, None)
                if runner_ is not None:
                    await runner_.close()
                await asyncio.shield(cancel([job]))
                raise
            on_ready(node)
            return node

        await each_node(nodes, bring_up)
        return nodes

    async def terminate_nodes(self, nodes: list[NodeRecord]) -> None:
        async def release(node: NodeRecord) -> None:
            job = node.data.get("job_id")
            if not job:
                return
            request = {"root": self.settings.remote_dir, "path": node.workdir, "mark": self.mark(node.name)}
            try:
                if (await self._one(job)).state in RUNNING:
                    await self.runner(node).nodeproc("remove_dir", request, timeout=60)
                else:  # its processes ended with the job; its folder is on the shared file system
                    here = request | {"mark": None, "path": os.path.expanduser(node.workdir)}
                    await asyncio.to_thread(remove_dir, here)
            finally:
                runner = self._runners.pop(node.name, None)
                if runner is not None:
                    await runner.close()
                await cancel([job])
            deadline = time.monotonic() + 60  # "terminate leaves no job": wait until Slurm has ended it
            since = time.monotonic()
            try:
                while time.monotonic() < deadline:
                    if (await self._state(job, since)).state not in PENDING | RUNNING:
                        break
                    since = time.monotonic()
                    await asyncio.sleep(0.1)
            finally:
                self._watched.discard(job)
            self._log_path(node.name).unlink(missing_ok=True)

        await each_node(nodes, release)

    async def release_cluster(self) -> None:
        """Cancel every job still marked with this cluster (a crash between sbatch and the record),
        and remove the cluster's folder of job logs."""
        prefix = self.mark() + "/"
        await cancel([job for job, mark in await queued() if mark.startswith(prefix)])
        shutil.rmtree(self._cluster_dir() / "jobs", ignore_errors=True)
        try:
            self._cluster_dir().rmdir()
        except OSError:
            pass

    async def discover(self) -> dict[str, list[NodeRecord]]:
        """Clusters whose jobs are queued (any globular home of this user): name → nodes."""
        found: dict[str, list[NodeRecord]] = {}
        for job, mark in await queued():
            _, cluster, node = mark.split("/")
            found.setdefault(cluster, []).append(
                NodeRecord(
                    name=node,
                    address="",
                    workdir=posixpath.join(self.settings.remote_dir, cluster, node),
                    cores=1,
                    python=self.settings.python,
                    data={"job_id": job},
                )
            )
        return found

    async def status(self, nodes: Sequence[NodeRecord]) -> ProviderStatus:
        """Each node's job: its state and walltime left; an ended job is the node's problem."""
        report = ProviderStatus()
        ids = {n.name: n.data["job_id"] for n in nodes if n.data.get("job_id")}
        found = await jobs(list(ids.values()))
        for name, job_id in ids.items():
            job = found[job_id]
            if job.state in RUNNING:
                limited = job.time_left not in ("", "UNLIMITED", "NOT_SET", "INVALID")
                left = f"{job.time_left} left" if limited else "no time limit"
                report.node_columns[name] = {"job": f"{job_id} {job.state.lower()}, {left}"}
                seconds = seconds_of(job.time_left) if limited else None
                if seconds is not None:
                    report.node_time_left[name] = float(seconds)
                fraction = fraction_left(job.time_left, job.time_limit)
                if fraction is not None and fraction < 0.1:
                    report.warnings.append(
                        f"{name}: job {job_id} has {job.time_left} of its {job.time_limit} walltime left"
                    )
            else:
                at = f" at {job.ended.split()[-1]}" if job.ended else ""
                report.node_columns[name] = {"job": f"{job_id} {job.state.lower()}"}
                report.node_problems[name] = f"job {job_id} ended: {job.state}{at}"
                report.node_states[name] = "job ended"
        return report
