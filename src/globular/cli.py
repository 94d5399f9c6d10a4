"""The ``globular`` command: a thin layer that renders what the library returns.

Exit codes are decided here, in :func:`main`: 0 success, 1 an operation failed,
2 bad input (config or arguments), 130 interrupted.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import sys
import time

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from globular import __version__, cluster
from globular.config import Config
from globular.errors import ClusterNotFound, GlobularError
from globular.paths import globular_home
from globular.plugins.base import PluginReport
from globular.reporting import NODE_STEPS
from globular.state import StateStore

console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


class RichReporter:
    """Draws the library's progress steps as rich progress bars."""

    def __init__(self, target: Console):
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=target,
        )
        self.tasks: dict[str, int] = {}
        self.node_steps: dict[str, dict[str, float]] = {}

    def __enter__(self) -> RichReporter:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def begin(self, key: str, description: str, total: int) -> None:
        self.tasks[key] = self.progress.add_task(description, total=total)

    def advance(self, key: str, amount: int = 1) -> None:
        self.progress.advance(self.tasks[key], amount)

    def set(self, key: str, completed: int) -> None:
        self.progress.update(self.tasks[key], completed=completed)

    def end(self, key: str) -> None:
        task = self.tasks[key]
        self.progress.update(task, completed=self.progress.tasks[task].total)
        self.progress.stop_task(task)

    def note(self, message: str) -> None:
        self.progress.console.print(message)

    def node_step(self, node: str, step: str, seconds: float) -> None:
        """One line per node: the steps it reached, with the time each took."""
        done = self.node_steps.setdefault(node, {})
        done[step] = seconds
        text = "  ".join(f"{name} {took:.1f}s" for name, took in done.items())
        key = f"node:{node}"
        if key not in self.tasks:
            self.tasks[key] = self.progress.add_task("", total=len(NODE_STEPS))
        total = len(NODE_STEPS)
        self.progress.update(
            self.tasks[key],
            description=f"[dim]{node:<9}[/] {text}",
            completed=total if step == "registered" else min(len(done), total - 1),
        )


def run(coro):
    """Run a library coroutine; SIGTERM cancels it like Ctrl-C does, so the
    library's cleanup runs (a half-started cluster is undone)."""

    async def main():
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
        try:
            return await coro
        finally:
            loop.remove_signal_handler(signal.SIGTERM)

    try:
        return asyncio.run(main())
    except asyncio.CancelledError:
        raise KeyboardInterrupt from None


def load_config(ctx: click.Context) -> Config:
    return Config.load(ctx.obj["config"])


def render_report(report: PluginReport) -> None:
    if report.summary:
        table = Table.grid(padding=(0, 2))
        for label, value in report.summary:
            table.add_row(f"[bold]{escape(label)}[/]", escape(value))
        console.print(table)
    for warning in report.warnings:
        err_console.print(f"[yellow]warning:[/] {escape(warning)}")
    if report.hints:
        console.print("\nConnect with:")
        for line in report.hints:
            console.print(f"  {line}", markup=False)


def age(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "-c",
    "--config",
    type=click.Path(dir_okay=False),
    envvar="GLOBULAR_CONFIG",
    help="Config file (StarCluster INI format). Default: $GLOBULAR_CONFIG, else ~/.globular/config, "
    "else a built-in template (local provider, ipcluster plugin).",
)
@click.version_option(__version__, prog_name="globular")
@click.pass_context
def cli(ctx: click.Context, config: str | None) -> None:
    """Turn a set of machines into an interactive IPython-parallel cluster.

    \b
    globular start -s 3 mycluster        start a 3-node cluster
    globular shell --ipcluster=mycluster IPython with `ipclient` and `ipview`
    globular listclusters                what is running, and is it healthy
    globular status mycluster            per node: steps, engines, load, problems
    globular check mycluster             the preflight checks alone
    globular addnode mycluster           more nodes; their engines join
    globular terminate mycluster         stop everything and forget it
    globular env prune -c mytemplate     remove the node environments from its hosts
    """
    ctx.obj = {"config": config}


