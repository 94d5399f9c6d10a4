"""addnode / removenode on a running local cluster, seen by an already-connected client."""

from __future__ import annotations

import pytest

from conftest import gone, read_record, recorded_pids, wait_until

pytestmark = pytest.mark.cluster

CONFIG = (
    "[global]\ndefault_template = t\n"
    "[cluster t]\ncluster_size = 2\ncores_per_node = 1\nplugins = ipcluster{extra}\n"
    "[plugin ipcluster]\nsetup_class = ipcluster\n"
    "[plugin failadd]\nsetup_class = globular_test_plugins.FailOnAdd\n"
)


def nodes_of_engines(client) -> list[str]:
    return sorted(client[:].apply_sync(lambda: __import__("os").environ["GLOBULAR_NODE"]))


def test_addnode_and_removenode_seen_by_connected_client(cli, home, write_config):
    config = str(write_config(CONFIG.format(extra="")))
    assert cli("-c", config, "start", "el").returncode == 0
    from ipyparallel import Client

    client = Client(str(home / "ipcluster" / "el-local.json"))
    try:
        assert len(client.ids) == 2
        added = cli("-c", config, "addnode", "-n", "2", "el")
        assert added.returncode == 0, added.output
        assert "Added node002, node003 to el" in added.stdout
        assert wait_until(lambda: len(client.ids) == 4)
        assert nodes_of_engines(client) == ["master", "node001", "node002", "node003"]
        assert client[:].map_sync(lambda x: x**30, range(8)) == [x**30 for x in range(8)]

        record = read_record(home, "el")
        node001 = next(n for n in record["nodes"] if n["name"] == "node001")
        pids = [p["pid"] for p in node001["processes"]]
        removed = cli("-c", config, "removenode", "el", "node001")
        assert removed.returncode == 0, removed.output
        assert all(gone(pid) for pid in pids)
        assert len(client.ids) == 3  # removenode waited until the controller let them go
        assert nodes_of_engines(client) == ["master", "node002", "node003"]
        record = read_record(home, "el")
        assert [n["name"] for n in record["nodes"]] == ["master", "node002", "node003"]
        assert record["plugin_data"]["ipcluster"]["engines"] == 3
        assert not (home / "local" / "el" / "node001").exists()

        again = cli("-c", config, "addnode", "el")
        assert again.returncode == 0 and "Added node001" in again.stdout  # the free name is reused
        assert wait_until(lambda: len(client.ids) == 4)
    finally:
        client.close()
    refused = cli("removenode", "el", "master")
    assert refused.returncode == 1 and "master cannot be removed" in refused.stderr
    unknown = cli("removenode", "el", "node042")
    assert unknown.returncode == 1 and "no node 'node042'" in unknown.stderr
    assert cli("terminate", "--yes", "el").returncode == 0


def test_failed_addnode_puts_the_cluster_back(cli, home, write_config):
    config = str(write_config(CONFIG.format(extra=", failadd")))
    assert cli("-c", config, "start", "fa").returncode == 0
    before = read_record(home, "fa")
    result = cli("-c", config, "addnode", "fa")
    assert result.returncode == 1
    assert "plugin 'failadd' failed in on_add_node: node002:" in result.stderr
    assert "cannot-mount-scratch" in result.stderr
    after = read_record(home, "fa")
    assert [n["name"] for n in after["nodes"]] == ["master", "node001"]
    assert sorted(recorded_pids(after)) == sorted(recorded_pids(before))
    assert not (home / "local" / "fa" / "node002").exists()
    shell = cli("shell", "--ipcluster=fa", "-c", "print(len(ipclient.ids))")
    assert shell.stdout.strip() == "2"
    assert cli("terminate", "--yes", "fa").returncode == 0
