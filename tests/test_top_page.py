"""``globular top`` in JupyterLab (issue 30): the server extension's page, in headless Chromium.

A local cluster with its notebook (a master that is this machine, globular's Python: the
page is enabled there), a map of 300 short tasks, the page opened after logging in: the
plot has non-zero tasks/s (read from the page and seen in its screenshot's pixels), the
numbers are the controller's own, and the frame endpoint refuses a request without a login.
"""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from conftest import CHROMIUM, needs_chromium, screenshot

pytestmark = [pytest.mark.cluster, *needs_chromium()]


CONFIG = (
    "[global]\ndefault_template = t\n"
    "[cluster t]\nprovider = local\ncluster_size = 3\ncores_per_node = 2\nplugins = ipcluster\n"
    "[plugin ipcluster]\nsetup_class = ipcluster\nenable_notebook = true\nnotebook_directory = {dir}\n"
)

MAP = """
import globular, json, sys, time
rc = globular.connect(sys.argv[1])
rc.load_balanced_view().map_async(lambda x: __import__("time").sleep(0.2) or x, range(300)).get(timeout=300)
deadline = time.monotonic() + 30  # the hub counts a task done a moment after its result reached us
while sum(s["completed"] for k, s in rc.queue_status().items() if k != "unassigned") < 300 and time.monotonic() < deadline:
    time.sleep(0.05)
print(json.dumps(rc.queue_status()), flush=True)
rc.close()
"""

RATE = (31, 119, 180)  # the tasks/s line's colour (#1f77b4)


def png_pixels(path: Path) -> tuple[int, int, list[bytes]]:
    """Width, height and rows (RGB(A) bytes) of an 8-bit non-interlaced PNG (Chromium's screenshots)."""
    data = path.read_bytes()
    pos, chunks, header = 8, [], b""
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            chunks.append(body)
        pos += 12 + length
    width, height, depth, colour = struct.unpack(">IIBB", header[:10])
    assert depth == 8 and colour in (2, 6), (depth, colour)
    step = 3 if colour == 2 else 4
    raw = zlib.decompress(b"".join(chunks))
    stride = width * step
    rows: list[bytes] = []
    previous = bytearray(stride)
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for i in range(stride):
            left = line[i - step] if i >= step else 0
            up, corner = previous[i], previous[i - step] if i >= step else 0
            if kind == 1:
                line[i] = (line[i] + left) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + up) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 0xFF
            elif kind == 4:
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                line[i] = (line[i] + (left if pa <= pb and pa <= pc else up if pb <= pc else corner)) & 0xFF
        rows.append(bytes(line))
        previous = line
    return width, height, [b"".join(r[i : i + 3] for i in range(0, len(r), step)) for r in rows]


def rate_pixels_above_baseline(path: Path, baseline: int) -> int:
    """Pixels of the tasks/s colour between the legend and the plot's baseline (the zero of its
    axes, a few pixels kept clear): the line off zero."""
    width, _, rows = png_pixels(path)
    near = lambda px: all(abs(a - b) < 40 for a, b in zip(px, RATE))  # noqa: E731
    return sum(1 for y in range(30, baseline - 3) for x in range(width) if near(rows[y][x * 3 : x * 3 + 3]))


