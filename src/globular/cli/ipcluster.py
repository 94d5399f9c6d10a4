"""IPCluster's commands, added to the ``globular`` CLI through the ``globular.commands`` entry
points: ``shell``, ``notebook`` and ``restart-controller``.  Command-line code only: what
they do is in the plugin's modules, what they show goes through :mod:`globular.cli.render`."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import click
from rich.markup import escape

from globular.cli.group import Later, run
from globular.cli.render import output, output_option
from globular.errors import BadInput

if TYPE_CHECKING:
    from globular.ipcluster import notebook as notebooks
else:  # imported by the commands that use them, when they run
    notebooks = Later("globular.ipcluster.notebook")


@click.command(short_help="A Python shell connected to the cluster.")
@click.option(
    "--ipcluster", "ipcluster", metavar="NAME", help="Cluster to connect to (StarCluster's spelling of NAME)."
)
@click.option("-c", "--command", "code", help="Run CODE with ipclient and ipview defined, then exit.")
@click.argument("cluster", metavar="[NAME]", required=False)
@output_option
@click.pass_context
def shell(ctx: click.Context, ipcluster: str | None, code: str | None, cluster: str | None) -> None:
    """A Python shell connected to cluster NAME (`globular shell NAME`, or StarCluster's
    `globular shell --ipcluster=NAME`).

    `ipclient` is an ipyparallel Client and `ipview` = ipclient[:], e.g.
    ipview.map_async(lambda x: x**30, range(8)).get()
    """
    from globular.ipcluster.client import connect

    if ipcluster and cluster and ipcluster != cluster:
        raise BadInput(f"two clusters named: {cluster} and --ipcluster={ipcluster}")
    name = ipcluster or cluster
    if not name:
        raise BadInput("name the cluster: `globular shell NAME` (or --ipcluster=NAME)")

    client = connect(name)
    namespace = {"ipclient": client, "ipview": client[:], "Client": type(client)}
    try:
        if code is not None:
            exec(compile(code, "<globular shell -c>", "exec"), namespace)
        else:
            import IPython

            output(ctx).say(f"Connected to {name}: {len(client.ids)} engines as `ipclient`, `ipview` = ipclient[:]")
            IPython.start_ipython(argv=[], user_ns=namespace)
    finally:
        client.close()


@click.command(short_help="The notebook's URL and password; --forward.")
@click.option("--forward", is_flag=True, help="Forward a port of this machine to it over ssh (until Ctrl-C).")
@click.option(
    "--port",
    "local_port",
    type=click.IntRange(0, 65535),
    default=0,
    help="Local port for --forward (default: a free one).",
)
@click.option("--save", is_flag=True, help="Copy the notebook folder home now, as terminate does.")
@click.argument("name")
@output_option
@click.pass_context
def notebook(ctx: click.Context, forward: bool, local_port: int, save: bool, name: str) -> None:
    """Show the URL and password of cluster NAME's notebook server.

    The server speaks HTTPS only, with a self-signed certificate whose
    fingerprint is shown (your browser asks you to accept it once; it is kept
    across starts of the same cluster).  With ssh nodes, --forward makes it
    reachable at https://127.0.0.1:PORT/ through the ssh connection.  --save
    copies the master's notebook folder into ~/.globular/notebooks/NAME-REGION/TIME/
    (what terminate does first; only what changed since the last copy travels).
    """
    out = output(ctx)
    if save:
        from globular.ipcluster.keep import left_out_text, save_cluster_notebooks
        from globular.paths import globular_home

        saved = run(save_cluster_notebooks(name, globular_home()))
        if saved is None:
            out.result(
                {"saved": None}, text=lambda: out.say(f"The notebooks of {escape(name)} are on this machine already.")
            )
        else:
            out.result(saved, text=lambda: out.say(
                f"Saved {saved.files} files of {escape(saved.source)} to [bold]{escape(str(saved.folder))}[/]"
                f" ({saved.copied} copied, {saved.bytes / 1e6:.1f} MB){escape(left_out_text(saved.left_out))}"
            ))  # fmt: skip
        return
    info = notebooks.notebook_info(name)
    rows = [
        ("notebook", info["url"]),
        ("password", info.get("password") or "the notebook_passwd of your config"),
        ("certificate", info["fingerprint"]),
        ("directory", info["directory"]),
        *([("top page", info["top"])] if info.get("top") else []),
    ]
    out.result(info, text=lambda: out.grid(rows))
    if forward:

        def ready(url: str) -> None:
            out.err.print(f"Forwarding [bold]{escape(url)}[/] to the master; Ctrl-C stops it.")

        try:
            run(notebooks.forward_notebook(name, local_port, ready))
        except KeyboardInterrupt:
            out.err.print("Forwarding stopped.")


@click.command("restart-controller", short_help="A new controller and engines (it died).")
@click.argument("name")
@output_option
@click.pass_context
def restart_controller(ctx: click.Context, name: str) -> None:
    """Start a new controller and new engines on the nodes of cluster NAME.

    For a cluster whose controller died (`globular status NAME` says
    "controller down"): the old engines are stopped, a new controller (new
    keys, new ports) starts on the master with an engine per core on every
    node, and the client connection file is rewritten.  Clients connected
    before must reconnect; the notebook server keeps running.
    """
    from globular import operations
    from globular.config import Config

    out = output(ctx)
    spec = Config.builtin().plugin_spec("ipclusterrestartcontroller")
    with out.reporter() as reporter:
        result = run(operations.run_plugin(name, spec, reporter=reporter))

    def text() -> None:
        out.say(f"Controller of [bold]{escape(name)}[/] restarted in {result.elapsed:.1f} s")
        if result.report:
            out.report(result.report)

    out.result({"name": name, "elapsed": result.elapsed, "report": result.report}, text=text)


def _frame_view(frame: Any) -> Any:
    """One frame of ``globular top`` as rich renderables."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    from globular.results import size_text

    head = Text.assemble(
        (f"{frame.cluster}  ", "bold"),
        f"tasks: {frame.waiting} waiting, {frame.running} running, {frame.done} done in 10 s "
        f"({frame.per_second:g}/s), ",
        (f"{frame.failed} failed", "red" if frame.failed else ""),
        "; engines ",
        (f"{frame.registered}/{frame.expected}", "red" if frame.registered < frame.expected else "green"),
        " registered" + (f"; slowest: {frame.slowest}" if frame.slowest else ""),
        f"; nodes {len(frame.nodes)}"
        + (f" -> {frame.desired}" if frame.desired not in (None, len(frame.nodes)) else ""),
        f" (balancer {frame.balancer})" if frame.balancer else "",
    )
    table = Table(box=None, pad_edge=False)
    for column in ("node", "cpu", "memory", "load", "gpus", "engines busy/idle/dead"):
        table.add_column(column)
    for row in frame.nodes:
        if not row.answering:
            table.add_row(Text(row.node, "red"), Text("not answering", "red"), "", "", "", "")
            continue
        memory = f"{size_text(row.memory_used)}/{size_text(row.memory_total)}" if row.memory_total else "-"
        gpus = ", ".join(
            f"{g.get('utilization') if g.get('utilization') is not None else '?'}% "
            f"{(g.get('memory_used_mib') or 0) / 1024:.0f}/{(g.get('memory_total_mib') or 0) / 1024:.0f}G"
            for g in row.gpus
        )
        engines = Text.assemble(f"{row.busy}/{row.idle}/", (str(row.dead), "bold red" if row.dead else ""))
        cpu = "-" if row.cpu is None else f"{row.cpu:.0f}%"
        table.add_row(row.node, cpu, memory, "-" if row.load is None else f"{row.load:.2f}", gpus or "-", engines)
    events = [Text(f"! {e}", "yellow") for e in frame.events]
    silent = [Text(f"{frame.controller_problem}: the task numbers are its last answer's", "bold red")]
    return Group(head, *(silent if frame.controller_problem else []), table, *events)


