"""A third party's plugin, installed the way pip installs one (a dist-info with entry points),
adds a CLI command and status columns without the core naming it.  The plugin is the worked
example of the docs (docs/examples/hello_plugin.py, shown in docs/contributing/plugin.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

PLUGIN = (Path(__file__).parent.parent / "docs" / "examples" / "hello_plugin.py").read_text()  # the docs' example

CONFIG = """
[global]
default_template = t
[cluster t]
provider = local
cores_per_node = 1
plugins = ipcluster, hello
[plugin ipcluster]
setup_class = ipcluster
[plugin hello]
setup_class = hello
"""


@pytest.mark.cluster
def test_an_installed_plugin_adds_a_command_and_status_columns(cli, home, tmp_path, write_config):
    site = tmp_path / "site"
    (site / "thirdparty_hello-0.1.dist-info").mkdir(parents=True)
    (site / "thirdparty_hello.py").write_text(PLUGIN)
    info = site / "thirdparty_hello-0.1.dist-info"
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-hello\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[globular.plugins]\nhello = thirdparty_hello:Hello\n[globular.commands]\nhello = thirdparty_hello:hello\n"
    )
    env = {"PYTHONPATH": str(site)}

    helped = cli("--help", env=env)
    assert "hello" in helped.stdout and "Greet NAME." in helped.stdout
    assert "--output" in cli("hello", "--help", env=env).stdout  # every command takes it
    greeted = cli("hello", "world", env=env)
    assert greeted.returncode == 0 and greeted.stdout.strip() == "hello, world"
    assert "No such command 'hello'" in cli("hello", "world").output  # not installed: not there

    config = str(write_config(CONFIG))
    started = cli("-c", config, "start", "-s", "2", "greet", env=env)
    assert started.returncode == 0, started.output
    try:
        status = cli("status", "greet", env=env)
        listing = cli("listclusters", env=env)
        as_json = cli("status", "greet", "--output", "json", env=env)
    finally:
        stopped = cli("terminate", "-y", "greet", env=env)
    assert status.returncode == 0, status.output
    assert "wave" in status.stdout and "o/ node001" in status.stdout and "greeting hi" in status.stdout
    assert "engines run/reg/exp" in status.stdout  # ipcluster's column, beside it
    header = next(line for line in listing.stdout.splitlines() if "name" in line and "health" in line)
    assert "greeting" in header and "engines" in header
    report = json.loads(as_json.stdout)["result"]
    assert report["greeted"] == 2 and report["nodes"][1]["columns"]["wave"] == "o/ node001"
    assert stopped.returncode == 0, stopped.output
