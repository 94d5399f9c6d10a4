"""The state store: versioned records, atomic writes, a lock shared by processes."""

from __future__ import annotations

import json
import multiprocessing
import stat
import threading

import pytest

from globular.errors import ClusterBusy, ClusterExists, ClusterNotFound, StateError
from globular.spec import ClusterSpec
from globular.state import STATE_VERSION, ClusterRecord, NodeRecord, StateStore


def make_record(name: str = "c1") -> ClusterRecord:
    spec = ClusterSpec(template="t", cluster_size=1, provider="local")
    return ClusterRecord(name=name, region="local", spec=spec)


def test_create_get_list_delete(tmp_path):
    store = StateStore(tmp_path)
    store.create(make_record("a"))
    store.create(make_record("b"))
    with pytest.raises(ClusterExists, match="already exists"):
        store.create(make_record("a"))
    assert store.get("a").name == "a"
    records, problems = store.list()
    assert [r.name for r in records] == ["a", "b"] and problems == []
    store.delete("a")
    with pytest.raises(ClusterNotFound):
        store.get("a")


def test_record_is_private_versioned_and_leaves_no_temp_files(tmp_path):
    store = StateStore(tmp_path)
    record = make_record()
    record.nodes.append(NodeRecord(name="master", address="127.0.0.1", workdir="/w", cores=1, python="py"))
    store.create(record)
    for _ in range(5):
        store.save(record)
    path = tmp_path / "clusters" / "c1.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert json.loads(path.read_text())["version"] == STATE_VERSION
    assert sorted(p.name for p in path.parent.iterdir() if not p.name.startswith(".")) == ["c1.json"]
    assert not list(path.parent.glob("*.tmp"))


def test_a_version_1_record_is_read_with_its_nodes_as_the_desired_set(tmp_path):
    store = StateStore(tmp_path)
    record = make_record("old")
    record.nodes = [
        NodeRecord(name=n, address="127.0.0.1", workdir="/tmp", cores=1, python="python3")
        for n in ("master", "node001")
    ]
    raw = json.loads(record.model_dump_json())
    raw["version"] = 1
    del raw["desired"]
    (tmp_path / "clusters").mkdir(parents=True, exist_ok=True)
    (tmp_path / "clusters" / "old.json").write_text(json.dumps(raw))
    read = store.get("old")
    assert read.version == STATE_VERSION == 2
    assert read.desired == [n.name for n in record.nodes] and read.desired


def test_unknown_version_and_garbage_are_reported_not_crashing(tmp_path):
    store = StateStore(tmp_path)
    store.create(make_record("good"))
    (tmp_path / "clusters" / "future.json").write_text(json.dumps({"version": 99, "name": "future"}))
    (tmp_path / "clusters" / "broken.json").write_text("{not json")
    with pytest.raises(StateError, match="version 99"):
        store.get("future")
    records, problems = store.list()
    assert [r.name for r in records] == ["good"]
    assert len(problems) == 2 and all(isinstance(p, StateError) for p in problems)


def _increment(home: str, count: int) -> None:
    """What every operation does: read, change and save the record while holding its operation lock."""
    store = StateStore(__import__("pathlib").Path(home))
    for _ in range(count):
        with store.operation("shared", timeout=60):
            record = store.get("shared")
            data = record.plugin_data.setdefault("n", {})
            data["v"] = data.get("v", 0) + 1
            store.save(record)


def test_operations_in_processes_lose_no_update(tmp_path):
    store = StateStore(tmp_path)
    store.create(make_record("shared"))
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_increment, args=(str(tmp_path), 40)) for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
        assert w.exitcode == 0
    assert store.get("shared").plugin_data["n"]["v"] == 160


def test_readers_never_see_a_partial_record(tmp_path):
    store = StateStore(tmp_path)
    record = make_record("big")
    store.create(record)
    stop = threading.Event()
    errors = []

    def writer():
        i = 0
        while not stop.is_set():
            record.plugin_data["blob"] = {"x": "y" * (1000 + i % 50000)}
            store.save(record)
            i += 7919

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        for _ in range(300):
            try:
                StateStore(tmp_path).get("big")
            except StateError as exc:
                errors.append(exc)
    finally:
        stop.set()
        thread.join()
    assert errors == []


def test_operation_lock_is_exclusive(tmp_path):
    store = StateStore(tmp_path)
    with store.operation("c1"):
        ctx = multiprocessing.get_context("spawn")
        queue = ctx.Queue()
        proc = ctx.Process(target=_try_operation, args=(str(tmp_path), queue))
        proc.start()
        proc.join(60)
        assert queue.get(timeout=5) == "busy"
    with store.operation("c1"):
        pass


def _try_operation(home: str, queue) -> None:
    store = StateStore(__import__("pathlib").Path(home))
    try:
        with store.operation("c1"):
            queue.put("acquired")
    except ClusterBusy:
        queue.put("busy")
