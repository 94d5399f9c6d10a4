"""What operations and plugins hand back to be shown: a plugin's report, a node's preflight
(and :func:`age`, :func:`size_text` and :func:`counted`, how a duration, a size and a count
read wherever they are shown).

Plain data, shared by the core, the plugins (:mod:`globular.plugins.base` re-exports them as
part of the plugin API) and the renderer, which imports nothing of the plugins.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


def counted(count: int, noun: str, plural: str = "") -> str:
    """``1 node``, ``2 nodes``: a count and its noun (``plural`` where it is not noun + s)."""
    return f"{count} {noun if count == 1 else plural or noun + 's'}"


@dataclass
class PluginReport:
    """What a hook wants the user to see, and data for programs."""

    plugin: str
    summary: list[tuple[str, str]] = field(default_factory=list)
    hints: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class NodeCheck:
    """A node's preflight: facts, and the problems that stop a start (warnings do not)."""

    node: str
    address: str
    python: str | None = None
    modules: dict[str, str | None] = field(default_factory=dict)  # name -> version (None: missing)
    cpus: int | None = None
    load: float | None = None
    engines: int = 0
    gpus: list[str] = field(default_factory=list)  # the UUIDs of the GPUs its engines get
    controller_reachable: bool | None = None
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def age(seconds: float) -> str:
    """``42s``, ``7m``, ``3h05m``: a duration as status shows it."""
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"


def size_text(n: float) -> str:
    """``512 B``, ``3.0 MB``, ``1.2 GB``: a size as the reports show it (powers of 1000)."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
