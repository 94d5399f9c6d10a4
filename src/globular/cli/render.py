"""The one renderer: what the library returns, shown to a person or a program.

Three forms, one per :class:`Output`: rich tables and progress bars on a terminal;
plain full-width text when stdout is not a terminal (``globular listclusters | cat``
keeps whole values; progress is one line per finished step, on stderr); and with
``--output json`` one JSON document on stdout, in a versioned envelope::

    {"globular": 1, "command": "status", "ok": true, "result": {...}}
    {"globular": 1, "command": "start", "ok": false, "error": {"type": "StartFailed", "message": "...", "exit_code": 1}}

Warnings go to stderr in every form; identical ones from many nodes are shown once,
with the nodes named together.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, TypeVar

import click
from rich.console import Console
from rich.markup import escape

if TYPE_CHECKING:
    from rich.table import Table

from globular.reporting import NODE_STEPS
from globular.results import NodeCheck, PluginReport

ENVELOPE_VERSION = 1
PLAIN_WIDTH = 100_000  # piped output is never cut


def to_data(value: Any) -> Any:
    """``value`` as JSON-ready data (``to_dict()`` where a result has one)."""
    if hasattr(value, "to_dict"):
        return to_data(value.to_dict())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_data(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if hasattr(value, "model_dump") and hasattr(type(value), "model_fields"):  # a pydantic model
        return value.model_dump(mode="json")
    if isinstance(value, dict):
        return {str(k): to_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [to_data(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def group_warnings(pairs: Iterable[tuple[str, str]]) -> list[str]:
    """``(node, warning)`` pairs -> one line per distinct warning, naming its nodes."""
    nodes: dict[str, list[str]] = {}
    for node, warning in pairs:
        nodes.setdefault(warning, []).append(node)
    lines = []
    for warning, names in nodes.items():
        who = ", ".join(names) if len(names) <= 4 else f"{', '.join(names[:3])} and {len(names) - 3} more nodes"
        lines.append(f"{who}: {warning}")
    return lines


class RichReporter:
    """The library's progress steps as rich progress bars (a terminal)."""

    def __init__(self, target: Console):
        # here: only a terminal's progress loads rich's progress bars
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=target,
        )
        self.tasks: dict[str, Any] = {}
        self.node_steps: dict[str, dict[str, float]] = {}

    def __enter__(self) -> RichReporter:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
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

    def node_step(self, node: str, step: str, seconds: float) -> None:
        """One line per node: the steps it reached, with the time each took."""
        done = self.node_steps.setdefault(node, {})
        done[step] = seconds
        text = "  ".join(f"{name} {took:.1f}s" for name, took in done.items())
        key = f"node:{node}"
        total = len(NODE_STEPS)
        if key not in self.tasks:
            self.tasks[key] = self.progress.add_task("", total=total)
        self.progress.update(
            self.tasks[key],
            description=f"[dim]{node:<9}[/] {text}",
            completed=total if step == "registered" else min(len(done), total - 1),
        )

    def node_waiting(self, node: str, why: str, seconds: float) -> None:
        """The node's line says what it waits for, live: ``node002  PENDING (Priority) 12s``."""
        key = f"node:{node}"
        if key not in self.tasks:
            self.tasks[key] = self.progress.add_task("", total=len(NODE_STEPS))
        self.progress.update(self.tasks[key], description=f"[dim]{node:<9}[/] {why} {seconds:.0f}s")


class LineReporter:
    """Progress as one line per finished step (not a terminal: a log, a pipe, CI)."""

    def __init__(self, target: TextIO):
        self.target = target
        self.steps: dict[str, tuple[str, int, int, float]] = {}  # key -> description, done, total, started
        self.node_steps: dict[str, dict[str, float]] = {}
        self.waiting: dict[str, tuple[str, float]] = {}  # node -> what it waits for, since when (s)

    def __enter__(self) -> LineReporter:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def begin(self, key: str, description: str, total: int) -> None:
        self.steps[key] = (description, 0, total, time.monotonic())

    def advance(self, key: str, amount: int = 1) -> None:
        if key in self.steps:
            description, done, total, started = self.steps[key]
            self.steps[key] = (description, done + amount, total, started)

    def set(self, key: str, completed: int) -> None:
        if key in self.steps:
            description, _, total, started = self.steps[key]
            self.steps[key] = (description, completed, total, started)

    def end(self, key: str) -> None:
        if key not in self.steps:
            return
        description, _, total, started = self.steps.pop(key)
        print(f"{description}: {total}/{total} in {time.monotonic() - started:.1f}s", file=self.target, flush=True)

    def node_step(self, node: str, step: str, seconds: float) -> None:
        """A node's line once it is done (registered): each step it went through, and how long it took."""
        done = self.node_steps.setdefault(node, {})
        done[step] = seconds
        if step == "registered":
            text = "  ".join(f"{name} {took:.1f}s" for name, took in done.items())
            print(f"{node:<9} {text}", file=self.target, flush=True)

    def node_waiting(self, node: str, why: str, seconds: float) -> None:
        """A line when what the node waits for changes, and every 30 s while it waits."""
        last = self.waiting.get(node)
        if last is None or last[0] != why or seconds - last[1] >= 30:
            self.waiting[node] = (why, seconds)
            print(f"{node:<9} {why} {seconds:.0f}s", file=self.target, flush=True)


