"""A real Slurm on the test hosts: munged and slurmctld here, one slurmd per test host.

The test hosts (:mod:`testhosts`: network namespaces on the 198.18.0.0/24 bridge) become
the compute nodes ``host1`` ... ``hostN``: each runs ``slurmd -N hostI`` in its namespace,
NodeAddr its 198.18.0.x address, with its own spool folder.  slurmctld runs here, in the
root namespace, and listens where the hosts reach it (198.18.0.1); munged runs here with a
throwaway key (its socket is a file, so the namespaces reach it too).  The hosts share this
machine's file system, as an HPC site's shared home.  No cgroups: ``proctrack/linuxproc``,
``task/none``.  Every daemon is started and stopped by pid; :meth:`Slurm.down` leaves nothing.

Partitions: ``debug`` (the default, every host, up) and ``closed`` (every host, DOWN: a job
sent there stays PENDING).  Clients (sbatch, squeue, srun, globular) find it through
``SLURM_CONF`` (:attr:`Slurm.env`).

By hand (as root)::

    python tests/testslurm.py up 3 /tmp/slurm     # hosts + Slurm; prints SLURM_CONF
    SLURM_CONF=/tmp/slurm/slurm.conf sinfo
    python tests/testslurm.py down /tmp/slurm
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import testhosts

CPUS_PER_NODE = 2


def available() -> str | None:
    """Why a test Slurm cannot run here, or None if it can."""
    why = testhosts.available()
    if why:
        return why
    for program in ("slurmctld", "slurmd", "munged", "sbatch"):
        if not shutil.which(program) and not os.path.exists(f"/usr/sbin/{program}"):
            return f"a test Slurm needs {program} (apt-get install slurm-wlm munge)"
    return None


def _program(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


CONF = """\
ClusterName=globulartest
SlurmctldHost={controller}({gateway})
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
SlurmUser=root
SlurmdUser=root
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool/%n
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd-%n.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
MessageTimeout=20
KillWait=5
MinJobAge=300
InactiveLimit=0
Waittime=0
{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
PartitionName=closed Nodes=ALL MaxTime=INFINITE State=DOWN
"""


@dataclass
class Slurm:
    net: testhosts.HostNet
    workdir: Path
    pids: dict[str, int] = field(default_factory=dict)  # daemon -> pid
    ctld_port: int = 6817
    slurmd_port: int = 6818
    gpus: int = 0  # GPUs per node, as Slurm's gres (gres.conf naming fake devices: nothing reads them)

    @property
    def conf(self) -> Path:
        return self.workdir / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    def nodes(self) -> list[str]:
        return [h.name for h in self.net.hosts]

    def up(self) -> Slurm:
        try:
            self._up()
        except BaseException:
            self.down()
            raise
        return self

    def _up(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.workdir, 0o755)  # munged wants its socket's folder reachable
        for sub in ("state", "spool", *(f"spool/{h.name}" for h in self.net.hosts)):
            (self.workdir / sub).mkdir(exist_ok=True)
        # no cgroups are used (linuxproc, task/none), but slurmd loads the plugin: name it, not autodetect
        (self.workdir / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\nCgroupAutomount=no\n")
        key = self.workdir / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        self.pids["munged"] = _start(
            [_program("munged"), "-F", "--force", f"--socket={self.workdir}/munge.sock", f"--key-file={key}",
             f"--pid-file={self.workdir}/munged.pid", f"--log-file={self.workdir}/munged.log",
             f"--seed-file={self.workdir}/munged.seed"],
            self.workdir / "munged.out",
        )  # fmt: skip
        _wait((self.workdir / "munge.sock").exists, "munged's socket", self.workdir / "munged.out")
        gres = f" Gres=gpu:{self.gpus}" if self.gpus else ""
        nodes = "\n".join(
            f"NodeName={h.name} NodeAddr={h.address} CPUs={CPUS_PER_NODE}{gres} State=UNKNOWN" for h in self.net.hosts
        )
        if self.gpus:
            nodes = "GresTypes=gpu\n" + nodes
            (self.workdir / "dev").mkdir(exist_ok=True)
            lines = []
            for host in self.net.hosts:
                for i in range(self.gpus):  # character devices like /dev/null: Slurm only stats them
                    device = self.workdir / "dev" / f"{host.name}-nvidia{i}"
                    if not device.exists():
                        os.mknod(device, stat.S_IFCHR | 0o666, os.makedev(1, 3))
                    lines.append(f"NodeName={host.name} Name=gpu File={device}")
            (self.workdir / "gres.conf").write_text("\n".join(lines) + "\n")
        self.conf.write_text(
            CONF.format(
                controller=socket.gethostname().split(".")[0],
                gateway=testhosts.GATEWAY,
                ctld_port=self.ctld_port,
                slurmd_port=self.slurmd_port,
                munge_socket=self.workdir / "munge.sock",
                dir=self.workdir,
                nodes=nodes,
            )
        )
        env = dict(os.environ, **self.env)
        self.pids["slurmctld"] = _start(
            [_program("slurmctld"), "-D", "-i", "-f", str(self.conf)], self.workdir / "slurmctld.out", env=env
        )
        for host in self.net.hosts:
            self.pids[f"slurmd {host.name}"] = _start(
                ["ip", "netns", "exec", host.netns, _program("slurmd"), "-D", "-N", host.name, "-f", str(self.conf)],
                self.workdir / f"slurmd-{host.name}.out",
                env=env,
            )
        _wait(self._all_idle, "every node idle in sinfo", self.workdir / "slurmctld.log", timeout=60)

    def sinfo(self) -> dict[str, str]:
        """node -> state, as sinfo says."""
        out = self.run("sinfo", "-h", "-N", "-p", "debug", "-o", "%N %t")
        return dict(line.split() for line in out.stdout.splitlines() if line.strip())

    def _all_idle(self) -> bool:
        try:
            states = self.sinfo()
        except subprocess.CalledProcessError:
            return False
        return sorted(states) == sorted(self.nodes()) and all(s == "idle" for s in states.values())

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            argv, capture_output=True, text=True, check=check, env=dict(os.environ, **self.env), timeout=60
        )

    def jobs(self) -> list[str]:
        """Every job in the queue (any state but ended): ``id name state``."""
        out = self.run("squeue", "-h", "-o", "%i %j %T")
        return [line.strip() for line in out.stdout.splitlines() if line.strip()]

    def down(self) -> None:
        """Cancel every job, stop every daemon by pid (slurmds first). Idempotent."""
        if "slurmctld" in self.pids and self.conf.exists():
            self.run("scancel", "--user=root", check=False)
        order = sorted(self.pids, key=lambda name: (not name.startswith("slurmd"), name == "munged"))
        for name in order:
            _stop(self.pids.pop(name))


def _start(argv: list[str], out: Path, env: dict[str, str] | None = None) -> int:
    with open(out, "ab") as log:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )
    return proc.pid


def _stop(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except OSError:
        return
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0]:
                break
        except ChildProcessError:
            if not os.path.exists(f"/proc/{pid}"):
                break
        time.sleep(0.05)
    else:
        try:
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except OSError:
            pass
    # slurmstepd of a job that was running: in the daemon's group (linuxproc, no cgroups)
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass


def _wait(ready, what: str, log: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else "(no log)"
            raise RuntimeError(f"test Slurm: no {what} after {timeout:g}s; {log}:\n{tail}")
        time.sleep(0.2)


def main(argv: list[str]) -> int:
    if len(argv) >= 3 and argv[1] == "up":
        workdir = Path(argv[3] if len(argv) > 3 else "/tmp/globular-testslurm")
        net = testhosts.HostNet(workdir=workdir / "net").up(int(argv[2]))
        slurm = Slurm(net, workdir)
        try:
            slurm.up()
        except BaseException:
            net.down()
            raise
        (workdir / "slurm.json").write_text(json.dumps(slurm.pids))
        print(f"SLURM_CONF={slurm.conf}")
        return 0
    if len(argv) >= 2 and argv[1] == "down":
        workdir = Path(argv[2] if len(argv) > 2 else "/tmp/globular-testslurm")
        net = testhosts.HostNet.load(workdir / "net")
        slurm = Slurm(net, workdir, pids=json.loads((workdir / "slurm.json").read_text()))
        slurm.down()
        net.down()
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
