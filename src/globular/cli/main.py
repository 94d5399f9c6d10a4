"""The ``globular`` command: each command calls the library, which returns data, and hands it
to the one renderer (:class:`globular.cli.render.Output`).  Exit codes are decided in :func:`main`:
0 success, 1 an operation failed, 2 bad input, 130 interrupted.  Installed plugins add their
own commands through the ``globular.commands`` entry points; ``config`` is in cli/config.py.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

import click
from rich.markup import escape

from globular import __version__
from globular.cli.balance import EVENT_WORDS, loadbalance
from globular.cli.config import config_group, env
from globular.cli.data import get, put
from globular.cli.group import (
    VERBOSITY_HELP,
    GlobularGroup,
    Later,
    every_command_takes_output_and_verbose,
    load_config,
    log_to_stderr,
    run,
)
from globular.cli.nodes import addnode, removenode, runplugin
from globular.cli.render import Output, output, output_option
from globular.cli.ssh import sshmaster, sshnode
from globular.errors import ClusterNotFound, GlobularError, StateError
from globular.limits import raise_open_file_limit
from globular.paths import globular_home
from globular.results import age, counted

if TYPE_CHECKING:
    from globular import operations, salvage, state
else:  # imported by the commands that use them, when they run
    operations, salvage, state = Later("globular.operations"), Later("globular.salvage"), Later("globular.state")


@click.group(cls=GlobularGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "-c",
    "--config",
    metavar="FILE",
    envvar="GLOBULAR_CONFIG",
    help="Config file (StarCluster INI format). Default: $GLOBULAR_CONFIG, else ~/.globular/config, "
    "else a built-in template (local provider, ipcluster plugin).",
)
@click.option("-v", "--verbose", count=True, help=VERBOSITY_HELP)
@output_option
@click.version_option(__version__, prog_name="globular")
@click.pass_context
def cli(ctx: click.Context, config: str | None, verbose: int) -> None:
    """Turn a set of machines into an interactive IPython-parallel cluster.

    \b
    globular start -s 3 mycluster        start a 3-node cluster
    globular shell --ipcluster=mycluster IPython with `ipclient` and `ipview`
    globular listclusters                what is running, and is it healthy
    globular status mycluster            per node: steps, engines, load, problems
    globular check mycluster             the preflight checks alone
    globular addnode mycluster           more nodes; their engines join
    globular loadbalance mycluster       grow and shrink it with its work
    globular terminate mycluster         stop everything and forget it
    globular env prune -c mytemplate     remove the node environments from its hosts

    Every command takes --output json. Each operation on a cluster is also
    logged to ~/.globular/logs/NAME.log.
    """
    ctx.ensure_object(dict)["config"] = config
    log_to_stderr(ctx.obj, verbose)


@cli.command(short_help="Start a cluster: nodes, controller, engines.")
@click.option("-s", "--cluster-size", type=click.IntRange(min=1), help="Number of nodes (overrides cluster_size).")
@click.option("-c", "--cluster-template", "template", help="[cluster TEMPLATE] to use (default: default_template).")
@click.argument("name")
@output_option
@click.pass_context
def start(ctx: click.Context, cluster_size: int | None, template: str | None, name: str) -> None:
    """Start cluster NAME: provision nodes, then run the template's plugins.

    On other machines (ssh, ec2, slurm) each node first gets its Python environment:
    ipyparallel at this machine's version and the template's packages, in a
    venv globular builds on the host from wheels resolved here (cached: a
    second start installs nothing; environment = system turns it off).  With
    the ipcluster plugin this starts an IPython-parallel controller on the
    master and one engine per core on every node, and writes the client
    connection file to ~/.globular/ipcluster/NAME-REGION.json.  If anything
    fails, everything already started is stopped again.
    """
    out = output(ctx)
    state.check_cluster_name(name)
    spec = load_config(ctx).cluster_spec(template, cluster_size)
    out.say(
        f"Starting cluster [bold]{escape(name)}[/] from template [bold]{escape(spec.template)}[/]: "
        f"{counted(spec.cluster_size, 'node')}, provider {spec.provider}"
    )
    with out.reporter() as reporter:
        result = run(operations.start(name, spec, reporter=reporter))
    out.warnings(result.checks)
    record = result.record
    balancer: dict[str, Any] | None = None
    if spec.balance is not None:  # min_nodes: the cluster follows its work from the start
        from globular.balance.service import detach

        try:
            detached = detach(name, spec.balance, globular_home())
            balancer = {"pid": detached.pid, "log": detached.log}
        except GlobularError as exc:
            out.warn(f"{exc}; the cluster runs without it: `globular loadbalance --detach {name}` tries again")

    def text() -> None:
        out.say(
            f"\n[green]Cluster {escape(name)} is running[/]: {len(record.nodes)} nodes, started in {result.elapsed:.1f} s"
        )
        for report in result.reports:
            out.report(report)
        if spec.balance is not None and balancer is not None:
            bounds = f"{spec.balance.min_nodes}..{spec.balance.max_nodes}"
            out.say(
                f"\nIts balancer follows the work ({bounds} nodes) in the background, pid {balancer['pid']}: "
                f"`globular loadbalance --stop {escape(name)}` stops it"
            )

    data = {"name": name, "nodes": [n.name for n in record.nodes], "elapsed": result.elapsed, "balancer": balancer}
    out.result({**data, "reports": result.reports, "checks": result.checks}, text=text)


def _found_elsewhere(ctx: click.Context) -> tuple[list[salvage.FoundCluster], list[str]]:
    """Clusters that the config's accounts (ec2, slurm) hold and another machine started (or a lost record)."""
    specs = load_config(ctx).loadable_specs()  # a config named by -c that is not there is an error
    if not specs:
        return [], []
    try:
        return run(salvage.discover(specs)), []
    except GlobularError as exc:
        return [], [f"could not look for clusters started elsewhere: {exc}"]


