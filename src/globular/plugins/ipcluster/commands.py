"""IPCluster's commands, added to the ``globular`` CLI through the ``globular.commands`` entry
points: ``shell``, ``notebook`` and ``restart-controller``.  Command-line code only: what
they do is in the plugin's modules, what they show goes through :mod:`globular.cli.render`."""

from __future__ import annotations

import click
from rich.markup import escape

from globular.aio import run_sync
from globular.cli.render import output, output_option
from globular.errors import BadInput
from globular.plugins.ipcluster.notebook import forward_notebook, notebook_info


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
    from globular.plugins.ipcluster.client import connect

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
        from globular.paths import globular_home
        from globular.plugins.ipcluster.keep import save_cluster_notebooks

        saved = run_sync(save_cluster_notebooks(name, globular_home()), sigterm_cancels=True)
        if saved is None:
            out.result(
                {"saved": None}, text=lambda: out.say(f"The notebooks of {escape(name)} are on this machine already.")
            )
        else:
            out.result(saved, text=lambda: out.say(
                f"Saved {saved.files} files of {escape(saved.source)} to [bold]{escape(str(saved.folder))}[/]"
                f" ({saved.copied} copied, {saved.bytes / 1e6:.1f} MB)"
            ))  # fmt: skip
        return
    info = notebook_info(name)
    rows = [
        ("notebook", info["url"]),
        ("password", info.get("password") or "the notebook_passwd of your config"),
        ("certificate", info["fingerprint"]),
        ("directory", info["directory"]),
    ]
    out.result(info, text=lambda: out.grid(rows))
    if forward:

        def ready(url: str) -> None:
            out.err.print(f"Forwarding [bold]{escape(url)}[/] to the master; Ctrl-C stops it.")

        try:
            run_sync(forward_notebook(name, local_port, ready), sigterm_cancels=True)
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
    spec = Config.builtin().plugin_spec("ipclusterrestartcontroller", builtin_fallback=True)
    with out.reporter() as reporter:
        result = run_sync(operations.run_plugin(name, spec, reporter=reporter), sigterm_cancels=True)

    def text() -> None:
        out.say(f"Controller of [bold]{escape(name)}[/] restarted in {result.elapsed:.1f} s")
        if result.report:
            out.report(result.report)

    out.result({"name": name, "elapsed": result.elapsed, "report": result.report}, text=text)
