"""The slurm provider against a real Slurm (tests/testslurm.py): slurmctld here, a slurmd on
each netns test host, whose Python is a bare one (globular builds the node environment)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

import testhosts
import testslurm
from conftest import bare_hosts, processes_of, share_env_cache, wait_until

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(testslurm.available() is not None, reason=str(testslurm.available())),
]
HOSTS = 4


@pytest.fixture(scope="module")
def slurm(tmp_path_factory, bare_python, env_cache):
    workdir = tmp_path_factory.mktemp("slurm")
    with bare_hosts(workdir / "net", HOSTS, bare_python, env_cache) as net:
        cluster = testslurm.Slurm(net, workdir / "slurm", gpus=2).up()  # gres the GPU test asks for
        before = os.environ.get("SLURM_CONF")
        os.environ.update(cluster.env)  # the CLI runs and the test's own squeue find it
        try:
            yield cluster
        finally:
            if before is None:
                os.environ.pop("SLURM_CONF", None)
            else:
                os.environ["SLURM_CONF"] = before
            cluster.down()


def slurm_config(
    slurm,
    tmp_path,
    home,
    *,
    cluster: str = "",
    ipcluster: str = "",
    python: str = "",
    cores: int = 1,
    queue_timeout: int = 60,
) -> str:
    remote_dir = tmp_path / "shared"
    share_env_cache(slurm.net.env_cache, home, remote_dir)
    path = tmp_path / "config"
    path.write_text(
        "[global]\ndefault_template = hpc\n[cluster hpc]\nprovider = slurm\n"
        f"python = {python or slurm.net.python}\nremote_dir = {remote_dir}\ncores_per_node = {cores}\nqueue_timeout = {queue_timeout}\n"
        f"plugins = ipcluster\n{cluster}[plugin ipcluster]\nsetup_class = ipcluster\n{ipcluster}"
    )
    return str(path)


def jobs_of(slurm, name: str) -> dict[str, str]:
    """node -> ``jobid STATE`` of cluster ``name``'s queued jobs."""
    found = {}
    for line in slurm.jobs():
        job, job_name, state = line.split()
        if job_name.startswith(f"glb-{name}-"):
            found[job_name.removeprefix(f"glb-{name}-")] = f"{job} {state}"
    return found


ENGINE_ADDRESS = """
import globular, json, sys
def address():
    import socket
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect(("198.18.0.1", 9))
    return s.getsockname()[0]
client = globular.connect(sys.argv[1])
print(json.dumps({"squares": client[:].map_sync(lambda x: x * x, range(12)),
                  "addresses": client[:].apply_sync(address)}))
client.close()
"""