@cli.command()
@click.option("-s", "--cluster-size", type=click.IntRange(min=1), help="Number of nodes (overrides cluster_size).")
@click.option("-c", "--cluster-template", "template", help="[cluster TEMPLATE] to use (default: default_template).")
@click.argument("name")
@click.pass_context
def start(ctx: click.Context, cluster_size: int | None, template: str | None, name: str) -> None:
    """Start cluster NAME: provision nodes, then run the template's plugins.

    On other machines (ssh, ec2) each node first gets its Python environment:
    ipyparallel at this machine's version and the template's packages, in a
    venv globular builds on the host from wheels resolved here (cached: a
    second start installs nothing; environment = system turns it off).  With
    the ipcluster plugin this starts an IPython-parallel controller on the
    master and one engine per core on every node, and writes the client
    connection file to ~/.globular/ipcluster/NAME-REGION.json.  If anything
    fails, everything already started is stopped again.
    """
    spec = load_config(ctx).cluster_spec(template, cluster_size)
    console.print(
        f"Starting cluster [bold]{name}[/] from template [bold]{spec.template}[/]: "
        f"{spec.cluster_size} nodes, provider {spec.provider}"
    )
    with RichReporter(console) as reporter:
        result = run(cluster.start(name, spec, reporter=reporter))
    record = result.record
    render_warnings(result.checks)
    console.print(
        f"\n[green]Cluster {name} is running[/]: {len(record.nodes)} nodes, started in {result.elapsed:.1f} s"
    )
    for report in result.reports:
        render_report(report)


def _idle_column(state, now: float) -> str:
    if state.idle_shutdown_at:
        return "done " + time.strftime("%H:%M", time.localtime(state.idle_shutdown_at))
    if state.idle_deadline:
        return f"in {age(max(0.0, state.idle_deadline - now))} ({time.strftime('%H:%M', time.localtime(state.idle_deadline))})"
    return "-"


def _specs_with_accounts(ctx: click.Context) -> list:
    """The config's templates, whose accounts (ec2) may hold clusters started elsewhere."""
    try:
        config = load_config(ctx)
    except GlobularError:
        return []
    specs = []
    for template in config.templates:
        try:
            specs.append(config.cluster_spec(template))
        except GlobularError:  # a broken template is reported by the commands that use it
            continue
    return specs  # cluster.discover asks only the providers that have an account to search


def _found_elsewhere(ctx: click.Context) -> tuple[list, list[str]]:
    specs = _specs_with_accounts(ctx)
    if not specs:
        return [], []
    try:
        return run(cluster.discover(specs)), []
    except GlobularError as exc:
        return [], [f"could not look for clusters started elsewhere: {exc}"]


@cli.command()
@click.pass_context
def listclusters(ctx: click.Context) -> None:
    """List clusters: those this machine started, and (ec2) those the config's
    accounts hold that another machine started (found by their tags)."""
    records, problems = StateStore(globular_home()).list()
    found, warnings = _found_elsewhere(ctx)
    if not records and not problems and not found:
        console.print("No clusters.")
    if records or found:
        from globular import health

        checked = run(health.check_all(records, globular_home())) if records else {}
        table = Table(
            "name", "status", "provider", "region", "nodes", "engines", "template", "up", "idle shutdown", "health"
        )
        now = time.time()
        for record in records:
            expected = (record.plugin_data.get("ipcluster") or {}).get("engines")
            state = checked[record.name]
            if expected is None:
                engines = "-"
            elif state.engines_alive is None:
                engines = f"?/{expected}"
            else:
                engines = f"{state.engines_alive}/{expected}"
            table.add_row(
                record.name,
                record.status,
                record.spec.provider,
                record.region,
                str(len(record.nodes)),
                engines,
                record.spec.template,
                age(now - record.created),
                _idle_column(state, now),
                state.condition if state.ok else f"[yellow]{escape(state.condition)}[/]",
            )
        for other in found:
            table.add_row(
                other.name,
                "running elsewhere",
                other.spec.provider,
                other.region,
                str(len(other.nodes)),
                "-",
                other.spec.template,
                "-",
                "-",
                "not checked (no local record)",
            )
        console.print(table)
    for problem in problems:
        err_console.print(f"[yellow]warning:[/] {escape(str(problem))}")
    for warning in warnings:
        err_console.print(f"[yellow]warning:[/] {escape(warning)}")


