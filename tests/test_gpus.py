"""GPU engines (issue 28): one engine per GPU, pinned by UUID, seen in status.

CI has no GPU: a stand-in ``nvidia-smi`` (tests/gpu_standin.py, the real CLI's output formats)
is put first on the PATH the nodes see; the engines, the controller and everything else are
real.  The real check on a real GPU is ``benchmarks/gpu_check.py``."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import gone, local_config, read_record
from globular.node.gpus import parse_gpu_query, parse_mig, restrict_gpus
from gpu_standin import LAYOUTS, hung_pids, set_layout, standin_nvidia_smi, uuids

SEEN = """
import globular, json, sys
client = globular.connect(sys.argv[1])
def seen():
    import os
    return {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "GLOBULAR_GPU")}
held = client.gpu_engines()
print(json.dumps({"engines": client[:].apply_sync(seen), "held": held, "view": len(client.gpu_view()) if held else 0}))
client.close()
"""


def engines_saw(name: str, env: dict) -> dict:
    done = subprocess.run([sys.executable, "-c", SEEN, name], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def on_path(folder) -> dict:
    return dict(os.environ, PATH=f"{folder}:{os.environ['PATH']}")


# -- pure logic --------------------------------------------------------------------------------

QUERY_OUT = (
    "0, GPU-6e1f3a4c-2b9d-4c7e-9a1b-3f5d8e2c7a10, NVIDIA H100 80GB HBM3, 81559, 00000000:18:00.0, 1, 0\n"
    "1, GPU-b3c8d2e1-7f4a-4e6b-8c2d-9a0e1f3b5c77, NVIDIA H100 80GB HBM3, 81559, 00000000:2A:00.0, 10240, [N/A]\n"
)


def test_nvidia_smi_query_and_mig_listing_are_read():
    gpus = parse_gpu_query(QUERY_OUT)
    assert [g["index"] for g in gpus] == [0, 1] and gpus[1]["memory_used_mib"] == 10240
    assert gpus[1]["utilization"] is None and gpus[0]["memory_total_mib"] == 81559
    listing = (
        "GPU 0: NVIDIA A100-SXM4-40GB (UUID: GPU-5d6a1e4b-9c3f-4b2a-8e7d-1f0c2b3a4d5e)\n"
        "  MIG 3g.20gb     Device  0: (UUID: MIG-4f7e2a1c-8b3d-5e6f-9a0b-1c2d3e4f5a6b)\n"
        "  MIG 3g.20gb     Device  1: (UUID: MIG-9a8b7c6d-5e4f-5a3b-8c2d-1e0f9a8b7c6d)\n"
        "GPU 1: NVIDIA A100-SXM4-40GB (UUID: GPU-0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d)\n"
    )
    migs = parse_mig(listing)
    assert list(migs) == ["GPU-5d6a1e4b-9c3f-4b2a-8e7d-1f0c2b3a4d5e"]
    assert [m["profile"] for m in migs["GPU-5d6a1e4b-9c3f-4b2a-8e7d-1f0c2b3a4d5e"]] == ["3g.20gb", "3g.20gb"]


def test_the_allocation_restricts_the_gpus():
    devices = parse_gpu_query(QUERY_OUT)
    a, b = (d["uuid"] for d in devices)
    assert restrict_gpus(devices, {}) == (devices, None)
    assert restrict_gpus(devices, {"CUDA_VISIBLE_DEVICES": "1"})[0] == [devices[1]]
    assert restrict_gpus(devices, {"CUDA_VISIBLE_DEVICES": "GPU-b3c8"})[0] == [devices[1]]  # a prefix, as CUDA
    assert restrict_gpus(devices, {"CUDA_VISIBLE_DEVICES": b + "," + a})[0] == [devices[1], devices[0]]
    assert restrict_gpus(devices, {"CUDA_VISIBLE_DEVICES": ""}) == ([], "CUDA_VISIBLE_DEVICES")
    assert restrict_gpus(devices, {"CUDA_VISIBLE_DEVICES": "0,-1,1"})[0] == [devices[0]]  # CUDA stops at -1
    assert restrict_gpus(devices, {"SLURM_JOB_GPUS": "1"}) == ([devices[1]], "SLURM_JOB_GPUS")


def test_a_uuid_prefix_that_names_several_gpus_is_invalid_as_for_cuda():
    devices = parse_gpu_query(QUERY_OUT.replace("GPU-b3c8", "GPU-6e1f"))  # both UUIDs start GPU-6e1f
    assert restrict_gpus(devices, {"CUDA_VISIBLE_DEVICES": "GPU-6e1f"})[0] == []  # CUDA keeps none
    assert restrict_gpus(devices, {"CUDA_VISIBLE_DEVICES": "0,GPU-6e1f,1"})[0] == [devices[0]]  # stops there
    assert restrict_gpus(devices, {"CUDA_VISIBLE_DEVICES": devices[1]["uuid"]})[0] == [devices[1]]
    assert restrict_gpus(devices, {"CUDA_VISIBLE_DEVICES": "GPU-nope,0"})[0] == []  # no match: invalid too


@pytest.mark.parametrize("layout", ["bad-index", "not-utf8", "duplicate", "hung"])
def test_unexpected_nvidia_smi_output_is_a_node_problem_not_a_traceback(tmp_path, monkeypatch, layout):
    """The node program itself, against the stand-in: an answer, never an exception; a hung one is
    stopped after SMI_TIMEOUT with the child it started."""
    import time

    from globular.ipcluster.gpus import judge_gpus
    from globular.ipcluster.settings import IPClusterSettings
    from globular.node.gpus import SMI_TIMEOUT, gpu_devices

    folder = standin_nvidia_smi(tmp_path / "smi", layout)
    monkeypatch.setenv("PATH", f"{folder}:{os.environ['PATH']}")  # where gpu_devices finds nvidia-smi
    started = time.monotonic()
    answer = gpu_devices({})
    took = time.monotonic() - started
    devices, problems = judge_gpus(answer, IPClusterSettings(gpu_engines="auto"))
    if layout == "not-utf8":
        assert problems == [] and "\ufffd" in devices[0]["name"]  # replaced, the GPU still used
        return
    assert devices == [] and len(problems) == 1, (answer, problems)
    said = {
        "bad-index": "unexpected output line 'GPU0, GPU-6e1f3a4c",
        "duplicate": "lists GPU GPU-6e1f3a4c-2b9d-4c7e-9a1b-3f5d8e2c7a10 more than once",
        "hung": f"no answer within {SMI_TIMEOUT:g} s (stopped)",
    }[layout]
    assert said in problems[0], problems
    if layout == "hung":
        assert took < SMI_TIMEOUT + 3
        pids = hung_pids(folder)
        assert len(pids) == 2 and all(gone(pid) for pid in pids)  # the stand-in and its child


def test_engine_counts_and_gpu_judgement():
    from globular.ipcluster.gpus import assign, judge_gpus
    from globular.ipcluster.settings import IPClusterSettings, engines_for
    from globular.state import NodeRecord

    node = NodeRecord(name="node001", address="198.18.0.11", workdir="/w", cores=8, python="python3")
    auto = IPClusterSettings(gpu_engines="auto")
    assert engines_for(node, auto, 2) == 2 and engines_for(node, auto, 0) == 8  # no GPU: a core each
    assert engines_for(node, IPClusterSettings(gpu_engines="auto", cpu_engines=3), 2) == 5
    assert engines_for(node, IPClusterSettings(), 2) == 8  # none: GPUs not looked at
    devices = parse_gpu_query(QUERY_OUT)
    answer = {"devices": devices, "error": None, "restricted_by": None, "smi": "/usr/bin/nvidia-smi"}
    assert judge_gpus(answer, IPClusterSettings(gpu_engines=1)) == (devices[:1], [])
    _, problems = judge_gpus(answer, IPClusterSettings(gpu_engines=3))
    assert problems == ["gpu_engines = 3 needs 3 GPUs; the node has 2 GPUs: NVIDIA H100 80GB HBM3"]
    _, problems = judge_gpus({"devices": [], "smi": None}, IPClusterSettings(gpu_engines=1))
    assert problems == ["gpu_engines = 1 needs 1 GPUs; the node has no GPU (no nvidia-smi)"]
    assert assign([4, 5, 6], devices) == {4: devices[0]["uuid"], 5: devices[1]["uuid"], 6: None}
    many = [{**devices[0], "index": i, "uuid": f"GPU-{i:04d}"} for i in range(2000)]  # a driver gone mad
    used, problems = judge_gpus({**answer, "devices": many}, auto, cores=2)
    assert used == many[:16] and problems == []  # auto: at most eight GPU engines a core
    assert judge_gpus(answer, auto, cores=1) == (devices, [])  # 2 GPUs on 1 core (a Slurm job's): both


# -- real engines on the local provider --------------------------------------------------------


@pytest.mark.cluster
@pytest.mark.parametrize(
    ("layout", "how"),
    [("two", "engine_fork = true"), ("mig", "restart_dead_engines = true"), ("two", "engine_fork = false")],
)
def test_each_gpu_gets_one_engine_pinned_by_uuid(cli, home, write_config, tmp_path, layout, how):
    env = on_path(standin_nvidia_smi(tmp_path / "smi", layout))
    config = str(write_config(local_config(f"gpu_engines = auto\ncpu_engines = 1\n{how}")))
    started = cli("-c", config, "start", "-s", "1", "gpu", env=env)
    assert started.returncode == 0, started.output
    try:
        seen = engines_saw("gpu", env)
        status = cli("status", "gpu", env=env)
        as_json = cli("status", "gpu", "--output", "json", env=env)
        listing = cli("listclusters", env=env)
    finally:
        stopped = cli("terminate", "-y", "gpu", env=env)
    expected = uuids(layout)
    pinned = sorted(e["CUDA_VISIBLE_DEVICES"] for e in seen["engines"] if e["CUDA_VISIBLE_DEVICES"])
    assert pinned == sorted(expected), seen  # one engine per GPU (MIG device), each its own
    assert len(seen["engines"]) == len(expected) + 1  # and the one CPU engine, which sees no GPU
    assert [e["CUDA_VISIBLE_DEVICES"] for e in seen["engines"]].count("") == 1
    assert all(e["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID" for e in seen["engines"])
    assert sorted(seen["held"].values()) == sorted(expected) and seen["view"] == len(expected)
    assert status.returncode == 0, status.output
    flat = " ".join(status.stdout.split())
    assert f"gpu engines {len(expected)}" in flat, status.stdout
    shown = (
        "e0: H100 80GB HBM3 0% 0.0/80 GiB; e1: H100 80GB HBM3 37% 10.0/80 GiB"
        if layout == "two"
        else "e0: A100-SXM4-40GB MIG 3g.20gb;"
    )
    assert shown in flat, status.stdout
    report = json.loads(as_json.stdout)["result"]
    master = report["nodes"][0]
    assert sorted(g["uuid"] for g in master["data"]["gpus"] if g["engine"] is not None) == sorted(expected)
    assert "engines gpu engines health" in " ".join(listing.stdout.split()), listing.stdout
    engines = len(expected) + 1
    assert f"{engines}/{engines} {len(expected)} ok" in " ".join(listing.stdout.split()), listing.stdout
    assert f"{len(expected) + 1} on 1 nodes, {len(expected)} of them on a GPU each" in " ".join(started.stdout.split())
    assert stopped.returncode == 0, stopped.output


@pytest.mark.cluster
def test_the_users_cuda_visible_devices_is_respected(cli, home, write_config, tmp_path):
    env = on_path(standin_nvidia_smi(tmp_path / "smi", "two"))
    env["CUDA_VISIBLE_DEVICES"] = "GPU-b3c8"
    config = str(write_config(local_config("gpu_engines = auto")))
    started = cli("-c", config, "start", "-s", "1", "gpu", env=env)
    assert started.returncode == 0, started.output
    try:
        seen = engines_saw("gpu", env)
    finally:
        stopped = cli("terminate", "-y", "gpu", env=env)
    assert [e["CUDA_VISIBLE_DEVICES"] for e in seen["engines"]] == [LAYOUTS["two"][1]["uuid"]]
    assert stopped.returncode == 0, stopped.output


@pytest.mark.cluster
@pytest.mark.parametrize(
    ("layout", "setting", "message"),
    [
        ("two", "gpu_engines = 3", "master: gpu_engines = 3 needs 3 GPUs; the node has 2 GPUs: NVIDIA H100 80GB HBM3"),
        ("broken", "gpu_engines = auto", "nvidia-smi failed: "),
    ],
)
def test_a_node_without_the_gpus_asked_for_fails_the_preflight(
    cli, home, write_config, tmp_path, layout, setting, message
):
    env = on_path(standin_nvidia_smi(tmp_path / "smi", layout))
    config = str(write_config(local_config(setting)))
    started = cli("-c", config, "start", "-s", "1", "gpu", env=env)
    assert started.returncode == 1, started.output
    assert message in started.stderr, started.stderr
    if layout == "broken":
        assert "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver" in started.stderr
    assert cli("listclusters", env=env).stdout.count("gpu") == 0  # nothing left: no record, no process
    assert not (home / "clusters" / "gpu.json").exists() or read_record(home, "gpu")["status"] != "running"


@pytest.mark.cluster
def test_a_hung_nvidia_smi_holds_status_and_top_no_longer_than_its_timeout(cli, home, write_config, tmp_path):
    """nvidia-smi stops answering under a running GPU cluster: `status` and `top --once` end
    within the node's nvidia-smi timeout and a node round trip, name the problem, and leave no
    nvidia-smi (nor the child it started) running."""
    import time

    from globular.node.gpus import SMI_TIMEOUT

    folder = standin_nvidia_smi(tmp_path / "smi", "two")
    env = on_path(folder)
    started = cli("-c", str(write_config(local_config("gpu_engines = auto"))), "start", "-s", "1", "hung", env=env)
    assert started.returncode == 0, started.output
    try:
        set_layout(folder, "hung")
        began = time.monotonic()
        status = cli("status", "hung", env=env, timeout=120)
        status_took = time.monotonic() - began
        began = time.monotonic()
        top = cli("top", "hung", "--once", "--output", "json", env=env, timeout=120)
        top_took = time.monotonic() - began
        pids = hung_pids(folder)
    finally:
        set_layout(folder, "two")
        stopped = cli("terminate", "-y", "hung", env=env)
    assert status.returncode == 1 and f"no answer within {SMI_TIMEOUT:g} s" in status.stdout + status.stderr, (
        status.output
    )
    assert status_took < SMI_TIMEOUT + 10, status_took
    assert top.returncode == 0, top.output
    assert top_took < 2 * SMI_TIMEOUT + 10, top_took  # two frames, each asking the node once
    assert pids and all(gone(pid) for pid in pids), pids  # each hung nvidia-smi and its child
    assert stopped.returncode == 0, stopped.output


# -- ssh hosts with a bare Python: one with GPUs, one without ---------------------------------


@pytest.mark.cluster
def test_gpu_and_cpu_hosts_over_ssh(cli, home, tmp_path, bare_python, env_cache):
    """host1 has two GPUs (its sessions' PATH holds the stand-in), host2 none: under
    gpu_engines = auto host1 runs an engine per GPU, host2 one per core with no GPU visible."""
    import testhosts  # noqa: F401 - skips with the fixture's reason where hosts cannot be made
    from conftest import bare_hosts, share_env_cache, ssh_config

    smi = standin_nvidia_smi(tmp_path / "smi", "two")
    with bare_hosts(tmp_path / "net", 2, bare_python, env_cache, path={"host1": str(smi)}) as net:
        remote_dir = tmp_path / "hosts"
        share_env_cache(env_cache, home, remote_dir)
        config = ssh_config(tmp_path / "config", net, remote_dir, "gpu_engines = auto\n")
        started = cli("-c", str(config), "start", "lab", timeout=600)
        try:
            assert started.returncode == 0, started.output
            seen = engines_saw("lab", dict(os.environ))
            status = cli("status", "lab")
        finally:
            stopped = cli("terminate", "-y", "lab", timeout=300)
    visible = sorted(e["CUDA_VISIBLE_DEVICES"] for e in seen["engines"])
    assert visible == ["", *uuids("two")], seen  # host2's CPU engine sees none
    assert "e0: H100 80GB HBM3" in " ".join(status.stdout.split()), status.stdout
    assert (smi / "calls").read_text().count("-L") >= 1  # host1 asked the stand-in: it was on its PATH
    assert stopped.returncode == 0, stopped.output


@pytest.mark.cluster
def test_check_says_what_gpus_each_node_gives_its_engines(cli, home, write_config, tmp_path):
    env = on_path(standin_nvidia_smi(tmp_path / "smi", "two"))
    config = str(write_config(local_config("gpu_engines = auto\ncpu_engines = 1")))
    checked = cli("-c", config, "check", "t", "--output", "json", env=env)
    assert checked.returncode == 0, checked.output
    master, node = json.loads(checked.stdout)["result"]["checks"]
    assert master["gpus"] == uuids("two") and master["engines"] == 3
    # local nodes are one machine: the second sees the same GPUs, and is told
    assert node["gpus"] == uuids("two") and "its GPUs are master's too (the same machine)" in node["warnings"][-1]
    table = cli("-c", config, "check", "t", env=env)
    header, row = table.stdout.splitlines()[0].split(), table.stdout.splitlines()[1].split()
    assert "gpus" in header and row[header.index("gpus")] == "2" and row[header.index("engines")] == "3", table.stdout
