"""The test harness itself: a test that fails half-way still leaves nothing running."""

from __future__ import annotations

import pytest

from conftest import TESTS, processes_of

pytest_plugins = ["pytester"]

FAILING = """
def test_fails_with_a_cluster_running(cli, home):
    started = cli("start", "-s", "1", "left")
    assert started.returncode == 0, started.output
    assert False, "failed half-way"
"""


@pytest.mark.cluster
def test_a_test_that_fails_half_way_has_its_clusters_terminated_before_the_leak_check(pytester):
    pytester.makeconftest((TESTS / "conftest.py").read_text())
    pytester.makepyfile(test_inner=FAILING)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q", f"--basetemp={pytester.path / 'tmp'}")
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed") == 1 and "errors" not in outcomes and "error" not in outcomes, result.stdout.str()
    assert "failed half-way" in result.stdout.str()
    homes = list((pytester.path / "tmp").rglob("globular-home"))
    assert homes and (homes[0] / "clusters").is_dir()
    assert not list((homes[0] / "clusters").glob("*.json"))  # terminated: its record gone
    assert not processes_of(homes[0], homes[0].parent)
