"""packer = json | pickle | msgpack: controller, engines and clients all use it, with no argument."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from conftest import shadowing_python

pytestmark = pytest.mark.cluster

CONFIG = (
    "[global]\ndefault_template = t\n"
    "[cluster t]\ncluster_size = 1\ncores_per_node = 2\n{python}plugins = ipcluster\n"
    "[plugin ipcluster]\nsetup_class = ipcluster\nmaster_engines = 2\npacker = {packer}\n"
)
SESSION = {"json": "json", "pickle": "pickle", "msgpack": "msgpack.packb"}
UNPACK = {"json": "json", "pickle": "pickle", "msgpack": "msgpack.unpackb"}


@pytest.mark.parametrize("packer", ["json", "pickle", "msgpack"])
def test_every_packer_works_and_the_client_picks_it_up(cli, home, write_config, packer):
    from ipyparallel import Client

    config = str(write_config(CONFIG.format(python="", packer=packer)))
    started = cli("-c", config, "start", "pk")
    assert started.returncode == 0, started.output
    try:
        path = home / "ipcluster" / "pk-local.json"
        assert json.loads(path.read_text())["pack"] == SESSION[packer]
        rc = Client(str(path))  # no packer argument
        try:
            assert rc.session.packer == SESSION[packer] and rc.session.unpacker == UNPACK[packer]
            view = rc[:]
            assert view.map_sync(lambda x: x**30, range(8)) == [x**30 for x in range(8)]
            array = np.arange(250_000, dtype=np.float64).reshape(500, 500)
            view.push({"a": array, "meta": {"name": "grid", "shape": [500, 500]}}, block=True)
            back = view.pull(["a", "meta"], block=True)
            for a, meta in back:
                assert np.array_equal(a, array) and meta == {"name": "grid", "shape": [500, 500]}
            assert rc[0].apply_sync(lambda a: float(a.sum()), array) == float(array.sum())
        finally:
            rc.close()
    finally:
        stopped = cli("terminate", "-y", "pk")
    assert stopped.returncode == 0, stopped.output


def test_msgpack_missing_on_a_node_is_named_and_nothing_starts(cli, home, write_config, tmp_path):
    wrapper = shadowing_python(
        tmp_path, sys.executable, "msgpack", "raise ImportError('No module named msgpack (test shadow)')\n"
    )
    config = str(write_config(CONFIG.format(python=f"python = {wrapper}\n", packer="msgpack")))
    result = cli("-c", config, "start", "nomp")
    assert result.returncode == 1
    assert "master: packer = msgpack needs the msgpack package" in result.stderr
    assert "pip install msgpack" in result.stderr
    assert not (home / "clusters" / "nomp.json").exists()
    assert not (home / "ipcluster" / "nomp-local.json").exists()