@cli.command()
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@click.argument("name")
@click.pass_context
def terminate(ctx: click.Context, yes: bool, name: str) -> None:
    """Terminate cluster NAME: stop all its processes and release its nodes.

    A cluster another machine started (ec2, found by its tags) is terminated too.
    """
    store = StateStore(globular_home())
    try:
        record = store.get(name)
    except ClusterNotFound:
        found = next((f for f in _found_elsewhere(ctx)[0] if f.name == name), None)
        if found is None:
            raise
        if not yes:
            click.confirm(
                f"Cluster {name} was started elsewhere ({len(found.nodes)} instances in {found.region}). Terminate it?",
                abort=True,
            )
        record = cluster.adopt(found)
        yes = True
    if not yes:
        click.confirm(f"Terminate cluster {name} ({len(record.nodes)} nodes, {record.status})?", abort=True)
    with RichReporter(console) as reporter:
        result = run(cluster.terminate(name, reporter=reporter))
    for warning in result.warnings:
        err_console.print(f"[yellow]warning:[/] {escape(warning)}")
    console.print(
        f"Terminated cluster [bold]{name}[/]: {result.nodes} nodes released, "
        f"{result.processes_stopped} processes stopped"
        + (f" ({result.processes_killed} needed SIGKILL)" if result.processes_killed else "")
        + f" in {result.elapsed:.1f} s"
    )


@cli.group()
def env() -> None:
    """Node environments: the venvs globular builds on the hosts (environment = managed)."""


@env.command("prune")
@click.option(
    "-c", "--cluster-template", "template", help="[cluster TEMPLATE] whose hosts to clean (default: default_template)."
)
@click.option("--wheels", is_flag=True, help="Also empty this machine's wheelhouse cache (~/.globular/wheels).")
@click.pass_context
def env_prune(ctx: click.Context, template: str | None, wheels: bool) -> None:
    """Remove the node environments from the hosts of a template.

    Environments that a running cluster of this machine uses are kept.  The next
    start builds what it needs again (from the wheelhouse cache here, offline).
    """
    spec = load_config(ctx).cluster_spec(template)
    with RichReporter(console) as reporter:
        removed = run(cluster.prune_environments(spec, reporter=reporter))
    for node, names in removed.items():
        console.print(
            f"{node}: {len(names)} environment{'s' if len(names) != 1 else ''} removed"
            + (f" ({', '.join(names)})" if names else "")
        )
    if wheels:
        cache = globular_home() / "wheels"
        count = sum(1 for p in cache.iterdir() if not p.name.startswith(".")) if cache.is_dir() else 0
        shutil.rmtree(cache, ignore_errors=True)
        console.print(f"this machine: {count} wheelhouse{'s' if count != 1 else ''} removed from {cache}")


def render_warnings(checks) -> None:
    for check in checks:
        for warning in check.warnings:
            err_console.print(f"[yellow]warning:[/] {escape(check.node)}: {escape(warning)}")


