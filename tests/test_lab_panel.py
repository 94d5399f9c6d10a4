"""The cluster files ipyparallel's Lab panel reads (globular.ipcluster.labpanel/labcluster),
against records on disk; the panel itself is in test_notebook_browser.py."""

from __future__ import annotations

import json

import pytest

from globular.ipcluster.labpanel import panel_model
from globular.spec import ClusterSpec
from globular.state import ClusterRecord, StateStore


def test_the_panel_lists_a_running_cluster_waits_for_a_starting_one_and_forgets_a_gone_one(tmp_path):
    from ipyparallel.cluster import ClusterManager

    profile = tmp_path / "ipython" / "profile_default"
    (profile / "security").mkdir(parents=True)
    store = StateStore(tmp_path / "home")
    spec = ClusterSpec(template="t", cluster_size=1, provider="local")
    record = ClusterRecord(name="lab", region="local", spec=spec, status="starting")
    store.create(record)
    path = profile / "security" / "cluster-globular-lab.json"
    path.write_text(json.dumps(panel_model("lab", str(tmp_path / "home"), str(profile), {"engines": 3})))

    def listed() -> dict:
        return {k: c.to_dict() for k, c in ClusterManager().load_clusters(profile_dirs=[str(profile)]).items()}

    assert listed() == {} and path.exists()  # starting: not listed yet, and its file stays
    record.status = "running"
    record.plugin_data["ipcluster"] = {"engines": 3}
    store.save(record)
    (model,) = listed().values()
    assert model["controller"]["state"]["state"] == "running" and model["engines"]["sets"]["globular"]["n"] == 3
    (cluster,) = ClusterManager().load_clusters(profile_dirs=[str(profile)]).values()
    with pytest.raises(Exception, match="managed by globular: stop it with `globular terminate lab`"):
        cluster.stop_cluster_sync()
    # a record that cannot be read for a moment (garbage, as a crash mid-write would leave)
    # is not a gone cluster: its file stays, and it is listed again once the record reads
    record_file = tmp_path / "home" / "clusters" / "lab.json"
    good = record_file.read_bytes()
    record_file.write_bytes(b"{not json")
    assert listed() == {} and path.exists()
    record_file.write_bytes(good)
    assert len(listed()) == 1
    # a long-lived server (one ClusterManager) stops listing a cluster terminated meanwhile
    manager = ClusterManager()
    assert len(manager.load_clusters(profile_dirs=[str(profile)])) == 1
    store.delete("lab")
    assert manager.load_clusters(profile_dirs=[str(profile)]) == {}
    assert not path.exists()  # gone: the file goes too