def engines(cli, name: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", ENGINE_ADDRESS, name], capture_output=True, text=True, timeout=120, env=dict(os.environ)
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_a_slurm_cluster_from_start_to_terminate(slurm, cli, home, tmp_path):
    # 2 cores a job: a whole test host each, so three jobs are on three hosts
    config = slurm_config(slurm, tmp_path, home, cores=2, cluster="time_limit = 30\n")  # 30 minutes of walltime
    try:
        lifecycle(slurm, cli, home, tmp_path, config)
    finally:
        cli("terminate", "-y", "hpc", timeout=300)
    assert jobs_of(slurm, "hpc") == {}
    assert not processes_of(home, tmp_path)
    assert not (tmp_path / "shared" / "hpc").exists()


def lifecycle(slurm, cli, home, tmp_path, config) -> None:
    started = cli("-c", config, "start", "-s", "3", "hpc", timeout=600)
    assert started.returncode == 0, started.output
    jobs = jobs_of(slurm, "hpc")
    assert sorted(jobs) == ["master", "node001", "node002"] and all(j.endswith("RUNNING") for j in jobs.values()), jobs
    seen = engines(cli, "hpc")
    assert seen["squares"] == [x * x for x in range(12)]
    # the master keeps a core for the controller: 1 + 2 + 2 engines, on three compute nodes' addresses
    hosts = {h.address for h in slurm.net.hosts}
    assert len(seen["addresses"]) == 5 and len(set(seen["addresses"])) == 3 and set(seen["addresses"]) <= hosts, seen

    status = cli("status", "hpc", "--output", "json")
    assert status.returncode == 0, status.output
    nodes = json.loads(status.stdout)["result"]["nodes"]
    assert all(re.match(r"\d+ running, (29:[0-5]\d|30:00) left", n["columns"]["job"]) for n in nodes), nodes

    added = cli("addnode", "hpc", timeout=300)
    assert added.returncode == 0, added.output
    assert sorted(jobs_of(slurm, "hpc")) == ["master", "node001", "node002", "node003"]
    assert len(set(engines(cli, "hpc")["addresses"])) == 4

    cancelled = jobs_of(slurm, "hpc")["node001"].split()[0]
    removed = cli("removenode", "hpc", "node001", timeout=300)
    assert removed.returncode == 0, removed.output
    assert "node001" not in jobs_of(slurm, "hpc") and not any(j.split()[0] == cancelled for j in slurm.jobs())
    assert len(engines(cli, "hpc")["addresses"]) == 5

    restarted = cli("runplugin", "ipclusterrestart", "hpc", timeout=300)
    assert restarted.returncode == 0, restarted.output
    assert engines(cli, "hpc")["squares"][-1] == 121

    shell = cli("sshnode", "hpc", "node002", "hostname -I; echo job $SLURM_JOB_ID")
    node002 = jobs_of(slurm, "hpc")["node002"].split()[0]
    assert shell.returncode == 0 and f"job {node002}" in shell.stdout, shell.output

    # Slurm ends a job behind globular's back (an admin, a preemption): status says which, and why
    slurm.run("scancel", node002)
    assert wait_until(lambda: "node002" not in jobs_of(slurm, "hpc"), timeout=30)
    status = cli("status", "hpc")
    assert status.returncode != 0
    assert re.search(rf"node002 .*job {node002} ended: CANCELLED", status.output), status.output
    listed = cli("listclusters")
    assert re.search(rf"degraded: node002 job {node002} ended: CANCELLED", listed.output), listed.output

    gone = cli("terminate", "-y", "hpc", timeout=300)
    assert gone.returncode == 0, gone.output


GROW = """
import globular, sys, time
client = globular.connect(sys.argv[1])
def slow(x):
    import time
    time.sleep(2)
    return x * x
print(client.load_balanced_view().map_sync(slow, range(int(sys.argv[2]) if len(sys.argv) > 2 else 16)))
client.close()
"""


def test_the_balancer_replaces_a_cancelled_job_and_grows_with_jobs(slurm, cli, home, tmp_path):
    bounds = "min_nodes = 2\nmax_nodes = 3\npolling_interval = 1s\nwait_time = 2s\nkill_after = 10m\n"
    config = slurm_config(slurm, tmp_path, home, cores=2, cluster=bounds)
    try:
        started = cli("-c", config, "start", "elastic", timeout=600)  # no -s: min_nodes; its balancer detached
        assert started.returncode == 0 and "Its balancer follows the work (2..3 nodes)" in started.stdout, (
            started.output
        )
        jobs = jobs_of(slurm, "elastic")
        assert sorted(jobs) == ["master", "node001"], jobs
        cancelled = jobs["node001"].split()[0]
        slurm.run("scancel", cancelled)  # an admin, a preemption: the job ends behind globular's back

        def replaced() -> bool:
            job = jobs_of(slurm, "elastic").get("node001", "")
            return bool(job) and job.split()[0] != cancelled and job.endswith("RUNNING")

        assert wait_until(replaced, timeout=180), jobs_of(slurm, "elastic")
        log = (home / "logs" / "elastic.balancer.log").read_text()
        assert f"lost node001: job {cancelled} ended: CANCELLED" in log, log
        # the controller is told at once that the job's engines are gone (nothing of theirs is
        # left to say so), not left to its heartbeat window
        [controller_log] = tmp_path.glob("**/master/logs/controller.log")
        assert "requested 'unregistration_request'" in controller_log.read_text(), controller_log.read_text()[-3000:]

        def answered_by_three() -> bool:  # the replacement's engines in, the cancelled job's dropped (heartbeat)
            try:
                return len(engines(cli, "elastic")["addresses"]) == 3
            except AssertionError:  # an engine of the cancelled job, not dropped yet, failed its task
                return False

        assert wait_until(answered_by_three, timeout=60, interval=1.0)

        grow = subprocess.Popen([sys.executable, "-c", GROW, "elastic"], stdout=subprocess.PIPE, text=True)
        try:
            assert wait_until(lambda: "node002" in jobs_of(slurm, "elastic"), timeout=120), jobs_of(slurm, "elastic")
            out, _ = grow.communicate(timeout=180)
        finally:
            if grow.poll() is None:
                grow.kill()
                grow.wait()
        assert out.strip() == str([x * x for x in range(16)])
    finally:
        cli("terminate", "-y", "elastic", timeout=300)
    assert jobs_of(slurm, "elastic") == {}
    assert not processes_of(home, tmp_path)


def test_a_job_near_its_time_limit_is_replaced_before_it_ends_and_no_task_is_lost(slurm, cli, home, tmp_path):
    """Jobs of one minute, replace_before 45s: some 15 s after it started, node001's job gets a
    replacement, is drained and cancelled by globular (not ended by Slurm's limit), while a map
    without retries runs through it."""
    # no growth (wait_time 10m): the one node added is node001's replacement, within max_nodes
    bounds = (
        "min_nodes = 2\nmax_nodes = 3\npolling_interval = 1s\nwait_time = 10m\nkill_after = 10m\nreplace_before = 45s\n"
    )
    config = slurm_config(slurm, tmp_path, home, cores=2, cluster=f"time_limit = 1\n{bounds}")
    try:
        started = cli("-c", config, "start", "short", timeout=600)
        assert started.returncode == 0, started.output
        first = jobs_of(slurm, "short")["node001"].split()[0]
        work = subprocess.Popen([sys.executable, "-c", GROW, "short", "24"], stdout=subprocess.PIPE, text=True)
        try:  # its tasks go first (the scheduler serves its queue in order), then node001 leaves, before 60 s
            assert wait_until(lambda: "node001" not in jobs_of(slurm, "short"), timeout=50), jobs_of(slurm, "short")
            out, _ = work.communicate(timeout=40)
        finally:
            if work.poll() is None:
                work.kill()
                work.wait()
        assert out.strip() == str([x * x for x in range(24)])  # nothing lost, no retries set
        assert jobs_of(slurm, "short")["node002"].endswith("RUNNING")
        ended = slurm.run("scontrol", "show", "job", first).stdout
        assert "JobState=CANCELLED" in ended, ended  # globular's doing, before the time limit
        balancer_log = home / "logs" / "short.balancer.log"  # its line follows the job's cancel
        assert wait_until(lambda: "node001 replaced by node002 before its end" in balancer_log.read_text(), timeout=15)
        log = balancer_log.read_text()
        assert "replacing node001, which ends in" in log, log
        assert "the master ends in" in log, log
    finally:
        cli("terminate", "-y", "short", timeout=300)
    assert jobs_of(slurm, "short") == {}


def test_a_partition_slurm_refuses_fails_start_with_slurms_message(slurm, cli, home, tmp_path):
    config = slurm_config(slurm, tmp_path, home, cluster="partition = nosuch\n")
    started = cli("-c", config, "start", "-s", "2", "bad")
    assert started.returncode == 1
    assert "Slurm refused its job" in started.stderr and "Invalid partition name specified" in started.stderr
    assert jobs_of(slurm, "bad") == {}
    assert cli("listclusters").output.count("bad") == 0


def test_jobs_pending_past_queue_timeout_are_cancelled_and_start_says_why(slurm, cli, home, tmp_path):
    config = slurm_config(slurm, tmp_path, home, cluster="partition = closed\n", queue_timeout=4)
    started = cli("-c", config, "start", "-s", "2", "stuck")
    assert started.returncode == 1
    assert re.search(r"master\s+PENDING \(PartitionDown\) \d+s", started.stderr), started.stderr  # shown while waiting
    assert "still PENDING (PartitionDown) after 4s (queue_timeout); cancelled" in started.stderr, started.stderr
    assert jobs_of(slurm, "stuck") == {}


def test_a_lost_record_still_lets_terminate_cancel_the_jobs(slurm, cli, home, tmp_path):
    config = slurm_config(slurm, tmp_path, home, cluster="environment = system\n", python=sys.executable)
    started = cli("-c", config, "start", "-s", "2", "lost", timeout=300)
    assert started.returncode == 0, started.output
    assert len(jobs_of(slurm, "lost")) == 2
    (home / "clusters" / "lost.json").unlink()  # a crash, a wiped home
    gone = cli("-c", config, "terminate", "-y", "lost", timeout=300)
    assert gone.returncode == 0, gone.output
    assert jobs_of(slurm, "lost") == {}
    assert wait_until(lambda: not processes_of(home, tmp_path), timeout=30)


def test_the_fixture_is_a_real_slurm(slurm):
    """sinfo lists the test hosts; a job runs on one, in its namespace (its own address)."""
    assert sorted(slurm.sinfo()) == [f"host{i}" for i in range(1, HOSTS + 1)]
    out = slurm.run("srun", "-N1", "-w", "host2", "hostname", "-I")
    assert out.stdout.split()[0] == slurm.net.hosts[1].address
    assert testhosts.GATEWAY.startswith("198.18.0.")


def test_a_controller_the_compute_nodes_cannot_reach_fails_start_naming_them(slurm, cli, home, tmp_path):
    """The controller listens on loopback of the master's compute node: the others' preflight
    connection fails, before any engine starts, and each is named."""
    config = slurm_config(slurm, tmp_path, home, cluster="environment = system\n", python=sys.executable, cores=2,
                          ipcluster="controller_interface = lo\n")  # fmt: skip
    started = cli("-c", config, "start", "-s", "2", "far", timeout=300)
    assert started.returncode == 1, started.output
    assert re.search(r"node001: .*cannot reach the controller's address 127\.0\.0\.1:\d+", started.stderr), (
        started.stderr
    )
    assert jobs_of(slurm, "far") == {}


def test_idle_shutdown_ends_the_masters_job(slurm, cli, home, tmp_path):
    """Idle shutdown on Slurm gives the allocation back: the master's watcher stops the
    controller, then cancels its own job (never powers anything off)."""
    config = slurm_config(slurm, tmp_path, home, cluster="environment = system\n", python=sys.executable,
                          ipcluster="idle_shutdown = 3s\n")  # fmt: skip
    started = cli("-c", config, "start", "-s", "2", "idle", timeout=300)
    try:
        assert started.returncode == 0, started.output
        assert wait_until(lambda: "master" not in jobs_of(slurm, "idle"), timeout=60), jobs_of(slurm, "idle")
        assert "node001" in jobs_of(slurm, "idle")  # its own watcher waits for the controller to stay gone
    finally:
        stopped = cli("terminate", "-y", "idle", timeout=300)
    assert stopped.returncode == 0, stopped.output
    assert jobs_of(slurm, "idle") == {}


def test_gpu_engines_stay_within_the_jobs_gpus(slurm, cli, home, tmp_path):
    """gpus_per_node = 1 on nodes of 2 GPUs: the job is given one (Slurm's CUDA_VISIBLE_DEVICES),
    and gpu_engines = auto starts one engine, pinned to that GPU's UUID (stand-in nvidia-smi)."""
    from gpu_standin import LAYOUTS, standin_nvidia_smi

    smi = standin_nvidia_smi(tmp_path / "smi", "two")
    env = {"PATH": f"{smi}:{os.environ['PATH']}"}  # sbatch passes it on to the jobs, as it does by default
    config = slurm_config(slurm, tmp_path, home, cluster="environment = system\ngpus_per_node = 1\n",
                          python=sys.executable, cores=2, ipcluster="gpu_engines = auto\n")  # fmt: skip
    started = cli("-c", config, "start", "-s", "2", "gpu", timeout=300, env=env)
    try:
        assert started.returncode == 0, started.output
        seen = subprocess.run(
            [sys.executable, "-c", GPU_SEEN, "gpu"],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, **env},
        )
    finally:
        stopped = cli("terminate", "-y", "gpu", timeout=300, env=env)
    assert seen.returncode == 0, seen.stderr
    given = json.loads(seen.stdout)
    assert len(given) == 2, given  # one engine per node: the one GPU of each job, not the node's two
    for one in given:
        index = int(one["slurm"].split(",")[0])  # the job's GPU, as Slurm numbers them
        assert one["cuda"] == LAYOUTS["two"][index]["uuid"] and one["order"] == "PCI_BUS_ID", one
    assert stopped.returncode == 0, stopped.output