@cli.command(short_help="List the clusters and their health.")
@output_option
@click.pass_context
def listclusters(ctx: click.Context) -> None:
    """List clusters: those this machine started, and (ec2, slurm) those the config's
    accounts hold that another machine started (found by their tags or jobs).

    The health column says whether each cluster is what its record says
    (asked of its nodes, by pid); plugins add columns (ipcluster: engines
    running / expected, idle shutdown)."""
    from globular.status import health_of_all, listed

    out = output(ctx)
    records, problems = state.StateStore(globular_home()).list()
    found, warnings = _found_elsewhere(ctx)
    checked = run(health_of_all(records, globular_home())) if records else {}
    rows = [listed(record, checked[record.name]) for record in records]
    extra = list(dict.fromkeys(c for row in rows for c in row["columns"]))
    elsewhere = [
        {"name": f.name, "provider": f.spec.provider, "region": f.region, "nodes": len(f.nodes)} for f in found
    ]
    for message in [str(p) for p in problems] + warnings:
        out.warn(message)

    def text() -> None:
        if not rows and not elsewhere:
            out.say("No clusters.")
            return
        table = out.table("name", "status", "provider", "region", "nodes", "template", "up", *extra, "health")
        for row in rows:
            health = row["health"] if row["ok"] else f"[yellow]{escape(row['health'])}[/]"
            cells = [row["name"], row["status"], row["provider"], row["region"], str(row["nodes"]), row["template"]]
            table.add_row(*cells, age(row["up"]), *(row["columns"].get(c, "-") for c in extra), health)
        for other in elsewhere:
            cells = [other["name"], "running elsewhere", other["provider"], other["region"], str(other["nodes"]), "-"]
            table.add_row(*cells, "-", *("-" for _ in extra), "not checked (no local record)")
        out.print(table)

    out.result({"clusters": rows, "elsewhere": elsewhere, "problems": [str(p) for p in problems]}, text=text)