class Output:
    """Where a command's results, warnings and errors go (see the module's doc)."""

    def __init__(self, form: str = "auto", command: str = "globular"):
        self.command = command
        self.json = form == "json"
        self.plain = form == "plain" or (not self.json and not sys.stdout.isatty())
        width = PLAIN_WIDTH if self.plain or self.json else None
        self.console = Console(highlight=False, soft_wrap=True, width=width, no_color=self.plain)
        err_plain = not sys.stderr.isatty()
        self.err = Console(stderr=True, highlight=False, soft_wrap=True, width=PLAIN_WIDTH if err_plain else None)
        self.err_plain = err_plain

    # -- progress and messages ---------------------------------------------

    def reporter(self) -> RichReporter | LineReporter:
        """Progress for a long operation: bars on a terminal, else lines on stderr."""
        if self.json or self.plain:
            return LineReporter(sys.stderr) if self.err_plain or self.json else RichReporter(self.err)
        return RichReporter(self.console)

    def say(self, text: str) -> None:
        """A line for people (not in JSON output)."""
        if not self.json:
            self.console.print(text)

    def warn(self, message: str) -> None:
        self.err.print(f"[yellow]warning:[/] {escape(message)}")

    def problem(self, message: str) -> None:
        self.err.print(f"[red]problem:[/] {escape(message)}")

    def warnings(self, checks: list[NodeCheck]) -> None:
        for line in group_warnings((c.node, w) for c in checks for w in c.warnings):
            self.warn(line)

    def error(self, exc: BaseException, exit_code: int) -> None:
        if self.json:
            error = {"type": type(exc).__name__, "message": str(exc), "exit_code": exit_code}
            self._envelope({"ok": False, "error": error})
        else:
            self.err.print(f"[red]error:[/] {escape(str(exc))}")

    def interrupted(self) -> None:
        if self.json:
            self._envelope({"ok": False, "error": {"type": "Interrupted", "message": "interrupted", "exit_code": 130}})
        else:
            self.err.print("Interrupted.")

    # -- results ---------------------------------------------------------------

    def result(self, data: Any, *, ok: bool = True, text: Callable[[], None] | None = None) -> None:
        """A command's result: JSON (``data``), or ``text()`` for people."""
        if self.json:
            self._envelope({"ok": ok, "result": to_data(data)})
        elif text is not None:
            text()

    def _envelope(self, body: dict[str, Any]) -> None:
        document = {"globular": ENVELOPE_VERSION, "command": self.command, **body}
        sys.stdout.write(json.dumps(document, indent=2) + "\n")
        sys.stdout.flush()

    def table(self, *columns: str) -> Table:
        from rich import box
        from rich.table import Table

        if self.plain:
            return Table(*columns, box=None, show_edge=False, header_style="")
        return Table(*columns, box=box.HEAVY_HEAD)

    def print(self, renderable: Any) -> None:
        self.console.print(renderable)

    def report(self, report: PluginReport) -> None:
        """A plugin's report: its summary, warnings and hints."""
        if report.summary:
            self.grid(report.summary)
        for warning in report.warnings:
            self.warn(warning)
        if report.hints:
            self.console.print("\nConnect with:")
            for line in report.hints:
                self.console.print(f"  {line}", markup=False)

    def grid(self, rows: list[tuple[str, str]]) -> None:
        from rich.table import Table

        grid = Table.grid(padding=(0, 2))
        for label, value in rows:
            grid.add_row(f"[bold]{escape(label)}[/]", escape(value))
        self.console.print(grid)


F = TypeVar("F", bound=Callable[..., Any])
OUTPUT_FORMS = ("auto", "plain", "json")


def _set_output(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value is not None:
        ctx.ensure_object(dict)["output"] = value


def output_option(command: F) -> F:
    """``--output``, accepted by every command (and by ``globular`` itself)."""
    return click.option(
        "--output",
        type=click.Choice(OUTPUT_FORMS),
        expose_value=False,
        is_eager=True,
        callback=_set_output,
        help="auto: tables on a terminal, plain full-width text when piped; json: one JSON document.",
    )(command)


def output(ctx: click.Context) -> Output:
    """The renderer for this command (made once, kept on the context)."""
    root = ctx.find_root()
    obj = root.ensure_object(dict)
    if "out" not in obj:
        obj["out"] = Output(obj.get("output") or "auto", command=ctx.info_name or "globular")
    out: Output = obj["out"]
    return out