GPU_SEEN = """
import globular, json, sys
client = globular.connect(sys.argv[1])
def seen():
    import os
    return {"cuda": os.environ.get("CUDA_VISIBLE_DEVICES"), "order": os.environ.get("CUDA_DEVICE_ORDER"),
            "slurm": os.environ.get("SLURM_JOB_GPUS") or os.environ.get("SLURM_STEP_GPUS") or ""}
print(json.dumps(client[:].apply_sync(seen)))
client.close()
"""


def test_put_and_get_go_through_the_jobs_helper(slurm, cli, home, tmp_path):
    """Slurm nodes have no SSH of globular's: files travel in chunks through each job's helper,
    under a temporary name renamed once whole; only what changed goes again."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "small.txt").write_text("hello\n")
    (data / "big.bin").write_bytes(os.urandom(3 * (1 << 20) + 17))  # more than one chunk
    config = slurm_config(slurm, tmp_path, home, cluster="environment = system\n", python=sys.executable)
    started = cli("-c", config, "start", "-s", "2", "files", timeout=300)
    try:
        assert started.returncode == 0, started.output
        put = cli("put", "files", str(data), "incoming", "--output", "json", timeout=300)
        again = cli("put", "files", str(data), "incoming", "--output", "json", timeout=300)
        got = cli("get", "files", "incoming/data", str(tmp_path / "back"), "-n", "node001", timeout=300)
    finally:
        stopped = cli("terminate", "-y", "files", timeout=300)
    assert put.returncode == 0, put.output
    assert json.loads(put.stdout)["result"]["sent"] == 4 and json.loads(again.stdout)["result"]["sent"] == 0
    assert got.returncode == 0, got.output
    for name in ("small.txt", "big.bin"):
        assert (tmp_path / "back" / "data" / name).read_bytes() == (data / name).read_bytes()
    assert stopped.returncode == 0, stopped.output