@cli.command()
@click.option("-s", "--cluster-size", type=click.IntRange(min=1), help="Nodes to check when NAME is not running.")
@click.option("-c", "--cluster-template", "template", help="[cluster TEMPLATE] to check when NAME is not running.")
@click.option("--output", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.argument("name")
@click.pass_context
def check(ctx: click.Context, cluster_size: int | None, template: str | None, output: str, name: str) -> None:
    """Run the preflight checks alone, on every node at once.

    On running cluster NAME: its nodes.  Otherwise the template's nodes are
    brought up (local, ssh), checked and released.  Each node: SSH answers, its
    Python runs (same major.minor as here), its environment can be built
    (environment = managed: built now, so that start finds it cached) or
    ipyparallel is installed in a compatible version (environment = system;
    msgpack, jupyterlab when the settings need them), free cores, and the
    controller's address is reachable from it.  Exit code 1 if
    a node cannot run its engines.
    """
    spec = None
    if not StateStore(globular_home()).exists(name):
        spec = load_config(ctx).cluster_spec(template, cluster_size)
    with RichReporter(err_console if output == "json" else console) as reporter:
        checks = run(cluster.check(name, spec, reporter=reporter))
    if output == "json":
        click.echo(json.dumps([c.to_dict() for c in checks], indent=2))
    else:
        table = Table("node", "address", "python", "ipyparallel", "cores", "load", "controller reachable", "result")
        for c in checks:
            reach = {True: "yes", False: "[red]no[/]", None: "-"}[c.controller_reachable]
            result = "[green]ok[/]" if c.ok else f"[red]{escape('; '.join(c.problems))}[/]"
            table.add_row(
                c.node,
                c.address,
                c.python or "-",
                c.modules.get("ipyparallel") or "-",
                str(c.cpus or "-"),
                str(c.load if c.load is not None else "-"),
                reach,
                result,
            )
        console.print(table)
        render_warnings(checks)
    ctx.exit(0 if all(c.ok for c in checks) else 1)


@cli.command()
@click.option("--output", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.argument("name")
@click.pass_context
def status(ctx: click.Context, output: str, name: str) -> None:
    """Per-node status of cluster NAME, asked of the nodes and the controller.

    For each node: the step its bring-up reached (provision, ssh, setup,
    engines, registered) with the time each took, engines running / registered
    / expected, load, time in the cluster, and what is wrong if anything is.
    Exit code 1 when something is wrong.
    """
    from globular.status import cluster_status

    record = StateStore(globular_home()).get(name)
    report = run(cluster_status(record, globular_home()))
    if output == "json":
        click.echo(json.dumps(report.to_dict(), indent=2))
        ctx.exit(0 if report.ok else 1)
    console.print(
        f"Cluster [bold]{name}[/]: {report.status}, provider {report.provider} ({report.region}), controller {report.controller}"
        + {"curve": ", traffic encrypted (CurveZMQ)", "none": ", traffic not encrypted", None: ""}[report.encryption]
    )
    table = Table("node", "address", "state", "steps", "engines run/reg/exp", "load", "up", "problem")
    for n in report.nodes:
        steps = " ".join(f"{k} {v:.1f}s" for k, v in n.steps.items())
        engines = (
            f"{'?' if n.engines_running is None else n.engines_running}/"
            f"{'?' if n.engines_registered is None else n.engines_registered}/{n.engines_expected}"
        )
        table.add_row(
            n.name,
            n.address,
            n.state if not n.problem else f"[red]{n.state}[/]",
            steps,
            engines,
            "-" if n.load is None else str(n.load),
            age(n.uptime),
            escape(n.problem or ""),
        )
    console.print(table)
    for problem in report.problems:
        err_console.print(f"[red]problem:[/] {escape(problem)}")
    ctx.exit(0 if report.ok else 1)


@cli.command()
@click.option(
    "-n", "--num-nodes", "count", type=click.IntRange(min=1), default=1, show_default=True, help="Nodes to add."
)
@click.option(
    "-H",
    "--host",
    "hosts",
    multiple=True,
    metavar="[USER@]HOST[:PORT]",
    help="ssh provider: the host to use (repeat for several); default: the next unused hosts of node_hosts.",
)
@click.argument("name")
def addnode(count: int, hosts: tuple[str, ...], name: str) -> None:
    """Add nodes to running cluster NAME.

    New nodes run every plugin's on_add_node: with ipcluster, their engines
    register with the running controller, and clients already connected see
    them without reconnecting.  If anything fails, the new nodes are removed.
    """
    with RichReporter(console) as reporter:
        result = run(cluster.add_nodes(name, count, hosts=list(hosts) or None, reporter=reporter))
    console.print(f"Added {', '.join(result.nodes)} to [bold]{name}[/] in {result.elapsed:.1f} s")
    for report in result.reports:
        render_report(report)


@cli.command()
@click.argument("name")
@click.argument("node")
def removenode(name: str, node: str) -> None:
    """Remove NODE (e.g. node002) from running cluster NAME.

    Its engines are shut down and stopped by pid, every plugin's
    on_remove_node runs (in reverse order), and the node is released.
    """
    with RichReporter(console) as reporter:
        result = run(cluster.remove_node(name, node, reporter=reporter))
    console.print(f"Removed {node} from [bold]{name}[/] in {result.elapsed:.1f} s")


@cli.command()
@click.option("--ipcluster", "name", required=True, metavar="NAME", help="Cluster to connect to.")
@click.option("-c", "--command", "code", help="Run CODE with ipclient and ipview defined, then exit.")
def shell(name: str, code: str | None) -> None:
    """A Python shell connected to cluster NAME.

    `ipclient` is an ipyparallel Client and `ipview` = ipclient[:], e.g.
    ipview.map_async(lambda x: x**30, range(8)).get()
    """
    from globular.client import connect

    client = connect(name)
    namespace = {"ipclient": client, "ipview": client[:], "Client": type(client)}
    try:
        if code is not None:
            exec(compile(code, "<globular shell -c>", "exec"), namespace)
        else:
            import IPython

            console.print(f"Connected to {name}: {len(client.ids)} engines as `ipclient`, `ipview` = ipclient[:]")
            IPython.start_ipython(argv=[], user_ns=namespace)
    finally:
        client.close()


@cli.command()
@click.option("--forward", is_flag=True, help="Forward a port of this machine to it over ssh (until Ctrl-C).")
@click.option(
    "--port",
    "local_port",
    type=click.IntRange(0, 65535),
    default=0,
    help="Local port for --forward (default: a free one).",
)
@click.argument("name")
def notebook(forward: bool, local_port: int, name: str) -> None:
    """Show the URL and password of cluster NAME's notebook server.

    The server speaks HTTPS only, with a self-signed certificate whose
    fingerprint is shown (your browser asks you to accept it once; it is kept
    across starts of the same cluster).  With ssh nodes, --forward makes it
    reachable at https://127.0.0.1:PORT/ through the ssh connection.
    """
    from globular import client

    info = client.notebook(name)
    table = Table.grid(padding=(0, 2))
    table.add_row("[bold]notebook[/]", escape(info["url"]))
    table.add_row("[bold]password[/]", escape(info.get("password") or "the notebook_passwd of your config"))
    table.add_row("[bold]certificate[/]", escape(info["fingerprint"]))
    table.add_row("[bold]directory[/]", escape(info["directory"]))
    console.print(table)
    if forward:

        def ready(url: str) -> None:
            console.print(f"Forwarding [bold]{escape(url)}[/] to the master; Ctrl-C stops it.")

        try:
            run(client.forward_notebook(name, local_port, ready=ready))
        except KeyboardInterrupt:
            console.print("Forwarding stopped.")


def _open_shell(name: str, node: str, user: str | None, command: tuple[str, ...]) -> int:
    import subprocess

    from globular.client import node_shell

    shell = node_shell(name, node, user=user, command=" ".join(command) if command else None)
    try:
        return subprocess.run(shell.argv, cwd=shell.cwd, env=shell.env).returncode
    except FileNotFoundError:
        raise GlobularError(f"cannot run {shell.argv[0]!r}: not found (install openssh-client)") from None


@cli.command(context_settings={"ignore_unknown_options": True})
@click.option("-u", "--user", help="Log in as USER (default: the cluster's ssh user).")
@click.argument("name")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def sshmaster(ctx: click.Context, user: str | None, name: str, command: tuple[str, ...]) -> None:
    """Open a shell on the master of cluster NAME, or run COMMAND there.

    Uses the cluster's ssh key, port and known_hosts; on a local cluster, a
    shell in the master's folder.  Exits with COMMAND's exit status.
    """
    ctx.exit(_open_shell(name, "master", user, command))


@cli.command(context_settings={"ignore_unknown_options": True})
@click.option("-u", "--user", help="Log in as USER (default: the cluster's ssh user).")
@click.argument("name")
@click.argument("node")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def sshnode(ctx: click.Context, user: str | None, name: str, node: str, command: tuple[str, ...]) -> None:
    """Open a shell on NODE (master, node001, ...) of cluster NAME, or run COMMAND there."""
    ctx.exit(_open_shell(name, node, user, command))


@cli.command()
@click.argument("plugin")
@click.argument("name")
@click.pass_context
def runplugin(ctx: click.Context, plugin: str, name: str) -> None:
    """Run PLUGIN's `run` on cluster NAME (e.g. ipclusterrestart, ipclusterstop).

    PLUGIN is a [plugin PLUGIN] section of the config, or a built-in plugin.
    """
    record = StateStore(globular_home()).get(name)
    spec = next((p for p in record.spec.plugins if p.name == plugin), None)
    if spec is None:
        spec = load_config(ctx).plugin_spec(plugin, builtin_fallback=True)
    with RichReporter(console) as reporter:
        result = run(cluster.run_plugin(name, spec, reporter=reporter))
    console.print(f"Plugin [bold]{plugin}[/] ran on {name} in {result.elapsed:.1f} s")
    if result.report:
        render_report(result.report)


def main(argv: list[str] | None = None) -> None:
    """Entry point: runs the CLI and turns outcomes into exit codes."""
    try:
        code = cli.main(args=argv, prog_name="globular", standalone_mode=False)
    except click.exceptions.Abort as exc:
        if isinstance(exc.__cause__, KeyboardInterrupt):  # click wraps Ctrl-C in Abort
            err_console.print("Interrupted.")
            sys.exit(130)
        err_console.print("Aborted.")
        sys.exit(1)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err_console.print("Interrupted.")
        sys.exit(130)
    except GlobularError as exc:
        err_console.print(f"[red]error:[/] {escape(str(exc))}")
        sys.exit(exc.exit_code)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
