"""``globular top`` as a page in JupyterLab: a jupyter-server extension.

Why a server extension and not a widget: the page needs no JavaScript build and no
ipywidgets (neither is on a node); it sits behind the server's own login and TLS; it keeps
the last ten minutes of frames in the server, so the plot has its history the moment the
page opens (a widget's history dies with its kernel); it needs no kernel at all; and it
works in JupyterLab, Notebook 7 and a plain browser tab alike.  A JupyterLab tab opens it
with File > Open from URL... (or an ``IFrame`` in a notebook).

Routes, under the server's ``base_url``:

- ``globular/top/``: the clusters of this machine's globular home, each a link;
- ``globular/top/NAME``: the page (the numbers ``globular top`` shows, and a plot of tasks
  per second and busy engines over the last ten minutes), refreshed each second from
- ``globular/top/NAME/frame``: the latest frame and the history, as JSON.

A cluster is watched (the same :class:`~globular.plugins.ipcluster.top.Watch` the terminal
view uses: one ``queue_status`` and one round trip per node through globular's helper a
second) from its first request until nobody asked for 30 seconds.

Where it runs: any Jupyter server whose Python has globular (installing globular enables
it: ``etc/jupyter/jupyter_server_config.d/globular.json``), so a JupyterLab on your machine,
next to ipyparallel's Clusters panel, shows every cluster you run; and the notebook
globular starts on a master that is this machine.  A remote master's notebook has no
globular, so no page: use the one here, or ``globular top``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import html
import json
import logging
import time
from collections import deque
from pathlib import Path
from typing import Any

from tornado import web

log = logging.getLogger(__name__)

EXTENSION = __name__
INTERVAL = 1.0  # seconds between frames
LINGER = 30.0  # a cluster nobody asked about for this long is no longer watched
HISTORY = 600  # frames kept (ten minutes at one a second)


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    return [{"module": EXTENSION}]


class Watcher:
    """Frames of one cluster, made in the background while someone asks for them."""

    def __init__(self, name: str, home: Path, interval: float = INTERVAL, linger: float = LINGER):
        self.name, self.home, self.interval, self.linger = name, home, interval, linger
        self.latest: dict[str, Any] | None = None
        self.history: deque[tuple[float, float, int]] = deque(maxlen=HISTORY)  # (time, tasks/s, busy)
        self.error: str | None = None
        self.asked = time.monotonic()
        self.task: asyncio.Task[None] | None = None

    def ask(self) -> dict[str, Any]:
        """What the page shows now; starts watching if nobody was."""
        self.asked = time.monotonic()
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._run())
        return {
            "cluster": self.name,
            "frame": self.latest,
            "history": [{"time": t, "per_second": r, "busy": b} for t, r, b in self.history],
            "error": self.error,
        }

    async def _run(self) -> None:
        from globular.errors import GlobularError
        from globular.plugins.ipcluster.top import Watch

        watch: Watch | None = None
        try:
            watch = Watch(self.name, self.home)
            await watch.open()
            while time.monotonic() - self.asked < self.linger:
                frame = await watch.frame()
                self.latest = dataclasses.asdict(frame)
                self.history.append((frame.time, frame.per_second, frame.running))
                self.error = None
                await asyncio.sleep(self.interval)
        except (GlobularError, OSError, TimeoutError) as exc:
            self.error = str(exc) or type(exc).__name__  # shown on the page; the next request tries again
            self.latest = None
        except Exception as exc:  # a bug here must not take the Jupyter server with it
            log.exception("globular top page: watching %s failed", self.name)
            self.error = f"{type(exc).__name__}: {exc}"
            self.latest = None
        finally:
            if watch is not None:
                await watch.close()

    async def stop(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)


def _home(handler: web.RequestHandler) -> Path:
    from globular.paths import globular_home

    home = handler.settings.get("globular_home")
    return Path(home) if home else globular_home()


def _watcher(handler: web.RequestHandler, name: str) -> Watcher:
    watchers: dict[tuple[str, str], Watcher] = handler.settings.setdefault("globular_watchers", {})
    home = _home(handler)
    key = (str(home), name)
    if key not in watchers:
        watchers[key] = Watcher(name, home)
    return watchers[key]


def _handlers() -> list[tuple[str, type[web.RequestHandler]]]:
    from jupyter_server.base.handlers import JupyterHandler

    class Index(JupyterHandler):
        @web.authenticated
        def get(self) -> None:
            from globular.state import StateStore

            records, _unreadable = StateStore(_home(self)).list()
            items = "".join(
                f'<li><a href="{html.escape(r.name)}">{html.escape(r.name)}</a> {html.escape(r.status)}, '
                f"{len(r.nodes)} nodes</li>"
                for r in records
            )
            self.finish(PAGE_HEAD.format(title="globular clusters") + f"<ul id=clusters>{items or 'none'}</ul>")

    class Page(JupyterHandler):
        @web.authenticated
        def get(self, name: str) -> None:
            self.finish(PAGE_HEAD.format(title=f"globular top {html.escape(name)}") + PAGE_BODY)

    class Frame(JupyterHandler):
        @web.authenticated
        def get(self, name: str) -> None:
            self.set_header("Content-Type", "application/json")
            self.set_header("Cache-Control", "no-store")
            self.finish(json.dumps(_watcher(self, name).ask()))

    name = r"([A-Za-z0-9][A-Za-z0-9._-]*)"
    return [(r"/globular/top/?", Index), (rf"/globular/top/{name}/?", Page), (rf"/globular/top/{name}/frame", Frame)]


def _load_jupyter_server_extension(serverapp: Any) -> None:
    from jupyter_server.utils import url_path_join

    base = serverapp.web_app.settings["base_url"]
    serverapp.web_app.add_handlers(".*$", [(url_path_join(base, path), h) for path, h in _handlers()])
    log.info("globular top page at %sglobular/top/", base)


PAGE_HEAD = """<!doctype html><html><head><meta charset=utf-8><title>{title}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }} td, th {{ padding: 2px 12px; text-align: right; }}
th {{ border-bottom: 1px solid #999; }} td:first-child, th:first-child {{ text-align: left; }}
.bad {{ color: #b00; font-weight: bold; }} .event {{ color: #a60; }} #error {{ color: #b00; }}
.num {{ font-weight: bold; }} svg {{ border: 1px solid #ccc; background: #fcfcfc; }}
.rate {{ stroke: #1f77b4; }} .busy {{ stroke: #d62728; }} polyline {{ fill: none; stroke-width: 2; }}
</style></head><body><h2>{title}</h2>
"""

PAGE_BODY = """<div id=error></div>
<div id=summary>tasks: <span class=num id=waiting>-</span> waiting, <span class=num id=running>-</span> running,
<span class=num id=done>-</span> done in 10 s (<span class=num id=per-second>-</span>/s),
<span class=num id=failed>-</span> failed, <span class=num id=completed>-</span> completed in all;
engines <span class=num id=registered>-</span>/<span class=num id=expected>-</span> registered;
slowest: <span id=slowest>-</span></div>
<table id=nodes><thead><tr><th>node</th><th>cpu</th><th>memory</th><th>load</th><th>gpus</th>
<th>busy</th><th>idle</th><th>dead</th></tr></thead><tbody></tbody></table>
<svg id=plot width=720 height=220 viewBox="0 0 720 220" data-points=0 data-peak-rate=0 data-peak-busy=0>
<polyline class=rate points=""/><polyline class=busy points=""/>
<text x=8 y=16 fill="#1f77b4" id=rate-label>tasks/s</text><text x=8 y=34 fill="#d62728" id=busy-label>busy engines</text>
<text x=712 y=214 text-anchor=end fill="#666" id=span-label></text></svg>
<ul id=events></ul>
<script>
const token = new URLSearchParams(location.search).get("token");
const url = location.pathname.replace(/\\/$/, "") + "/frame" + (token ? "?token=" + encodeURIComponent(token) : "");
const $ = (id) => document.getElementById(id);
const gib = (b) => (b / 2 ** 30).toFixed(1);
function cell(row, text, cls) { const td = row.insertCell(); td.textContent = text; if (cls) td.className = cls; }
function plot(history) {
  const svg = $("plot"), w = 720, h = 220, top = 44, now = Date.now() / 1000;
  const span = Math.max(60, now - (history.length ? history[0].time : now));
  const peakRate = Math.max(0, ...history.map((p) => p.per_second));
  const peakBusy = Math.max(0, ...history.map((p) => p.busy));
  const line = (key, peak) => history.map((p) => [
    (w * (1 - (now - p.time) / span)).toFixed(1), (h - 4 - (h - top) * (peak ? p[key] / peak : 0)).toFixed(1)
  ].join(",")).join(" ");
  svg.querySelector(".rate").setAttribute("points", line("per_second", peakRate));
  svg.querySelector(".busy").setAttribute("points", line("busy", peakBusy));
  svg.dataset.points = history.length; svg.dataset.peakRate = peakRate; svg.dataset.peakBusy = peakBusy;
  $("rate-label").textContent = "tasks/s (peak " + peakRate + ")";
  $("busy-label").textContent = "busy engines (peak " + peakBusy + ")";
  $("span-label").textContent = "last " + Math.round(span / 60) + " min";
}
function show(data) {
  $("error").textContent = data.error || "";
  const f = data.frame;
  if (!f) return;
  for (const key of ["waiting", "running", "done", "failed", "registered", "expected"]) $(key).textContent = f[key];
  $("per-second").textContent = f.per_second;
  $("completed").textContent = f.queue_status.completed;
  $("slowest").textContent = f.slowest || "-";
  $("registered").className = "num" + (f.registered < f.expected ? " bad" : "");
  const body = $("nodes").tBodies[0];
  body.replaceChildren();
  for (const n of f.nodes) {
    const row = body.insertRow(); row.dataset.node = n.node;
    cell(row, n.node);
    if (!n.answering) { cell(row, "not answering", "bad"); continue; }
    cell(row, n.cpu === null ? "-" : Math.round(n.cpu) + "%");
    cell(row, n.memory_total ? gib(n.memory_used) + "/" + gib(n.memory_total) + " GiB" : "-");
    cell(row, n.load === null ? "-" : n.load.toFixed(2));
    cell(row, n.gpus.map((g) => (g.utilization ?? "?") + "% " + ((g.memory_used_mib || 0) / 1024).toFixed(0)
      + "/" + ((g.memory_total_mib || 0) / 1024).toFixed(0) + "G").join(", ") || "-");
    cell(row, n.busy, "busy"); cell(row, n.idle, "idle"); cell(row, n.dead, n.dead ? "dead bad" : "dead");
  }
  $("events").replaceChildren(...f.events.map((e) => {
    const li = document.createElement("li"); li.className = "event"; li.textContent = e; return li;
  }));
  plot(data.history);
}
async function tick() {
  try {
    const reply = await fetch(url, { credentials: "same-origin", cache: "no-store" });
    if (reply.ok) show(await reply.json()); else $("error").textContent = "the server answered " + reply.status;
  } catch (e) { $("error").textContent = "the server does not answer: " + e; }
  setTimeout(tick, 1000);
}
tick();
</script></body></html>
"""
