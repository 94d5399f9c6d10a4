"""The SSH test hosts themselves: reachable, distinct, key-checked, and removed afterwards."""

from __future__ import annotations

import subprocess

import pytest

import testhosts
from conftest import wait_until

reason = testhosts.available()
pytestmark = pytest.mark.skipif(reason is not None, reason=reason or "")


def netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def test_hosts_up_reachable_distinct_and_gone_after_down(tmp_path):
    net = testhosts.HostNet(workdir=tmp_path / "net")
    try:
        net.up(3)
        assert [h.address for h in net.hosts] == ["198.18.0.11", "198.18.0.12", "198.18.0.13"]
        assert {h.netns for h in net.hosts} <= netns_names()
        for host in net.hosts:
            result = net.ssh(host, "ip -4 -o addr show dev eth0")
            assert result.returncode == 0, result.stderr
            assert f"inet {host.address}/24" in result.stdout
        # hosts reach each other over the bridge
        hop = net.ssh(
            net.hosts[0], f"python3 -c \"import socket; socket.create_connection(('{net.hosts[2].address}', 22), 3)\""
        )
        assert hop.returncode == 0, hop.stderr
        # a key the hosts do not know is refused
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "other")], check=True)
        refused = net.ssh(net.hosts[0], "true", key=tmp_path / "other")
        assert refused.returncode == 255 and "Permission denied" in refused.stderr
        pids = [h.sshd_pid for h in net.hosts]
        names = {h.netns for h in net.hosts}
        # a process left behind in a host (a session whose client vanished, say) goes with it
        stray = subprocess.Popen(["ip", "netns", "exec", net.hosts[1].netns, "sleep", "300"], start_new_session=True)

        def inside() -> bool:
            out = subprocess.run(["ip", "netns", "pids", net.hosts[1].netns], capture_output=True, text=True).stdout
            return str(stray.pid) in out.split()

        assert wait_until(inside, timeout=10)
    finally:
        net.down()
    stray.wait(10)  # a `sleep 300` that ends within 10 s was killed (down() reaps it, so no status is left)
    assert subprocess.run(["kill", "-0", str(stray.pid)], capture_output=True).returncode != 0
    assert not names & netns_names()
    bridge = subprocess.run(["ip", "link", "show", net.bridge], capture_output=True, text=True)
    assert bridge.returncode != 0
    for pid in pids:
        assert subprocess.run(["kill", "-0", str(pid)], capture_output=True).returncode != 0
