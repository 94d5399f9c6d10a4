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

The page's table, plot and script are ``labtop.html`` beside this module (package data).

A cluster is watched (the same :class:`~globular.ipcluster.top.Watch` the terminal
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
import functools
import html
import importlib.resources
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
STALE = 3.0  # a frame older than this many intervals is marked stale on the page


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    return [{"module": EXTENSION}]


class Watcher:
    """Frames of one cluster, made in the background while someone asks for them."""

    def __init__(self, name: str, home: Path, interval: float = INTERVAL, linger: float = LINGER):
        self.name, self.home, self.interval, self.linger = name, home, interval, linger
        self.latest: dict[str, Any] | None = None
        # (time, tasks/s, busy engines, tasks waiting, nodes, nodes desired: the balancer's target)
        self.history: deque[tuple[float, float, int, int, int, int]] = deque(maxlen=HISTORY)
        self.error: str | None = None
        self.asked = time.monotonic()
        self.task: asyncio.Task[None] | None = None

    def ask(self) -> dict[str, Any]:
        """What the page shows now; starts watching if nobody was."""
        self.asked = time.monotonic()
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._run())
        age = time.time() - self.latest["time"] if self.latest else None
        return {
            "cluster": self.name,
            "frame": self.latest,
            "age": age,  # s since the frame was made: the watch may be waiting on a node or the controller
            "stale": age is not None and age > STALE * max(self.interval, 1.0),
            "history": [
                {"time": t, "per_second": r, "busy": b, "waiting": w, "nodes": n, "desired": d}
                for t, r, b, w, n, d in self.history
            ],
            "error": self.error,
        }

    @property
    def idle(self) -> bool:
        """Nobody asked for a while and nothing is being watched: it can be forgotten."""
        return (self.task is None or self.task.done()) and time.monotonic() - self.asked > self.linger

    async def _run(self) -> None:
        from globular.errors import GlobularError
        from globular.ipcluster.top import Watch

        watch: Watch | None = None
        try:
            watch = Watch(self.name, self.home)
            while time.monotonic() - self.asked < self.linger:
                frame = await watch.frame()
                self.latest = dataclasses.asdict(frame)
                desired = frame.desired if frame.desired is not None else len(frame.nodes)
                self.history.append(
                    (frame.time, frame.per_second, frame.running, frame.waiting, len(frame.nodes), desired)
                )
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
    """The watcher of cluster ``name`` (a valid cluster name, else 404); those nobody asked
    for a while are forgotten as another is asked for (made-up names do not pile up)."""
    from globular.state import NAME_PATTERN

    if not NAME_PATTERN.fullmatch(name):
        raise web.HTTPError(404)
    watchers: dict[tuple[str, str], Watcher] = handler.settings.setdefault("globular_watchers", {})
    for key in [k for k, w in watchers.items() if w.idle]:
        del watchers[key]
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
            self.finish(PAGE_HEAD.format(title=f"globular top {html.escape(name)}") + page_body())

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


@functools.cache
def page_body() -> str:
    """The page's table, plot and script: ``labtop.html`` beside this module (package data)."""
    return (importlib.resources.files("globular.ipcluster") / "labtop.html").read_text(encoding="utf-8")
