"""What a node is: its cores, GPUs (asked for), its Python and modules (read from metadata), its addresses."""

from __future__ import annotations

import os
import sys
from typing import Any

from globular.node.gpus import gpu_devices
from globular.node.proc import _alive, children
from globular.node.protocol import Request, verb


def cpus() -> int:
    """The cores this process may use: a Slurm job's allocation (SLURM_CPUS_ON_NODE), else the
    CPUs it is allowed to run on, else the machine's."""
    allocated = os.environ.get("SLURM_CPUS_ON_NODE", "")
    if allocated.isdigit() and int(allocated) > 0:
        return int(allocated)
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def usage() -> dict[str, Any]:
    """CPU time (busy and total jiffies since boot, from /proc/stat: two samples make a percent)
    and memory (total and available bytes, /proc/meminfo); None where the node has no /proc."""
    found: dict[str, Any] = {"cpu": None, "memory": None}
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        found["cpu"] = [sum(fields) - idle, sum(fields)]
    except (OSError, ValueError, IndexError):
        pass
    try:
        meminfo = {}
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                meminfo[key] = int(value.split()[0]) * 1024
        found["memory"] = [meminfo["MemTotal"], meminfo.get("MemAvailable", meminfo.get("MemFree", 0))]
    except (OSError, ValueError, KeyError, IndexError):
        pass
    return found


@verb(any_python=True)
def addresses(req: Request) -> Any:
    """IPv4 address of each network interface: ``{"eth0": "10.0.0.5", ...}``."""
    import fcntl
    import socket
    import struct

    found = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
            except OSError:
                continue
            found[name] = socket.inet_ntoa(packed[20:24])
    return found


@verb()
def facts(req: Request) -> Any:
    """What preflight needs to know of this node: :func:`node_facts`, and of this Python the
    version of each module of ``req["modules"]`` (read from its metadata: no import) and the
    answers to a plugin's ``req["questions"]`` (``{name: code}``: the code runs in this Python
    and sets ``answer``; ipcluster asks whether pyzmq has CURVE), all in one round trip."""
    import importlib
    import importlib.metadata
    import importlib.util

    found: dict[str, dict[str, str | None]] = {}
    for name in req.get("modules", []):
        try:
            if name in req.get("load", []):
                importlib.import_module(name)
            elif importlib.util.find_spec(name) is None:
                found[name] = {"error": "not installed"}
                continue
            found[name] = {"version": importlib.metadata.version(name)}
        except importlib.metadata.PackageNotFoundError:
            found[name] = {"version": None}
        except Exception as exc:  # noqa: BLE001 - a broken install raises anything; its message is the answer
            found[name] = {"error": f"{type(exc).__name__}: {exc}"}
    answers: dict[str, Any] = {}
    for name, code in (req.get("questions") or {}).items():  # a plugin's own questions, in this Python
        scope: dict[str, Any] = {}
        try:
            exec(compile(code, f"<question {name}>", "exec"), scope)
            answers[name] = scope.get("answer")
        except Exception as exc:  # noqa: BLE001 - a broken module: its message is the answer
            answers[name] = f"{type(exc).__name__}: {exc}"
    return {**node_facts(req), "modules": found, "answers": answers}


@verb(any_python=True)
def node_facts(req: Request) -> Any:
    """Of the node, whatever Python asks: cores, load, uptime, this Python's version, which of
    ``req["procs"]`` are alive, with ``req["gpus"]`` the GPUs this process may use
    (:func:`~globular.node.gpus.gpu_devices`), with ``req["usage"]`` CPU and memory samples,
    and which of ``req["folders"]`` exist as something else."""
    try:
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError):
        uptime = None
    return {
        "alive": [_alive(p) for p in req.get("procs", [])],
        "children": children({"procs": req.get("parents", [])}) if req.get("parents") else [],
        "python": ".".join(map(str, sys.version_info[:3])),
        "executable": sys.executable,
        "cpus": cpus(),
        "load": list(os.getloadavg()),
        "uptime": uptime,
        "modules": {},
        "answers": {},
        "gpus": gpu_devices() if req.get("gpus") else None,
        "usage": usage() if req.get("usage") else None,
        # folders something will be made in that exist as something else (a file)
        "not_folders": [
            p
            for p in req.get("folders", [])
            if os.path.lexists(os.path.expanduser(p)) and not os.path.isdir(os.path.expanduser(p))
        ],
    }
