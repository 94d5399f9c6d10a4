"""The node's GPUs, as the NVIDIA driver's own CLI lists them (no NVML binding, no CUDA library).

``nvidia-smi`` is on every machine with the driver; a node without it has no GPU.  One query
lists the GPUs (index, UUID, name, memory, PCI bus id, use), ``nvidia-smi -L`` their MIG
devices: a GPU in MIG mode counts as its MIG devices, each with its own ``MIG-...`` UUID (what
``CUDA_VISIBLE_DEVICES`` takes for it).  Where the allocation already restricts the GPUs (Slurm's
``CUDA_VISIBLE_DEVICES``, a container, the user's own), only those are listed: entries are
positions in PCI bus order (CUDA's order under ``CUDA_DEVICE_ORDER=PCI_BUS_ID``) or UUIDs (a
unique prefix is enough, as for CUDA); without it, Slurm's ``SLURM_JOB_GPUS`` (indices).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from typing import Any

SMI_QUERY = "index,uuid,name,memory.total,pci.bus_id,memory.used,utilization.gpu"
SMI_TIMEOUT = 5.0  # s nvidia-smi may take (it answers in well under a second when the driver is sound)
# where the driver's CLI lives when PATH lacks it (containers, WSL)
SMI_PLACES = ("/usr/bin/nvidia-smi", "/usr/local/nvidia/bin/nvidia-smi", "/usr/lib/wsl/lib/nvidia-smi")
MIG_LINE = re.compile(r"^\s+MIG\s+(?P<profile>\S+)\s+Device\s+(?P<index>\d+):\s+\(UUID:\s*(?P<uuid>MIG-[^)\s]+)\)")
GPU_LINE = re.compile(r"^GPU\s+(?P<index>\d+):.*\(UUID:\s*(?P<uuid>GPU-[^)\s]+)\)")


def _smi_number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:  # "[N/A]", "[Not Supported]"
        return None


def _smi_path() -> str | None:
    found = shutil.which("nvidia-smi")
    return found or next((p for p in SMI_PLACES if os.access(p, os.X_OK)), None)


def _smi_run(argv: list[str]) -> str:
    """What ``argv`` (nvidia-smi) prints, as text (bytes that are not UTF-8 replaced); a hung one is
    killed with everything it started (its own process group) after SMI_TIMEOUT."""
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=SMI_TIMEOUT)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
        try:
            proc.communicate(timeout=1)
        except subprocess.TimeoutExpired:  # a child that left the group keeps the pipes: not waited for
            pass
        raise RuntimeError(f"no answer within {SMI_TIMEOUT:g} s (stopped)") from None
    stdout, stderr = out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
    if proc.returncode != 0:
        lines = [line.strip() for line in (stdout + "\n" + stderr).splitlines() if line.strip()]
        raise RuntimeError(lines[0] if lines else f"exit status {proc.returncode}")
    return stdout


def parse_gpu_query(text: str) -> list[dict[str, Any]]:
    """``nvidia-smi --query-gpu=SMI_QUERY --format=csv,noheader,nounits`` -> one dict per GPU; a
    line that is not one (an index that is not a number) is a RuntimeError that quotes it."""
    gpus = []
    for line in text.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) < 5:
            continue
        index, uuid, name, total, bus = fields[:5]
        used = _smi_number(fields[5]) if len(fields) > 5 else None
        util = _smi_number(fields[6]) if len(fields) > 6 else None
        if not index.isdigit() or not uuid:
            raise RuntimeError(f"unexpected output line {line.strip()[:120]!r}")
        gpus.append(
            {
                "index": int(index),
                "uuid": uuid,
                "name": name,
                "memory_total_mib": _smi_number(total),
                "memory_used_mib": used,
                "utilization": util,
                "bus_id": bus,
                "mig": None,
            }
        )
    return gpus


def parse_mig(text: str) -> dict[str, list[dict[str, str]]]:
    """``nvidia-smi -L`` -> each GPU's MIG devices, by the GPU's UUID."""
    found: dict[str, list[dict[str, str]]] = {}
    current = None
    for line in text.splitlines():
        gpu = GPU_LINE.match(line)
        if gpu:
            current = gpu["uuid"]
            continue
        mig = MIG_LINE.match(line)
        if mig and current:
            found.setdefault(current, []).append({"uuid": mig["uuid"], "profile": mig["profile"]})
    return found


def restrict_gpus(devices: list[dict[str, Any]], environ: dict[str, str]) -> tuple[list[dict[str, Any]], str | None]:
    """The devices the allocation leaves this process, and what restricted them (None: nothing)."""
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        entries = [e.strip() for e in visible.split(",") if e.strip()]
        kept = []
        for entry in entries:
            try:
                ordinal = int(entry)
            except ValueError:
                ordinal = None
            if ordinal is not None:
                if not 0 <= ordinal < len(devices):
                    break  # CUDA stops at the first invalid ordinal
                match = [devices[ordinal]]
            else:
                match = [d for d in devices if d["uuid"].startswith(entry) or d.get("gpu_uuid", "").startswith(entry)]
                if not entry.startswith(("GPU-", "MIG-")):
                    match += [d for d in devices if d["uuid"].startswith(("GPU-" + entry, "MIG-" + entry))]
                gpus = {d.get("gpu_uuid") or d["uuid"] for d in match}
                if not match or len(gpus) > 1:
                    break  # CUDA stops at an entry that names no device, or several: it is invalid
            kept += [d for d in match if d not in kept]
        return kept, "CUDA_VISIBLE_DEVICES"
    job = environ.get("SLURM_JOB_GPUS") or environ.get("SLURM_STEP_GPUS")
    if job:
        indices = {int(i) for i in job.split(",") if i.strip().isdigit()}
        return [d for d in devices if d["index"] in indices], "SLURM_JOB_GPUS"
    return devices, None


def gpu_devices(environ: dict[str, str] | None = None) -> dict[str, Any]:
    """The devices an engine could be given here: ``{"devices": [...], "error": ..., "restricted_by": ...}``.

    Each device: ``uuid`` (what ``CUDA_VISIBLE_DEVICES`` takes), ``name``, ``index`` (the GPU's
    nvidia-smi index), ``bus_id``, memory (MiB) and utilization (%), and ``mig`` (the MIG profile,
    or None for a whole GPU).  ``error``: why nvidia-smi gave no answer, in one line.
    """
    environ = dict(os.environ) if environ is None else environ
    smi = _smi_path()
    if smi is None:
        return {"devices": [], "error": None, "restricted_by": None, "smi": None}
    try:
        listed = parse_gpu_query(_smi_run([smi, f"--query-gpu={SMI_QUERY}", "--format=csv,noheader,nounits"]))
        migs = parse_mig(_smi_run([smi, "-L"])) if listed else {}
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        return {"devices": [], "error": f"{smi}: {exc}", "restricted_by": None, "smi": smi}
    listed.sort(key=lambda g: g["bus_id"])
    devices: list[dict[str, Any]] = []
    for gpu in listed:
        parts = migs.get(gpu["uuid"])
        if not parts:
            devices.append(gpu)
            continue
        for part in parts:  # a GPU in MIG mode: its MIG devices, not the GPU itself
            devices.append(
                dict(gpu, uuid=part["uuid"], gpu_uuid=gpu["uuid"], mig=part["profile"], memory_used_mib=None)
            )
    kept, why = restrict_gpus(devices, environ)
    return {"devices": kept, "error": None, "restricted_by": why, "smi": smi}
