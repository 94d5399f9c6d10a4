"""Per-node work, in parallel.

Like fabric's ``Group``: the work runs on every node at once; when some nodes
fail, the others still finish (so nothing is left half-done behind our back),
and the failure names each node that failed with its own error.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from globular.errors import NodeFailures
from globular.state import NodeRecord

T = TypeVar("T")


async def each_node(
    nodes: Sequence[NodeRecord],
    work: Callable[[NodeRecord], Awaitable[T]],
    *,
    on_done: Callable[[NodeRecord], None] | None = None,
) -> dict[str, T]:
    """Run ``work(node)`` for every node concurrently; results by node name.

    Raises :class:`NodeFailures` naming every node whose work raised.
    """

    async def one(node: NodeRecord) -> T:
        result = await work(node)
        if on_done is not None:
            on_done(node)
        return result

    outcomes = await asyncio.gather(*(one(node) for node in nodes), return_exceptions=True)
    failures: dict[str, BaseException] = {}
    results: dict[str, T] = {}
    for node, outcome in zip(nodes, outcomes):
        if isinstance(outcome, BaseException):
            if not isinstance(outcome, Exception):
                raise outcome  # cancellation, KeyboardInterrupt: not a node's failure
            failures[node.name] = outcome
        else:
            results[node.name] = outcome
    if failures:
        raise NodeFailures(failures, results)
    return results
