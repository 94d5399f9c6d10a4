"""``globular loadbalance NAME``: the balancer in the foreground, each decision a line, until
Ctrl-C (or SIGTERM), which leaves the cluster as it is."""

from __future__ import annotations

import asyncio
import signal
import time
from typing import TYPE_CHECKING, Any

import click
from rich.markup import escape

from globular.cli.group import Later, run
from globular.cli.render import Output, output, output_option
from globular.errors import BadInput, ClusterNotFound
from globular.results import counted

if TYPE_CHECKING:
    from globular import operations, state
    from globular.balance import balancer, service
else:  # imported when the command runs
    state, balancer = Later("globular.state"), Later("globular.balance.balancer")
    operations, service = Later("globular.operations"), Later("globular.balance.service")


# a balancer's event kinds (globular.balance.balancer.Event) as its lines say them
EVENT_WORDS = {"add": "added", "remove": "removed", "keep": "kept", "watch": "watching", "busy": "waiting",
               "error": "problem", "stop": "stopped", "restart": "restarted"}  # fmt: skip


def _duration(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    """A flag's duration: ``90s``, ``5m``, ``1h``; a bare number is refused (StarCluster's flags
    mixed seconds and minutes: say which)."""
    if value is None:
        return None
    text = value.strip().lower()
    if text.replace(".", "", 1).isdigit():
        raise click.BadParameter(f"{value!r}: give a unit, such as {text}s or {text}m")
    from globular.spec import parse_duration

    try:
        seconds = float(parse_duration(text))
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    if seconds <= 0 and param.name in ("polling_interval", "kill_after"):
        raise click.BadParameter(f"{value!r}: must be more than 0")
    return seconds


@click.command(short_help="Grow and shrink a running cluster with its work.")
@click.option(
    "-m",
    "--max-nodes",
    "--max_nodes",
    "max_nodes",
    type=click.IntRange(min=1),
    help="The most nodes (default: the template's).",
)
@click.option(
    "-n",
    "--min-nodes",
    "--min_nodes",
    "min_nodes",
    type=click.IntRange(min=1),
    help="The fewest nodes (default: the template's).",
)
@click.option(
    "-i",
    "--polling_interval",
    "polling_interval",
    callback=_duration,
    metavar="DURATION",
    help="How often to ask the controller: 5s.",
)
@click.option(
    "-w",
    "--wait_time",
    "wait_time",
    callback=_duration,
    metavar="DURATION",
    help="How long tasks wait for an engine before nodes are added: 10s.",
)
@click.option(
    "-a",
    "--add_nodes_per_iteration",
    "add_nodes_per_iteration",
    type=click.IntRange(min=1),
    help="The most nodes added at a time: 1.",
)
@click.option(
    "-k",
    "--kill_after",
    "kill_after",
    callback=_duration,
    metavar="DURATION",
    help="How long every engine of a node idles before the node is removed: 60s.",
)
@click.option(
    "-s",
    "--stabilization_time",
    "stabilization_time",
    callback=_duration,
    metavar="DURATION",
    help="No node is removed this soon after the last change: 30s.",
)
@click.option(
    "--replace-before",
    "--replace_before",
    "replace_before",
    callback=_duration,
    metavar="DURATION",
    help="A node its provider ends this soon (a Slurm job's time limit) is replaced first: 5m.",
)
@click.option("--detach", is_flag=True, help="Run it in the background (log: ~/.globular/logs/NAME.balancer.log).")
@click.option("--stop", is_flag=True, help="Stop the balancer running in the background.")
@click.argument("name")
@output_option
@click.pass_context
def loadbalance(
    ctx: click.Context,
    name: str,
    max_nodes: int | None,
    min_nodes: int | None,
    polling_interval: float | None,
    wait_time: float | None,
    add_nodes_per_iteration: int | None,
    kill_after: float | None,
    stabilization_time: float | None,
    replace_before: float | None,
    detach: bool,
    stop: bool,
) -> None:
    """Balance running cluster NAME: add nodes when tasks wait for an engine, remove nodes
    whose every engine has idled, between min_nodes and max_nodes.

    The bounds and the pace come from the cluster's template ([cluster] min_nodes, max_nodes,
    polling_interval, wait_time, add_nodes_per_iteration, kill_after, stabilization_time); the
    flags, StarCluster's, override them.  A node leaves only once nothing of the user's runs
    there or can be sent there.  Each decision is printed with its reason and written to
    ~/.globular/logs/NAME.log.  Ctrl-C stops the balancer and leaves the cluster as it is.

    With --detach it runs in the background, in a session of its own on this machine (it
    survives the terminal; `start` does this when the template sets min_nodes); --stop, or
    `terminate`, stops it.  One balancer a cluster: a second is refused.

    \b
    globular loadbalance mycluster
    globular loadbalance -n 1 -m 8 -k 2m mycluster
    globular loadbalance --detach mycluster
    globular loadbalance --stop mycluster
    """
    flags = {"max_nodes": max_nodes, "min_nodes": min_nodes, "polling_interval": polling_interval,
             "wait_time": wait_time, "add_nodes_per_iteration": add_nodes_per_iteration, "kill_after": kill_after,
             "stabilization_time": stabilization_time, "replace_before": replace_before}  # fmt: skip
    out = output(ctx)
    if stop:
        if detach or any(v is not None for v in flags.values()):
            raise BadInput("--stop takes no other option")
        _stop(out, name)
        return
    chosen = service.chosen_bounds(state.StateStore(_home()).get(name), flags)
    if detach:
        detached = service.detach(name, chosen, _home())
        _say_detached(out, name, detached)
        return
    events: list[dict[str, Any]] = []

    def shown(event: balancer.Event) -> None:
        events.append({"time": event.time, "kind": event.kind, "text": event.text, "nodes": list(event.nodes),
                       "size": event.size})  # fmt: skip
        _print(out, name, event)

    runner = balancer.Balancer(name, balancer.bounds_of(chosen), home=_home(), on_event=shown)
    run(_until_interrupted(runner))
    try:
        size: int | None = len(state.StateStore(_home()).get(name).desired)
    except ClusterNotFound:
        size = None

    def text() -> None:
        if size is None:
            out.say(f"Balancer stopped; cluster [bold]{escape(name)}[/] is gone")
        else:
            out.say(f"Balancer stopped; cluster [bold]{escape(name)}[/] left as it is: {counted(size, 'node')}")

    out.result({"name": name, "nodes": size, "events": events}, text=text)


async def _until_interrupted(runner: balancer.Balancer) -> None:
    """Run the balancer; the first Ctrl-C (or SIGTERM) stops it after its current step, a second
    interrupts that step (an addnode being made is undone, as addnode's own is)."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None

    def first() -> None:
        runner.stop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, first)
    try:
        await runner.run()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def _home() -> Any:
    from globular.paths import globular_home

    return globular_home()


def _print(out: Output, name: str, event: balancer.Event) -> None:
    stamp = time.strftime("%H:%M:%S", time.localtime(event.time))
    nodes = f" {', '.join(event.nodes)}" if event.nodes else ""
    verb = EVENT_WORDS.get(event.kind, event.kind)
    size = f" -> {counted(event.size, 'node')}" if event.kind in ("add", "remove") else ""
    out.say(f"{stamp} {verb}{escape(nodes)}{size}: {escape(event.text)}")


def _stop(out: Output, name: str) -> None:
    record = state.StateStore(_home()).get(name)
    pid = record.balancer.pid if record.balancer is not None else None
    stopped = run(operations.stop_balancer(record))
    text = (
        f"Stopped the balancer of [bold]{escape(name)}[/] (pid {pid})"
        if stopped
        else f"No balancer runs for [bold]{escape(name)}[/]"
    )
    out.result({"name": name, "stopped": stopped, "pid": pid if stopped else None}, text=lambda: out.say(text))


def _say_detached(out: Output, name: str, detached: service.Detached) -> None:
    def text() -> None:
        out.say(
            f"Balancer of [bold]{escape(name)}[/] running in the background (pid {detached.pid}); "
            f"its output: {escape(detached.log)}; `globular loadbalance --stop {escape(name)}` stops it"
        )

    out.result({"name": name, "pid": detached.pid, "log": detached.log}, text=text)
