"""A stand-in ``nvidia-smi`` for machines without a GPU (CI): the real CLI's output formats
for the two commands globular runs (``--query-gpu=... --format=csv,noheader,nounits`` and
``-L``), for a layout of GPUs.  The only fake in the GPU tests; the engines are real.

Layouts: ``two`` (two H100s), ``mig`` (an A100 in MIG mode with two 3g.20gb devices, beside a
whole A100), ``broken`` (the driver does not answer, as after a kernel update), ``none`` (the CLI
is there and lists nothing); and hostile ones: ``bad-index`` (an index that is not a number),
``not-utf8`` (a name with bytes that are not UTF-8), ``duplicate`` (one UUID listed twice),
``hung`` (it never answers, and starts a child that would outlive it).  The layout is read from
``folder/layout`` at each call, so a test can change it under a running cluster.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

H100 = {"name": "NVIDIA H100 80GB HBM3", "memory.total": "81559", "memory.used": "1", "utilization.gpu": "0"}
A100 = {"name": "NVIDIA A100-SXM4-40GB", "memory.total": "40960", "memory.used": "4", "utilization.gpu": "0"}

LAYOUTS: dict[str, list[dict[str, object]]] = {
    "two": [
        {**H100, "index": "0", "uuid": "GPU-6e1f3a4c-2b9d-4c7e-9a1b-3f5d8e2c7a10", "pci.bus_id": "00000000:18:00.0"},
        {
            **H100,
            "index": "1",
            "uuid": "GPU-b3c8d2e1-7f4a-4e6b-8c2d-9a0e1f3b5c77",
            "pci.bus_id": "00000000:2A:00.0",
            "utilization.gpu": "37",
            "memory.used": "10240",
        },
    ],
    "mig": [
        {
            **A100,
            "index": "0",
            "uuid": "GPU-5d6a1e4b-9c3f-4b2a-8e7d-1f0c2b3a4d5e",
            "pci.bus_id": "00000000:07:00.0",
            "utilization.gpu": "[N/A]",
            "mig": [
                ("3g.20gb", "MIG-4f7e2a1c-8b3d-5e6f-9a0b-1c2d3e4f5a6b"),
                ("3g.20gb", "MIG-9a8b7c6d-5e4f-5a3b-8c2d-1e0f9a8b7c6d"),
            ],
        },
        {**A100, "index": "1", "uuid": "GPU-0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d", "pci.bus_id": "00000000:0F:00.0"},
    ],
    "none": [],
    "bad-index": [{**H100, "index": "GPU0", "uuid": "GPU-6e1f3a4c-2b9d-4c7e-9a1b-3f5d8e2c7a10", "pci.bus_id": "0:18"}],
    "not-utf8": [{**H100, "index": "0", "uuid": "GPU-6e1f3a4c-2b9d-4c7e-9a1b-3f5d8e2c7a10", "pci.bus_id": "0:18",
                  "name": "NVIDIA \udcff\udcfe H100"}],
    "duplicate": [
        {**H100, "index": "0", "uuid": "GPU-6e1f3a4c-2b9d-4c7e-9a1b-3f5d8e2c7a10", "pci.bus_id": "00000000:18:00.0"},
        {**H100, "index": "1", "uuid": "GPU-6e1f3a4c-2b9d-4c7e-9a1b-3f5d8e2c7a10", "pci.bus_id": "00000000:2A:00.0"},
    ],
}  # fmt: skip

BROKEN = (
    "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
    "Make sure that the latest NVIDIA driver is installed and running.\n"
)

PROGRAM = textwrap.dedent(
    """\
    #!/usr/bin/python3
    import json, os, subprocess, sys, time
    LAYOUTS = json.loads({layouts!r})
    BROKEN = {broken!r}
    name = open({layout_file!r}).read().strip()
    args = sys.argv[1:]
    if name == "broken":
        sys.stdout.write(BROKEN)
        sys.exit(9)
    if name == "hung":  # never answers; its child would outlive it if only it were killed
        child = subprocess.Popen(["sleep", "300"])
        with open({calls!r} + ".hung", "a") as f:
            f.write(f"{{os.getpid()}} {{child.pid}}\\n")
        time.sleep(300)
    LAYOUT = LAYOUTS[name]
    with open({calls!r}, "a") as f:
        f.write(" ".join(args) + "\\n")
    if args == ["-L"]:
        for gpu in LAYOUT:
            print(f"GPU {{gpu['index']}}: {{gpu['name']}} (UUID: {{gpu['uuid']}})")
            for n, (profile, uuid) in enumerate(gpu.get("mig") or []):
                print(f"  MIG {{profile:<12}}Device {{n:>2}}: (UUID: {{uuid}})")
        sys.exit(0)
    query = next((a.split("=", 1)[1] for a in args if a.startswith("--query-gpu=")), None)
    if query is None or "--format=csv,noheader,nounits" not in args:
        sys.stderr.write("stand-in nvidia-smi: only --query-gpu=... --format=csv,noheader,nounits and -L\\n")
        sys.exit(2)
    for gpu in LAYOUT:
        line = ", ".join(str(gpu.get(field, "[N/A]")) for field in query.split(","))
        sys.stdout.buffer.write(line.encode("utf-8", "surrogateescape") + b"\\n")  # not-utf8: raw bytes
    """
)


def standin_nvidia_smi(folder: Path, layout: str) -> Path:
    """A folder holding ``nvidia-smi`` for ``layout`` (put it first on PATH; :func:`set_layout`
    changes it); what it was asked is appended to ``folder/calls``, and a hung one's pid and its
    child's to ``folder/calls.hung``."""
    folder.mkdir(parents=True, exist_ok=True)
    program = folder / "nvidia-smi"
    program.write_text(
        PROGRAM.format(
            layouts=json.dumps(LAYOUTS), broken=BROKEN, calls=str(folder / "calls"), layout_file=str(folder / "layout")
        )
    )
    program.chmod(0o755)
    set_layout(folder, layout)
    return folder


def set_layout(folder: Path, layout: str) -> None:
    (folder / "layout").write_text(layout)


def hung_pids(folder: Path) -> list[int]:
    """The pids of the hung stand-ins that ran, and of their children."""
    path = folder / "calls.hung"
    return [int(p) for line in (path.read_text().splitlines() if path.exists() else []) for p in line.split()]


def uuids(layout: str) -> list[str]:
    """The UUIDs an engine may be given in ``layout``, in PCI bus order (MIG devices for a MIG GPU)."""
    found = []
    for gpu in sorted(LAYOUTS[layout], key=lambda g: str(g["pci.bus_id"])):
        mig = gpu.get("mig")
        found += [uuid for _, uuid in mig] if mig else [str(gpu["uuid"])]  # type: ignore[union-attr]
    return found