def test_the_top_page_plots_tasks_per_second_and_shows_the_controllers_counts(cli, home, write_config, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    config = str(write_config(CONFIG.format(dir=tmp_path / "notebooks")))
    started = cli("-c", config, "start", "watched")
    assert started.returncode == 0, started.output
    mapping = None
    try:
        shown = cli("notebook", "watched")
        url = re.search(r"notebook\s+(https://\S+)", shown.stdout)[1]
        password = re.search(r"password\s+(\S+)", shown.stdout)[1]
        top = re.search(r"top page\s+(https://\S+)", shown.stdout)[1]
        assert top == url + "globular/top/watched"
        shot, plot_shot = tmp_path / "top-page.png", tmp_path / "top-plot.png"
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            try:
                context = browser.new_context(ignore_https_errors=True, viewport={"width": 1000, "height": 800})
                refused = context.request.get(top + "/frame", max_redirects=0)
                assert refused.status in (302, 403) and "queue_status" not in refused.text()  # no login, no numbers
                page = context.new_page()
                page.set_default_timeout(60_000)
                try:
                    page.goto(url + "login")
                    page.fill("input[name=password]", password)
                    page.click("#login_submit")
                    page.wait_for_url(re.compile(r"/lab"))
                    page.goto(top)
                    expect(page.locator("#expected")).to_have_text("5")
                    mapping = subprocess.Popen(
                        [sys.executable, "-c", MAP, "watched"], stdout=subprocess.PIPE, text=True
                    )
                    page.wait_for_function(
                        "() => Number(document.getElementById('plot').dataset.peakRate) > 0"
                        " && Number(document.getElementById('running').textContent) > 0",
                        timeout=60_000,
                    )
                    busy = sum(int(c) for c in page.locator("#nodes td.busy").all_inner_texts())
                    assert busy > 0
                    theirs = json.loads(mapping.stdout.readline())
                    assert mapping.wait(timeout=60) == 0
                    completed = sum(s["completed"] for k, s in theirs.items() if k != "unassigned")
                    expect(page.locator("#completed")).to_have_text(str(completed), timeout=20_000)
                    expect(page.locator("#running")).to_have_text("0")
                    page.screenshot(path=str(screenshot("top-page.png") or shot), full_page=True)
                    page.locator("#plot").screenshot(path=str(plot_shot))
                    numbers = {k: page.locator(f"#{k}").inner_text() for k in ("registered", "expected", "waiting")}
                    numbers |= {
                        k: page.locator(f"#{k}").inner_text() for k in ("node-count", "node-target", "balancer")
                    }
                    nodes = page.locator("#nodes tbody tr").evaluate_all("rows => rows.map(r => r.dataset.node)")
                    points = int(page.locator("#plot").get_attribute("data-points") or 0)
                    peak = float(page.locator("#plot").get_attribute("data-peak-rate") or 0)
                    baseline = int(page.locator("#plot").get_attribute("data-baseline") or 0)
                    shown_nodes = [page.locator("#plot").get_attribute(f"data-{k}") for k in ("nodes", "desired")]
                    node_points = page.locator("#plot .nodes").get_attribute("points") or ""
                    times = page.locator("#plot .time-tick").all_text_contents()
                    rate_ticks = page.locator("#plot .rate-tick").all_text_contents()
                    count_ticks = page.locator("#plot .count-tick").all_text_contents()
                    waiting_ticks = page.locator("#plot .waiting-tick").all_text_contents()
                    legend = page.locator("#plot > text[id$=-label]").all_text_contents()
                    drawn = page.locator("#plot > polyline").evaluate_all(
                        "lines => lines.map(l => l.getBBox().width > 0 || l.getAttribute('points') !== '')"
                    )
                except BaseException as exc:
                    page.screenshot(path=str(shot), full_page=True)
                    raise AssertionError(f"browser step failed ({exc}); screenshot: {shot}") from exc
            finally:
                browser.close()
    finally:
        if mapping is not None:
            mapping.kill()
            mapping.wait()
        stopped = cli("terminate", "-y", "watched")
    assert completed == 300
    assert numbers == {"registered": "5", "expected": "5", "waiting": "0", "node-count": "3", "node-target": "3",
                       "balancer": "none"}, numbers  # fmt: skip
    assert nodes == ["master", "node001", "node002"]
    assert points >= 5 and peak > 0, (points, peak)
    assert rate_pixels_above_baseline(plot_shot, baseline) > 30, f"no tasks/s line off zero in {plot_shot}"
    # the axes: time (seconds or minutes ago, to now), tasks/s on the left, counts on the right
    assert times[0] == "now" and len(times) >= 2 and all(t.startswith("-") for t in times[1:]), times
    assert rate_ticks[0] == "0" and float(rate_ticks[-1]) >= peak, (rate_ticks, peak)
    assert count_ticks[0] == "0" and float(count_ticks[-1]) >= 3, count_ticks  # the nodes' panel
    assert waiting_ticks[0] == "0" and float(waiting_ticks[-1]) >= 1, waiting_ticks
    # the node count and its target over time, beside the tasks
    assert shown_nodes == ["3", "3"] and len(node_points.split()) >= points, (shown_nodes, node_points)
    assert legend == ["tasks/s (left)", "tasks waiting (right)", "nodes", "- - target nodes", "busy engines"], legend
    assert drawn == [True] * 5, drawn  # each line a rendered element of the plot (not swallowed by a sibling)
    assert stopped.returncode == 0, stopped.output
