"""GPU engines (``gpu_engines``): one engine per GPU, pinned to it by UUID.

The preflight asks each node for its GPUs in the facts it gathers anyway (one round trip:
:func:`globular.node.gpus.gpu_devices`, nvidia-smi's list within what the node's allocation
leaves) and keeps them in the record (``gpus``, by node).  An engine given a GPU runs with
``CUDA_VISIBLE_DEVICES=<its UUID>`` (a MIG device's for MIG), ``CUDA_DEVICE_ORDER=PCI_BUS_ID``
(CUDA's order is nvidia-smi's) and ``GLOBULAR_GPU=<its UUID>``; a CPU engine of a cluster with
``gpu_engines`` runs with ``CUDA_VISIBLE_DEVICES`` empty, so it never takes a GPU by accident.
Which engine holds which GPU is kept in the record too (``engine_gpus``: engine id -> UUID).
"""

from __future__ import annotations

import logging
from typing import Any

from globular.ipcluster.settings import IPClusterSettings, engines_for, gpus_used
from globular.plugins.base import PluginStatus, StatusView
from globular.state import NodeRecord

log = logging.getLogger(__name__)
GPU_ENGINES_PER_CORE = 8  # gpu_engines = auto: at most this many GPU engines a core


def judge_gpus(
    answer: dict[str, Any] | None, settings: IPClusterSettings, cores: int | None = None
) -> tuple[list[dict[str, Any]], list[str]]:
    """The devices a node's engines get, and its problems, from its ``gpus`` fact; under
    ``gpu_engines = auto``, at most :data:`GPU_ENGINES_PER_CORE` a core (``cores``): a Slurm job
    may hold 4 GPUs on 1 core, and one engine per GPU (or MIG slice) is right there, but a node
    that lists thousands (a broken driver) must not start thousands of engines."""
    answer = answer or {}
    devices: list[dict[str, Any]] = list(answer.get("devices") or [])
    if answer.get("error"):
        return [], [f"gpu_engines = {settings.gpu_engines}: nvidia-smi failed: {answer['error']}"]
    uuids = [d["uuid"] for d in devices]
    twice = sorted({u for u in uuids if uuids.count(u) > 1})
    if twice:  # two engines would be pinned to one GPU
        return [], [
            f"gpu_engines = {settings.gpu_engines}: nvidia-smi lists GPU {twice[0]} more than once (a broken driver or a stand-in?)"
        ]
    wanted = settings.gpu_engines
    if isinstance(wanted, int) and len(devices) < wanted:
        has = describe(devices) if devices else "no GPU" + ("" if answer.get("smi") else " (no nvidia-smi)")
        within = f" (within its {answer['restricted_by']})" if answer.get("restricted_by") else ""
        return devices, [f"gpu_engines = {wanted} needs {wanted} GPUs; the node has {has}{within}"]
    used = devices[: gpus_used(settings, len(devices))]
    bound = GPU_ENGINES_PER_CORE * cores if cores is not None else None
    if wanted == "auto" and bound is not None and len(used) > bound:
        log.warning("gpu_engines = auto: %d GPUs listed on %d cores: %d GPU engines", len(used), cores, bound)
        used = used[:bound]
    return used, []


def describe(devices: list[dict[str, Any]]) -> str:
    """``2 GPUs: NVIDIA H200`` / ``1 GPU: NVIDIA A100 MIG 3g.20gb``."""
    names = sorted({d["name"] + (f" MIG {d['mig']}" if d.get("mig") else "") for d in devices})
    return f"{len(devices)} GPU{'s' if len(devices) != 1 else ''}: {', '.join(names)}"


def gpu_env(settings: IPClusterSettings, uuid: str | None) -> dict[str, str]:
    """The environment that pins an engine to GPU ``uuid`` (None: a CPU engine, which sees none)."""
    if not settings.wants_gpus:
        return {}
    return {"CUDA_VISIBLE_DEVICES": uuid or "", "CUDA_DEVICE_ORDER": "PCI_BUS_ID", "GLOBULAR_GPU": uuid or ""}


def node_devices(data: dict[str, Any], node: str) -> list[dict[str, Any]]:
    """The GPUs the preflight found for ``node``'s engines (IPCluster's record part ``data``)."""
    found: list[dict[str, Any]] = (data.get("gpus") or {}).get(node) or []
    return found


