"""Test hosts: network namespaces on a bridge, each running its own sshd.

With ``sshd=False`` they are bare namespaces (a netns provider's nodes): no sshd, the bridge
has no address here and each host's address is unreachable from here (a route that says so), so
this machine reaches none of them but through ``ip netns exec``.

Addresses are in 198.18.0.0/24 only (the benchmarking range, RFC 2544): the
bridge in the root namespace is 198.18.0.1 (the machine that runs globular),
host ``i`` is 198.18.0.(10+i) (``first`` moves that: the ec2 tests need the
addresses moto hands out in a 198.18.0.0/24 subnet, which start at .4).  Every sshd has a throwaway host key and accepts
one throwaway client key.  Everything is removed by :meth:`HostNet.down`.

By hand (as root)::

    python tests/testhosts.py up 3 /tmp/hosts     # prints the hosts, the key, known_hosts
    python tests/testhosts.py down /tmp/hosts
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

SUBNET = "198.18.0"
GATEWAY = f"{SUBNET}.1"
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # sshd's, for root


def available() -> str | None:
    """Why test hosts cannot be made here, or None if they can."""
    if os.geteuid() != 0:
        return "test hosts need root (network namespaces)"
    if not os.path.exists(SSHD):
        return "test hosts need sshd (apt-get install openssh-server)"
    if not shutil.which("ip"):
        return "test hosts need iproute2"
    return None


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, check=check)


@dataclass
class Host:
    name: str
    netns: str
    address: str
    sshd_pid: int = 0


@dataclass
class HostNet:
    workdir: Path
    tag: str = field(default_factory=lambda: secrets.token_hex(3)[:5])  # names stay within 15 chars
    hosts: list[Host] = field(default_factory=list)
    first: int = 11  # the last octet of host1's address
    path: dict[str, str] = field(default_factory=dict)  # host name -> a folder first on its sessions' PATH
    sshd: bool = True  # False: no sshd, and no address here on the bridge (reached only by ip netns exec)

    @property
    def bridge(self) -> str:
        return f"glb{self.tag}"

    @property
    def key(self) -> Path:
        return self.workdir / "id_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.workdir / "known_hosts"

    def up(self, count: int) -> HostNet:
        reason = available()
        if reason:
            raise RuntimeError(reason)
        in_use = sh("ip", "-o", "-4", "addr", "show", "to", f"{SUBNET}.0/24", check=False).stdout.split()
        if in_use:
            raise RuntimeError(
                f"{SUBNET}.0/24 is already in use on {in_use[1]} (other test hosts? `testhosts.py down DIR`)"
            )
        self.workdir.mkdir(parents=True, exist_ok=True)
        os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege separation directory
        try:
            self._keys()
            sh("ip", "link", "add", self.bridge, "type", "bridge")
            if self.sshd:
                sh("ip", "addr", "add", f"{GATEWAY}/24", "dev", self.bridge)
            sh("ip", "link", "set", self.bridge, "up")
            for i in range(1, count + 1):
                self._host(i)
            self._save()
            for host in self.hosts if self.sshd else ():
                _wait_port(host.address, 22)
        except BaseException:
            self.down()
            raise
        return self

    def _keys(self) -> None:
        for path in (self.key, self.workdir / "host_ed25519"):
            if not path.exists():
                sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "globular-test", "-f", str(path))
        (self.workdir / "authorized_keys").write_text(Path(f"{self.key}.pub").read_text())

    def _host(self, index: int) -> Host:
        host = Host(name=f"host{index}", netns=f"glb{self.tag}h{index}", address=f"{SUBNET}.{self.first - 1 + index}")
        veth = self.veth(index)
        sh("ip", "netns", "add", host.netns)
        self.hosts.append(host)  # recorded before anything else, so down() removes it
        sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", host.netns)
        sh("ip", "link", "set", veth, "master", self.bridge, "up")
        sh("ip", "-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "eth0")
        sh("ip", "-n", host.netns, "link", "set", "eth0", "up")
        sh("ip", "-n", host.netns, "link", "set", "lo", "up")
        if not self.sshd:
            sh("ip", "route", "add", "unreachable", f"{host.address}/32")
            return host
        config = self.workdir / f"sshd_{host.name}.conf"
        config.write_text(
            f"ListenAddress {host.address}\nPort 22\n"
            f"HostKey {self.workdir / 'host_ed25519'}\n"
            f"AuthorizedKeysFile {self.workdir / 'authorized_keys'}\n"
            "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "UsePAM no\nStrictModes no\nPidFile none\nSubsystem sftp internal-sftp\nLogLevel ERROR\n"
            # a client that vanished (its host's link cut) must not leave a session behind
            "ClientAliveInterval 5\nClientAliveCountMax 2\n"
            + (f"SetEnv PATH={self.path[host.name]}:{DEFAULT_PATH}\n" if host.name in self.path else "")
        )
        log = open(self.workdir / f"sshd_{host.name}.log", "ab")  # noqa: SIM115 - sshd's, until it stops
        proc = subprocess.Popen(
            ["ip", "netns", "exec", host.netns, SSHD, "-D", "-e", "-f", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        host.sshd_pid = proc.pid
        host_key = (self.workdir / "host_ed25519.pub").read_text().split()[:2]
        with open(self.known_hosts, "a") as f:
            f.write(f"{host.address} {' '.join(host_key)}\n")
        return host

    def _save(self) -> None:
        data = {"tag": self.tag, "first": self.first, "sshd": self.sshd, "hosts": [asdict(h) for h in self.hosts]}
        (self.workdir / "hosts.json").write_text(json.dumps(data, indent=2))

    @classmethod
    def load(cls, workdir: Path) -> HostNet:
        data = json.loads((workdir / "hosts.json").read_text())
        return cls(
            workdir=workdir, tag=data["tag"], first=data.get("first", 11), sshd=data.get("sshd", True),
            hosts=[Host(**h) for h in data["hosts"]],
        )  # fmt: skip

    def ssh(
        self, host: Host, command: str, *, key: Path | None = None, timeout: float = 20
    ) -> subprocess.CompletedProcess:
        return subprocess.run(
            [
                "ssh",
                "-i",
                str(key or self.key),
                "-o",
                f"UserKnownHostsFile={self.known_hosts}",
                "-o",
                "StrictHostKeyChecking=yes",
                "-o",
                "BatchMode=yes",
                "-o",
                "ConnectTimeout=5",
                f"root@{host.address}",
                command,
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def veth(self, index: int) -> str:
        """The root namespace's end of host ``index``'s link to the bridge."""
        return f"gv{self.tag}h{index}"

    def limit_rate(self, rate: str | None) -> None:
        """Cap what each host receives at ``rate`` (tc's units: ``"100mbit"``), or lift the cap
        (None): a transfer that lasts long enough to be interrupted on any machine."""
        for index in range(1, len(self.hosts) + 1):
            veth = self.veth(index)
            if rate is None:
                sh("tc", "qdisc", "del", "dev", veth, "root", check=False)
            else:
                sh("tc", "qdisc", "replace", "dev", veth, "root", "tbf", "rate", rate, "burst", "64kb", "latency", "1s")

    def down(self) -> None:
        """Stop every sshd (by pid), delete the namespaces and the bridge. Idempotent."""
        for host in self.hosts:
            if host.sshd_pid:
                try:
                    os.killpg(host.sshd_pid, signal.SIGTERM)
                except OSError:
                    pass
        for host in self.hosts:
            if host.sshd_pid:
                _wait_gone(host.sshd_pid)
            # whatever else still runs in the namespace (an sshd session of a client that
            # vanished, say) would keep it alive after `ip netns del`: stop it by pid
            left = sh("ip", "netns", "pids", host.netns, check=False).stdout.split()
            for pid in map(int, left):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            for pid in map(int, left):
                _wait_gone(pid)
            sh("ip", "netns", "del", host.netns, check=False)
            if not self.sshd:
                sh("ip", "route", "del", "unreachable", f"{host.address}/32", check=False)
        sh("ip", "link", "del", self.bridge, check=False)
        self.hosts = []


def _wait_port(address: str, port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((address, port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"sshd on {address}:{port} did not come up") from None
            time.sleep(0.05)


def _wait_gone(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return
        except OSError:
            return
        time.sleep(0.05)
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass


def main(argv: list[str]) -> int:
    if len(argv) >= 3 and argv[1] == "up":
        workdir = Path(argv[3] if len(argv) > 3 else "/tmp/globular-testhosts")
        net = HostNet(workdir=workdir).up(int(argv[2]))
        print(
            json.dumps(
                {"hosts": [h.address for h in net.hosts], "key": str(net.key), "known_hosts": str(net.known_hosts)},
                indent=2,
            )
        )
        return 0
    if len(argv) >= 2 and argv[1] == "down":
        HostNet.load(Path(argv[2] if len(argv) > 2 else "/tmp/globular-testhosts")).down()
        return 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
