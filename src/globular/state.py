"""State of running clusters: one versioned JSON record per cluster.

Records live in ``~/.globular/clusters/<name>.json`` (0600).  Every write goes
to a temporary file in the same folder, is fsynced and then renamed over the
record, under a lock shared by all globular processes, so a reader always sees
a whole record and concurrent writers never lose each other's updates.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field, ValidationError

from globular.errors import BadInput, ClusterBusy, ClusterExists, ClusterNotFound, GlobularError, StateError
from globular.paths import private_dir, write_private
from globular.spec import BalanceSpec, ClusterSpec, error_in_words

STATE_VERSION = 2  # 2: the desired node set (``desired``); version 1 records are read too
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")

ClusterStatus = Literal["starting", "running", "stopping", "failed"]


class ProcessRecord(BaseModel):
    """A process on a node, known by pid and its kernel start time (guards against pid reuse)."""

    pid: int
    start: int
    role: str
    log: str | None = None
    ident: str | None = None  # what it stands for to whoever started it (an engine: its id), as given


class NodeRecord(BaseModel):
    name: str  # "master", "node001", ...
    address: str
    workdir: str
    cores: int = Field(ge=1)
    python: str
    login: str | None = None  # "user@host:port" where ssh reaches the node (the connection file's ssh); else None
    data: dict[str, Any] = Field(default_factory=dict)  # provider's own fields
    created: float = Field(default_factory=time.time)  # when its bring-up began
    steps: dict[str, float] = Field(
        default_factory=dict
    )  # step (ssh, setup, engines, registered) -> when it was reached
    processes: list[ProcessRecord] = Field(default_factory=list)

    @property
    def is_master(self) -> bool:
        return self.name == "master"

    def processes_with_role(self, role: str) -> list[ProcessRecord]:
        return [p for p in self.processes if p.role == role]


class BalanceEvent(BaseModel):
    """One decision of the balancer (or a problem it met), for ``status``."""

    time: float
    kind: str  # add, remove, keep, busy, error, watch
    text: str
    nodes: list[str] = Field(default_factory=list)


class BalancerRecord(BaseModel):
    """The balancer of a cluster (``globular loadbalance``): its process on this machine, by pid
    and start time, its bounds and its last decisions."""

    pid: int
    start: int
    started: float = Field(default_factory=time.time)
    bounds: BalanceSpec
    events: list[BalanceEvent] = Field(default_factory=list)  # the last KEPT_EVENTS, oldest first
    stopped: float | None = None  # when it stopped by itself (one killed leaves this unset)

    KEPT_EVENTS: ClassVar[int] = 20

    @property
    def running(self) -> bool:
        from globular.node.proc import process_start

        return self.stopped is None and process_start(self.pid) == self.start


class ClusterRecord(BaseModel):
    version: int = STATE_VERSION
    name: str
    status: ClusterStatus = "starting"
    region: str
    created: float = Field(default_factory=time.time)
    updated: float = Field(default_factory=time.time)
    owner_pid: int = Field(default_factory=os.getpid)  # the globular process that last changed it
    spec: ClusterSpec
    desired: list[str] = Field(default_factory=list)  # the node set reconcile brings the world to
    nodes: list[NodeRecord] = Field(default_factory=list)  # the nodes that exist
    plugin_data: dict[str, dict[str, Any]] = Field(default_factory=dict)
    error: str | None = None
    balancer: BalancerRecord | None = None  # globular loadbalance, while one runs (or ran and was killed)

    @property
    def master(self) -> NodeRecord:
        for node in self.nodes:
            if node.is_master:
                return node
        raise StateError(f"cluster {self.name!r} has no master node in its record")

    def node(self, name: str) -> NodeRecord:
        for node in self.nodes:
            if node.name == name:
                return node
        known = ", ".join(n.name for n in self.nodes)
        raise GlobularError(f"cluster {self.name!r} has no node {name!r} (nodes: {known})")


RESERVED_NAMES = frozenset({"envs"})  # <remote_dir>/envs holds the node environments


def check_cluster_name(name: str) -> str:
    if name in RESERVED_NAMES:
        raise BadInput(f"invalid cluster name {name!r}: it is reserved (node environments live in <remote_dir>/{name})")
    if not NAME_PATTERN.fullmatch(name):
        raise BadInput(
            f"invalid cluster name {name!r}: use letters, digits, '.', '_' and '-' (up to 63, not starting with a symbol)"
        )
    return name


class StateStore:
    """Reads and writes cluster records under ``home/clusters``."""

    def __init__(self, home: Path, lock_timeout: float = 30.0):
        self.home = home
        self.dir = home / "clusters"
        self.lock_timeout = lock_timeout

    def _path(self, name: str) -> Path:
        return self.dir / f"{check_cluster_name(name)}.json"

    @contextmanager
    def _locked(self) -> Iterator[None]:
        from filelock import FileLock  # here: a command that only reads records never loads it

        private_dir(self.dir)
        lock = FileLock(str(self.dir / ".lock"), timeout=self.lock_timeout)
        with lock:
            yield

    @contextmanager
    def operation(self, name: str, timeout: float = 0.5) -> Iterator[None]:
        """Exclusive right to change cluster ``name`` (start, addnode, terminate...).

        Held by one globular process at a time; released by the kernel if that
        process dies.
        """
        from filelock import FileLock, Timeout

        private_dir(self.dir)
        lock = FileLock(str(self.dir / f".{check_cluster_name(name)}.op.lock"), timeout=timeout)
        try:
            lock.acquire()
        except Timeout:
            raise ClusterBusy(name) from None
        try:
            yield
        finally:
            lock.release()

    def _read(self, path: Path) -> ClusterRecord:
        try:
            raw = json.loads(path.read_bytes())
        except FileNotFoundError:
            raise
        except (OSError, ValueError) as exc:
            raise StateError(f"state file {path} is unreadable: {exc}") from None
        version = raw.get("version") if isinstance(raw, dict) else None
        if version == 1:  # before the desired node set was kept: it is the nodes there are
            raw = {**raw, "version": STATE_VERSION, "desired": [n.get("name") for n in raw.get("nodes", [])]}
        elif version != STATE_VERSION:
            raise StateError(f"state file {path} has version {version!r}; this globular reads version {STATE_VERSION}")
        try:
            return ClusterRecord.model_validate(raw)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(part) for part in err["loc"])
            raise StateError(
                f"state file {path} is invalid: {where + ': ' if where else ''}{error_in_words(err)}"
            ) from None

    def _write(self, record: ClusterRecord) -> None:
        record.updated = time.time()
        record.owner_pid = os.getpid()
        data = record.model_dump_json(indent=2).encode()
        write_private(self._path(record.name), data)

    def get(self, name: str) -> ClusterRecord:
        try:
            return self._read(self._path(name))
        except FileNotFoundError:
            raise ClusterNotFound(name) from None

    def exists(self, name: str) -> bool:
        return self._path(name).exists()

    def list(self) -> tuple[list[ClusterRecord], list[StateError]]:
        """All records, and the errors of those that cannot be read."""
        records: list[ClusterRecord] = []
        problems: list[StateError] = []
        if not self.dir.exists():
            return records, problems
        for path in sorted(self.dir.glob("*.json")):
            try:
                records.append(self._read(path))
            except FileNotFoundError:
                continue  # removed while listing
            except StateError as exc:
                problems.append(exc)
        return records, problems

    def create(self, record: ClusterRecord) -> None:
        with self._locked():
            path = self._path(record.name)
            if path.exists():
                try:
                    status = self._read(path).status
                except StateError:
                    status = "unreadable"  # type: ignore[assignment]  # for the message only
                raise ClusterExists(record.name, status)
            self._write(record)

    def save(self, record: ClusterRecord) -> None:
        with self._locked():
            self._write(record)

    def delete(self, name: str) -> None:
        """Forget cluster ``name``: its record, and its operation lock file (no stale lock per name ever used)."""
        with self._locked():
            self._path(name).unlink(missing_ok=True)
            (self.dir / f".{check_cluster_name(name)}.op.lock").unlink(missing_ok=True)
