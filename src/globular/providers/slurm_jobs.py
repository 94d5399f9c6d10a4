"""Slurm's command-line tools, as the slurm provider asks them: submit, cancel, and what
``squeue`` (or, once a job has left the queue, ``scontrol``) says of a job."""

from __future__ import annotations

import asyncio
import getpass
import logging
from dataclasses import dataclass

from globular.errors import GlobularError
from globular.providers.base import CommandResult, display
from globular.providers.here import run_here

log = logging.getLogger(__name__)
PENDING = {"PENDING", "CONFIGURING", "REQUEUED", "RESV_DEL_HOLD", "REQUEUE_HOLD", "REQUEUE_FED", "SUSPENDED"}
RUNNING = {"RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING", "RESIZING"}


class SlurmError(GlobularError):
    """A Slurm command refused: its own message, in one line."""


@dataclass(frozen=True)
class Job:
    """What ``squeue`` (or, once the job has left the queue, ``scontrol``) says of a job."""

    id: str
    state: str  # PENDING, RUNNING, TIMEOUT, ...; GONE once Slurm forgot it
    reason: str = ""
    node: str = ""  # the compute node it runs on
    time_left: str = ""  # squeue's %L
    time_limit: str = ""  # squeue's %l
    ended: str = ""  # when it ended (scontrol's EndTime)


async def slurm(argv: list[str], *, input: bytes | None = None, timeout: float = 60.0) -> CommandResult:
    """Run a Slurm command here (``sbatch``, ``squeue``, ...); a failure is a :class:`SlurmError`
    with Slurm's own message."""
    log.debug("slurm: %s", display(argv))
    try:
        result = await run_here(argv, input=input, timeout=timeout)
    except FileNotFoundError:
        raise SlurmError(f"{argv[0]} is not installed here (the slurm provider runs on a Slurm login node)") from None
    if result.returncode != 0:
        lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
        message = lines[-1] if lines else f"exited with {result.returncode}"
        raise SlurmError(f"{argv[0]}: {message.removeprefix(argv[0] + ': ').removeprefix('error: ')}")
    return result


async def cancel(job_ids: list[str]) -> None:
    if job_ids:
        try:
            await slurm(["scancel", *job_ids])
        except SlurmError as exc:
            if "Invalid job id" not in str(exc):
                raise


async def jobs(job_ids: list[str]) -> dict[str, Job]:
    """What Slurm says of each job now (one ``squeue``; ``scontrol`` for those it no longer lists)."""
    if not job_ids:
        return {}
    found: dict[str, Job] = {}
    try:
        out = await slurm(["squeue", "-h", "-t", "all", f"--jobs={','.join(job_ids)}", "-o", "%i|%T|%r|%N|%L|%l"])
    except SlurmError as exc:
        if "Invalid job id" not in str(exc):
            raise
        out = CommandResult(0, "", "")
    for line in out.stdout.splitlines():
        parts = line.split("|")
        if len(parts) == 6:
            found[parts[0]] = Job(parts[0], parts[1], parts[2], parts[3], parts[4], parts[5])
    for job in job_ids:
        if job not in found or found[job].state not in PENDING | RUNNING:
            found[job] = await _ended(job, found.get(job))
    return found


async def _ended(job: str, listed: Job | None) -> Job:
    try:
        out = await slurm(["scontrol", "-o", "show", "job", job])
    except SlurmError:
        return listed or Job(job, "GONE")
    fields = dict(part.split("=", 1) for part in out.stdout.split() if "=" in part)
    return Job(
        job,
        fields.get("JobState", "GONE"),
        fields.get("Reason", ""),
        fields.get("NodeList", ""),
        ended=fields.get("EndTime", "").replace("T", " "),
    )


async def node_address(host: str) -> str:
    """The IP address of Slurm node ``host``: its NodeAddr, resolved here where it is a name
    (a controller binds to an address, never a name)."""
    import ipaddress
    import socket

    out = await slurm(["scontrol", "-o", "show", "node", host])
    fields = dict(part.split("=", 1) for part in out.stdout.split() if "=" in part)
    address = fields.get("NodeAddr") or host
    try:
        ipaddress.ip_address(address)
        return address
    except ValueError:
        pass
    try:
        found = await asyncio.get_running_loop().getaddrinfo(address, None, family=socket.AF_INET)
    except OSError as exc:
        raise SlurmError(f"cannot resolve Slurm node {host}'s address {address}: {exc}") from None
    return str(found[0][4][0])


async def queued() -> list[tuple[str, str]]:
    """This user's queued jobs that globular made: (job id, mark), the mark from the comment."""
    out = await slurm(["squeue", "-h", "-u", getpass.getuser(), "-o", "%i|%k"])
    found = []
    for line in out.stdout.splitlines():
        job, _, comment = line.partition("|")
        parts = comment.strip().split("/")
        if len(parts) == 3 and all(parts):
            found.append((job.strip(), comment.strip()))
    return found


def seconds_of(text: str) -> int | None:
    """Slurm's ``[D-]HH:MM:SS`` (or ``MM:SS``) in seconds; None for anything else."""
    days, _, rest = text.rpartition("-")
    parts = rest.split(":")
    if not all(p.isdigit() for p in parts) or not 1 <= len(parts) <= 3 or (days and not days.isdigit()):
        return None
    seconds = 0
    for part in parts:
        seconds = seconds * 60 + int(part)
    if len(parts) == 1:
        seconds *= 60  # minutes
    return seconds + int(days or 0) * 86400


def fraction_left(left: str, limit: str) -> float | None:
    total, remaining = seconds_of(limit), seconds_of(left)
    if not total or remaining is None:
        return None
    return remaining / total