@cli.command(short_help="Stop everything and release the nodes.")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option(
    "--force",
    is_flag=True,
    help="Whatever fails (an unreadable record, a node that is gone): stop every process marked with the "
    "cluster that can be reached, release what can be released, forget the cluster, and say what was left "
    "(the notebooks are not copied home).",
)
@click.option(
    "--discard-notebooks",
    is_flag=True,
    help="Do not copy the master's notebooks home first (terminate stops when that copy fails, or is too big).",
)
@click.argument("name")
@output_option
@click.pass_context
def terminate(ctx: click.Context, yes: bool, force: bool, discard_notebooks: bool, name: str) -> None:
    """Terminate cluster NAME: stop all its processes and release its nodes.

    With the notebook on a remote master, its notebook folder is first copied
    home, into ~/.globular/notebooks/NAME-REGION/TIME/ (only what changed since
    the last copy travels); if that fails, nothing is released.  A cluster
    another machine started (ec2: found by its tags; slurm: by its jobs'
    comments) is terminated too.
    """
    out = output(ctx)
    store = state.StateStore(globular_home())
    if force:
        if not yes:
            click.confirm(f"Force the termination of cluster {name}?", abort=True)
        with out.reporter() as reporter:
            result = run(salvage.force_terminate(name, reporter=reporter))
        for warning in result.warnings:
            out.warn(warning)
        out.result(
            result,
            text=lambda: out.say(
                f"Cluster [bold]{escape(name)}[/] is forgotten: {result.processes_stopped} processes stopped"
            ),
        )
        return
    try:
        record = store.get(name)
    except StateError as exc:
        raise StateError(f"{exc}; `globular terminate --force {name}` stops what it marked and forgets it") from None
    except ClusterNotFound:
        found = next((f for f in _found_elsewhere(ctx)[0] if f.name == name), None)
        if found is None:
            raise
        if not yes:
            click.confirm(
                f"Cluster {name} was started elsewhere ({len(found.nodes)} nodes in {found.region}). Terminate it?",
                abort=True,
            )
        record = salvage.adopt(found)
        yes = True
    if not yes:
        click.confirm(f"Terminate cluster {name} ({len(record.nodes)} nodes, {record.status})?", abort=True)
    with out.reporter() as reporter:
        result = run(operations.terminate(name, discard=discard_notebooks, reporter=reporter))
    for warning in result.warnings:
        out.warn(warning)
    killed = f" ({result.processes_killed} needed SIGKILL)" if result.processes_killed else ""

    def text() -> None:
        out.say(
            f"Terminated cluster [bold]{escape(name)}[/]: {counted(result.nodes, 'node')} released, "
            f"{counted(result.processes_stopped, 'process', 'processes')} stopped{killed} in {result.elapsed:.1f} s"
        )
        for report in result.reports:
            out.report(report)

    out.result(result, text=text)


@cli.command(short_help="Run the preflight checks on every node.")
@click.option("-s", "--cluster-size", type=click.IntRange(min=1), help="Nodes to check when NAME is not running.")
@click.option("-c", "--cluster-template", "template", help="[cluster TEMPLATE] to check when NAME is not running.")
@click.argument("name")
@output_option
@click.pass_context
def check(ctx: click.Context, cluster_size: int | None, template: str | None, name: str) -> None:
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
    out = output(ctx)
    spec = None
    if not state.StateStore(globular_home()).exists(name):
        spec = load_config(ctx).cluster_spec(template, cluster_size)
    with out.reporter() as reporter:
        checks = run(operations.check(name, spec, reporter=reporter))
    ok = all(c.ok for c in checks)

    def text() -> None:
        gpus = any(c.gpus for c in checks)
        columns = ["node", "address", "python", "ipyparallel", "cores", *(["gpus"] if gpus else [])]
        table = out.table(*columns, "engines", "load", "controller reachable", "result")
        for c in checks:
            reach = {True: "yes", False: "[red]no[/]", None: "-"}[c.controller_reachable]
            result = "[green]ok[/]" if c.ok else f"[red]{escape('; '.join(c.problems))}[/]"
            load = str(c.load if c.load is not None else "-")
            ipp = c.modules.get("ipyparallel") or "-"
            cells = [c.node, c.address, c.python or "-", ipp, str(c.cpus or "-"), *([str(len(c.gpus))] if gpus else [])]
            table.add_row(*cells, str(c.engines), load, reach, result)
        out.print(table)
        out.warnings(checks)

    out.result({"checks": checks}, ok=ok, text=text)
    ctx.exit(0 if ok else 1)