@click.command(short_help="A live view: nodes, engines, tasks per second.")
@click.option("--once", is_flag=True, help="One frame, then exit (with --output json: one document).")
@click.option(
    "--interval", type=click.FloatRange(0.2, 60), default=1.0, show_default=True, help="Seconds between refreshes."
)
@click.argument("name")
@output_option
@click.pass_context
def top(ctx: click.Context, once: bool, interval: float, name: str) -> None:
    """A live view of cluster NAME, refreshed every second: each node's CPU, memory, load,
    GPUs and engines (busy, idle, dead); tasks waiting, running, done in the last 10 s and
    per second, failed; engines registered against expected; the slowest node; what changed
    (an engine that left or joined, a node that stopped answering).  q or Ctrl-C quits.

    The numbers come from the controller (queue_status, the hub's task records) and from
    one round trip per node through globular's own helper: no agent, no new port.
    """
    import sys

    from globular.ipcluster.top import Watch
    from globular.paths import globular_home

    out = output(ctx)
    home = globular_home()

    async def one() -> Any:
        watch = Watch(name, home)
        try:
            await watch.frame()  # the CPU percent is between two samples (the first connects)
            await asyncio.sleep(min(interval, 0.5))
            return await watch.frame()
        finally:
            await watch.close()

    if once or out.json or not out.console.is_terminal:
        frame = run(one())
        out.result(frame, text=lambda: out.print(_frame_view(frame)))
        return
    from rich.live import Live

    keys = _Keys(sys.stdin)

    async def unless_quit(work: Any) -> Any:
        """``work``'s result, or None as soon as q is pressed (``work`` is then cancelled): the
        keys are read while a frame is being made, whatever the controller does."""
        task = asyncio.ensure_future(work)
        while not task.done():
            if keys.pressed("q"):
                task.cancel()
                return None
            await asyncio.wait({task}, timeout=0.05)
        return task.result()

    async def live() -> None:
        watch = Watch(name, home)
        try:
            with Live(console=out.console, auto_refresh=False, transient=False) as view:
                view.update(f"{name}: asking the nodes and the controller... (q quits)", refresh=True)
                while True:
                    frame = await unless_quit(watch.frame())
                    if frame is None:
                        return
                    view.update(_frame_view(frame), refresh=True)
                    if await unless_quit(asyncio.sleep(interval, result=True)) is None:
                        return
        finally:
            await watch.close()

    try:
        with keys:
            run(live())
    except KeyboardInterrupt:
        pass


class _Keys:
    """Single keys from a terminal (cbreak mode while inside ``with``; the terminal as it was after)."""

    def __init__(self, stream: Any):
        self.stream = stream
        self.saved: Any = None

    def __enter__(self) -> _Keys:
        import termios
        import tty

        if self.stream.isatty():
            self.saved = termios.tcgetattr(self.stream.fileno())
            tty.setcbreak(self.stream.fileno())
        return self

    def __exit__(self, *exc: object) -> None:
        import termios

        if self.saved is not None:
            termios.tcsetattr(self.stream.fileno(), termios.TCSADRAIN, self.saved)

    def pressed(self, key: str) -> bool:
        import os
        import select

        if self.saved is None:
            return False
        while select.select([self.stream], [], [], 0)[0]:
            if os.read(self.stream.fileno(), 1).decode(errors="replace") == key:
                return True
        return False
