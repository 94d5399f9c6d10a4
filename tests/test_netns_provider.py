"""The provider contract on nodes that are not SSH hosts: the worked netns provider
(``docs/examples/netns_provider.py``, installed as a third party's), whose nodes are bare
network namespaces entered with ``ip netns exec``, as ``kubectl exec`` enters a pod.  No sshd
runs there, and this machine has no address on their network: everything reaches them
through the provider (commands, files, the controller's and the notebook's ports).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

import testhosts
from conftest import bare_hosts, check_notebook_forward, read_record, share_env_cache
from test_docs import DOCS, install

reason = testhosts.available()
pytestmark = [pytest.mark.cluster, pytest.mark.skipif(reason is not None, reason=reason or "")]

ENTRY_POINTS = "[globular.providers]\nnetns = netns_provider:NetnsProvider\n"

CLIENT_MAP = """
import sys
from globular import Client

rc = Client(sys.argv[1])
print(rc._globular_tunnel.via, file=sys.stderr)
print(len(rc.ids), rc[:].map_sync(lambda x: x**30, range(8)))
rc.close()
"""


@pytest.fixture(scope="module")
def pods(tmp_path_factory, bare_python, env_cache):
    with bare_hosts(tmp_path_factory.mktemp("pods"), 2, bare_python, env_cache, first=41, sshd=False) as hosts:
        yield hosts


def test_a_provider_whose_nodes_are_entered_by_a_command_runs_the_whole_cluster(pods, cli, home, tmp_path):
    env = install(tmp_path / "site", DOCS / "examples" / "netns_provider.py", ENTRY_POINTS)
    nodes = tmp_path / "nodes"
    share_env_cache(pods.env_cache, home, nodes)
    config = tmp_path / "config"
    config.write_text(
        "[global]\ndefault_template = pods\n[cluster pods]\nprovider = netns\n"
        f"namespaces = {', '.join(h.netns for h in pods.hosts)}\npython = {pods.python}\n"
        f"remote_dir = {nodes}\ncores_per_node = 1\nplugins = ipcluster\n"
        "[plugin ipcluster]\nsetup_class = ipcluster\nenable_notebook = true\n"
    )
    master, node = pods.hosts[0].address, pods.hosts[1].address
    for address in (master, node):  # this machine has no way onto their network: only the provider's
        with pytest.raises(OSError, match="No route to host"):
            socket.create_connection((address, 9), timeout=5).close()

    started = cli("-c", str(config), "start", "pods", env=env, timeout=600)
    try:
        assert started.returncode == 0, started.output
        assert "from globular import Client" in started.stdout  # the master is not reached directly
        record = read_record(home, "pods")
        assert [(n["name"], n["address"], n["login"]) for n in record["nodes"]] == [
            ("master", master, None),
            ("node001", node, None),
        ]
        path = home / "ipcluster" / "pods-netns.json"
        assert json.loads(path.read_text())["interface"] == f"tcp://{master}"  # as the nodes see it

        # the seed's map, through globular.Client: the provider forwards the controller's ports
        mapped = subprocess.run([sys.executable, "-c", CLIENT_MAP, str(path)], capture_output=True, text=True,
                                timeout=120, env={**os.environ, **env})  # fmt: skip
        assert mapped.returncode == 0, mapped.stderr[-3000:]
        assert mapped.stdout.strip() == f"2 {[x**30 for x in range(8)]}", mapped.stdout
        assert mapped.stderr.strip() == "the netns provider's forward to master", mapped.stderr

        shell = cli("sshnode", "pods", "node001", "ip -4 -o addr show eth0; pwd", env=env)
        assert shell.returncode == 0, shell.output
        assert f"inet {node}/24" in shell.stdout and shell.stdout.split()[-1] == str(nodes / "pods" / "node001")
        assert cli("sshnode", "pods", "node001", "exit 7", env=env).returncode == 7
        named = cli("sshnode", "pods", "node001", "hostname", env=env)  # a namespace has this machine's name
        assert named.returncode == 0 and named.stdout.strip() == socket.gethostname(), named.output

        top = cli("top", "pods", "--once", "--output", "json", env=env)
        assert top.returncode == 0, top.output
        frame = json.loads(top.stdout)["result"]
        assert frame["registered"] == frame["expected"] == 2, frame

        (tmp_path / "data").mkdir()
        (tmp_path / "data" / "a.txt").write_text("through the node programs\n")
        put = cli("put", "pods", str(tmp_path / "data"), ".", env=env)
        assert put.returncode == 0, put.output
        assert (nodes / "pods" / "node001" / "data" / "a.txt").read_text() == "through the node programs\n"
        (nodes / "pods" / "node001" / "data" / "b.txt").write_text("made there\n")
        got = cli("get", "pods", "data/b.txt", str(tmp_path / "back"), "-n", "node001", env=env)
        assert got.returncode == 0, got.output
        assert (tmp_path / "back" / "b.txt").read_text() == "made there\n"

        check_notebook_forward(home, "pods", "netns", master, 2, env=env)  # its port forwarded too
    finally:
        stopped = cli("terminate", "-y", "pods", env=env)
    assert stopped.returncode == 0, stopped.output
    assert not (nodes / "pods").exists()
    for index in (0, 1):  # nothing left running in the namespaces
        assert not testhosts.sh("ip", "netns", "pids", pods.hosts[index].netns).stdout.split()
