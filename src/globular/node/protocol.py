"""What every program that travels to the nodes shares: the request, the refusal, the verbs.

A verb is a function of one JSON request (a dict) returning a JSON-able answer; :func:`verb`
registers it under its name (``any_python``: its answer does not depend on the Python that runs
it, so the local provider may run it in globular's own process).  :class:`Refused` is a request
that cannot be carried out: exit status 3 (or ``refused`` from the helper), its message on stderr.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

Request = dict[str, Any]  # a verb's JSON request


Proc = dict[str, Any]  # {"pid": int, "start": int, ...}
F = TypeVar("F", bound=Callable[..., Any])


class Refused(Exception):
    """A request that cannot be carried out: exit status 3, the message on stderr."""


VERBS: dict[str, Callable[[Request], Any]] = {}  # every verb of the node programs, by name
ANY_PYTHON: set[str] = set()  # verbs whose answer does not depend on the Python that runs them


def verb(*, any_python: bool = False) -> Callable[[F], F]:
    """Register a verb under its function's name."""

    def register(func: F) -> F:
        VERBS[func.__name__] = func
        if any_python:
            ANY_PYTHON.add(func.__name__)
        return func

    return register
