"""How the library tells its caller about progress, without rendering anything.

The CLI passes a reporter that draws rich progress bars; library users get
:class:`NullReporter` unless they pass their own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from globular.state import NodeRecord

NODE_STEPS = ("provision", "ssh", "setup", "env", "engines", "registered")


def step_label(node: NodeRecord, step: str) -> str:
    """How a step reads in a node's line: ``env cached`` when its environment was there already;
    a provider may name its steps in ``node.data["step_names"]`` (Slurm: ``ssh`` is ``running``)."""
    if step == "env" and node.data.get("env", {}).get("cached"):
        return "env cached"
    return str(node.data.get("step_names", {}).get(step, step))  # a provider's own name (Slurm: "running")


class Reporter(Protocol):
    def begin(self, key: str, description: str, total: int) -> None:
        """A step with ``total`` units of work starts."""

    def advance(self, key: str, amount: int = 1) -> None:
        """``amount`` more units of step ``key`` are done."""

    def set(self, key: str, completed: int) -> None:
        """``completed`` units of step ``key`` are done."""

    def end(self, key: str) -> None:
        """Step ``key`` is over."""

    def node_step(self, node: str, step: str, seconds: float) -> None:
        """``node`` reached ``step`` (provision, ssh, setup, env, engines, registered), ``seconds`` after the previous one."""

    def node_waiting(self, node: str, why: str, seconds: float) -> None:
        """``node`` has waited ``seconds`` for something outside globular (``PENDING (Priority)``: Slurm)."""


class NullReporter:
    def begin(self, key: str, description: str, total: int) -> None:
        pass

    def advance(self, key: str, amount: int = 1) -> None:
        pass

    def set(self, key: str, completed: int) -> None:
        pass

    def end(self, key: str) -> None:
        pass

    def node_step(self, node: str, step: str, seconds: float) -> None:
        pass

    def node_waiting(self, node: str, why: str, seconds: float) -> None:
        pass