@cli.command(short_help="Per node: steps, engines, load, problems.")
@click.argument("name")
@output_option
@click.pass_context
def status(ctx: click.Context, name: str) -> None:
    """Per-node status of cluster NAME, asked of the nodes and the plugins.

    For each node: the step its bring-up reached (provision, ssh, setup, env,
    engines, registered) with the time each took, load, time in the cluster,
    the plugins' columns (ipcluster: engines running / registered / expected)
    and what is wrong if anything is.  Exit code 1 when something is wrong.
    """
    from globular.status import cluster_status

    out = output(ctx)
    record = state.StateStore(globular_home()).get(name)
    report = run(cluster_status(record, globular_home()))

    def text() -> None:
        fields = ", ".join(f"{k} {v}" for k, v in report.columns.items())
        out.say(
            f"Cluster [bold]{escape(name)}[/]: {escape(report.status)}, provider {escape(report.provider)} ({escape(report.region)})"
            + (f", {fields}" if fields else "")
        )
        extra = list(dict.fromkeys(c for n in report.nodes for c in n.columns))
        table = out.table("node", "address", "state", "steps", *extra, "load", "up", "problem")
        for n in report.nodes:
            steps = " ".join(f"{k} {v:.1f}s" for k, v in n.steps.items())
            shown = n.state if not n.problem else f"[red]{n.state}[/]"
            load = "-" if n.load is None else str(n.load)
            columns = (n.columns.get(c, "-") for c in extra)
            table.add_row(n.name, n.address, shown, steps, *columns, load, age(n.uptime), escape(n.problem or ""))
        out.print(table)
        for problem in report.problems:
            out.problem(problem)
        balancer = report.data.get("balancer")
        if balancer and balancer["events"]:
            out.say("Balancer's last decisions:")
            for event in balancer["events"][-5:]:
                when = time.strftime("%H:%M:%S", time.localtime(event["time"]))
                nodes = f" {', '.join(event['nodes'])}" if event["nodes"] else ""
                kind = EVENT_WORDS.get(event["kind"], event["kind"])
                out.say(f"  {when} {escape(kind)}{escape(nodes)}: {escape(event['text'])}")

    out.result(report, ok=report.ok, text=text)
    ctx.exit(0 if report.ok else 1)


for _command in [addnode, removenode, loadbalance, runplugin, config_group, env, put, get, sshmaster, sshnode]:
    cli.add_command(_command)  # installed plugins' (ipcluster: shell, notebook, top, ...) load when one runs


every_command_takes_output_and_verbose(cli)


def main(argv: list[str] | None = None) -> None:
    """Entry point: runs the CLI and turns outcomes into exit codes."""
    raise_open_file_limit()
    ctx_obj: dict[str, Any] = {}

    def out() -> Output:  # the command's own renderer, else one in the form it asked for
        found = ctx_obj.get("out")
        return found if isinstance(found, Output) else Output(ctx_obj.get("output") or "auto")

    try:
        code = cli.main(args=argv, prog_name="globular", standalone_mode=False, obj=ctx_obj)
    except click.exceptions.Abort as exc:
        if isinstance(exc.__cause__, KeyboardInterrupt):  # click wraps Ctrl-C in Abort
            out().interrupted()
            sys.exit(130)
        out().err.print("Aborted.")
        sys.exit(1)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        out().interrupted()
        sys.exit(130)
    except GlobularError as exc:
        out().error(exc, exc.exit_code)
        sys.exit(exc.exit_code)
    except OSError as exc:  # globular's own files: a read-only or misplaced GLOBULAR_HOME, a full disk
        where = f"{exc.filename}: " if exc.filename else ""
        out().error(GlobularError(f"{where}{exc.strerror or exc}"), 1)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


def entry() -> None:
    """The console script: :func:`main`, then a quick exit.

    The command's work is done when :func:`main` returns; what the interpreter would still do
    is free what the command loaded (ipyparallel, IPython, zmq, pydantic: about 0.2 s on 2 slow
    cores).  So, with the output flushed and the ``atexit`` handlers run (logging's, IPython's,
    ``weakref.finalize``'s), the process ends at once.  A thread still running (none should)
    gets the usual exit, which waits for it.
    """
    try:
        main()
        code: int | str = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int | str) else 0
    if isinstance(code, str) or any(t is not threading.main_thread() and not t.daemon for t in threading.enumerate()):
        sys.exit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said
            pass
    os._exit(code)


if __name__ == "__main__":
    entry()