def engine_count(data: dict[str, Any], node: NodeRecord, settings: IPClusterSettings) -> int:
    """Engines on ``node``, its GPUs (found by the preflight) counted."""
    return engines_for(node, settings, len(node_devices(data, node.name)))


def assign(ids: list[int], devices: list[dict[str, Any]]) -> dict[int, str | None]:
    """Engine id -> the UUID of its GPU: the first engines get the GPUs, in order; the rest none."""
    return {engine_id: (devices[k]["uuid"] if k < len(devices) else None) for k, engine_id in enumerate(ids)}


ENGINE_GPUS = "engine_gpus"  # the record's table: engine id -> the UUID of the GPU it holds


def gpu_table(data: dict[str, Any]) -> dict[str, str]:
    """The record's engine id -> GPU UUID table (a record written before it had this name
    calls it ``gpu_engines``, the setting's name)."""
    table: dict[str, str] = data.get(ENGINE_GPUS) or data.get("gpu_engines") or {}
    return table


def held(data: dict[str, Any], engine_ids: list[int]) -> dict[int, str]:
    """Which of ``engine_ids`` hold a GPU, and its UUID."""
    table = gpu_table(data)
    return {i: table[str(i)] for i in engine_ids if table.get(str(i))}


# -- status ---------------------------------------------------------------------------------


def _usage(device: dict[str, Any]) -> str:
    name = device["name"].removeprefix("NVIDIA ") + (f" MIG {device['mig']}" if device.get("mig") else "")
    util = device.get("utilization")
    used, total = device.get("memory_used_mib"), device.get("memory_total_mib")
    memory = f"{used / 1024:.1f}/{total / 1024:.0f} GiB" if used is not None and total else ""
    return " ".join(p for p in (name, f"{util:.0f}%" if util is not None else "", memory) if p)


def gpu_status(view: StatusView, data: dict[str, Any], status: PluginStatus) -> None:
    """Status columns: each node's GPUs (name, use, memory; ``globular status`` asks the nodes)
    and which engine holds which; the cluster's count of GPU engines (``listclusters``)."""
    by_node: dict[str, list[int]] = {}
    for engine_id, node in (data.get("engine_ids") or {}).items():
        by_node.setdefault(node, []).append(int(engine_id))
    total = 0
    for node in view.record.nodes:
        holders = held(data, sorted(by_node.get(node.name, [])))
        total += len(holders)
        engine_of = {uuid: engine_id for engine_id, uuid in holders.items()}
        facts = view.facts.get(node.name)
        answer = facts.get("gpus") if isinstance(facts, dict) else None
        devices = (answer or {}).get("devices") or node_devices(data, node.name)
        rows = [dict(d, engine=engine_of.get(d["uuid"])) for d in devices]
        status.node_data.setdefault(node.name, {})["gpus"] = rows
        columns = status.node_columns.setdefault(node.name, {})
        if isinstance(answer, dict) and answer.get("error"):
            status.node_problems.setdefault(node.name, f"nvidia-smi failed: {answer['error']}")
        if rows and view.deep:
            columns["gpus"] = "; ".join(
                f"{'e' + str(r['engine']) if r['engine'] is not None else 'free'}: {_usage(r)}" for r in rows
            )
        elif rows:
            columns["gpus"] = f"{len(holders)}/{len(rows)} held"
    status.columns["gpu engines"] = str(total)
    status.data["gpu_engines"] = {
        str(k): v for k, v in held(data, [int(i) for i in data.get("engine_ids") or {}]).items()
    }


# -- from a client ------------------------------------------------------------------------


def _engine_gpu() -> str:
    import os

    return os.environ.get("GLOBULAR_GPU", "")


_engine_gpu.__module__ = "__main__"  # sent by value: nodes need not have globular installed


def gpu_engines(client: Any) -> dict[int, str]:
    """Engine id -> the UUID of the GPU it holds, for every GPU engine of ``client``'s cluster
    (asked of the engines themselves: one round trip)."""
    if not client.ids:
        return {}
    answers = client[:].apply_async(_engine_gpu).get_dict(timeout=30)
    return {int(i): uuid for i, uuid in sorted(answers.items()) if uuid}


def gpu_view(client: Any) -> Any:
    """A DirectView over ``client``'s GPU engines only (empty list of targets: none has a GPU)."""
    ids = sorted(gpu_engines(client))
    if not ids:
        raise LookupError("no engine of this cluster holds a GPU (gpu_engines = none, or no node has one)")
    return client[ids]
