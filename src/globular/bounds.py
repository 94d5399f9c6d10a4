"""How many nodes a cluster may have, and how the balancer moves between them: the ``[cluster]``
keys ``min_nodes``, ``max_nodes``, ``polling_interval``, ``wait_time``,
``add_nodes_per_iteration``, ``kill_after`` and ``stabilization_time`` (StarCluster's
``loadbalance`` options), and the one check of a cluster's size against them and against what
its provider can place.

``max_nodes`` has one meaning everywhere: the most nodes the cluster may have (``start``,
``addnode`` and the balancer; ec2's own ``max_nodes`` is the same key).  ``min_nodes`` turns
the balancer on, and ``start`` without ``-s`` then brings ``min_nodes`` nodes.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator, Field

from globular.results import counted
from globular.spec import BalanceSpec, Settings, parse_duration

Duration = Annotated[float, BeforeValidator(parse_duration)]
BALANCE_KEYS = (
    "polling_interval", "wait_time", "add_nodes_per_iteration", "kill_after", "stabilization_time", "replace_before",
)  # fmt: skip


class BoundsSettings(Settings):
    """The ``[cluster]`` keys of this module (a part of ``ClusterSettings``)."""

    min_nodes: int | None = Field(
        default=None, ge=1, description="turns the balancer on (globular loadbalance): never fewer nodes than this"
    )
    max_nodes: int | None = Field(
        default=None,
        ge=1,
        description="the most nodes the cluster may have (start, addnode, the balancer); default: what the provider can place",
    )
    polling_interval: Duration = Field(
        default=5.0,
        gt=0,
        description="how often the balancer asks the controller",
        json_schema_extra={"unit": "duration", "reference_type": "duration"},
    )
    wait_time: Duration = Field(
        default=10.0,
        ge=0,
        description="how long tasks wait for an engine before the balancer adds nodes",
        json_schema_extra={"unit": "duration", "reference_type": "duration"},
    )
    add_nodes_per_iteration: int = Field(default=1, ge=1, description="the most nodes the balancer adds at a time")
    kill_after: Duration = Field(
        default=60.0,
        gt=0,
        description="how long every engine of a node idles before the balancer removes the node",
        json_schema_extra={"unit": "duration", "reference_type": "duration"},
    )
    stabilization_time: Duration = Field(
        default=30.0,
        ge=0,
        description="no node is removed this soon after the cluster last changed",
        json_schema_extra={"unit": "duration", "reference_type": "duration"},
    )
    replace_before: Duration = Field(
        default=300.0,
        ge=0,
        description="a node its provider ends this soon (a Slurm job's time limit) is replaced before, then drained",
        json_schema_extra={"unit": "duration", "reference_type": "duration"},
    )


class BoundsProblem(Exception):
    """``key`` (a ``[cluster]`` key) is wrong: ``message`` says why."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key, self.message = key, message


def cluster_bounds(
    keys: BoundsSettings, cluster_size: int | None, provider_limit: int | None, provider: str
) -> tuple[int | None, int | None, BalanceSpec | None]:
    """The cluster's size when it starts (None: the provider's default), its ``max_nodes`` and
    its balancer, from ``keys`` and ``cluster_size`` (the config's); ``provider_limit``: the
    most nodes the provider can place (None: it says when it runs out)."""
    given = {k: getattr(keys, k) for k in BALANCE_KEYS if k in keys.model_fields_set}
    if keys.min_nodes is None:
        if given:
            first = next(iter(given))
            raise BoundsProblem(first, "has no effect without min_nodes, which turns the balancer on")
        if keys.max_nodes is not None and provider_limit is not None and keys.max_nodes > provider_limit:
            raise BoundsProblem(
                "max_nodes", f"{keys.max_nodes}: the {provider} provider places at most {provider_limit}"
            )
        if keys.max_nodes is not None and cluster_size is not None and cluster_size > keys.max_nodes:
            raise BoundsProblem("cluster_size", f"{cluster_size} is more than max_nodes {keys.max_nodes}")
        return cluster_size, keys.max_nodes, None
    most = keys.max_nodes if keys.max_nodes is not None else provider_limit
    if most is None:
        raise BoundsProblem(
            "min_nodes", f"needs max_nodes with the {provider} provider, which sets no limit of its own"
        )
    if provider_limit is not None and most > provider_limit:
        raise BoundsProblem("max_nodes", f"{most}: the {provider} provider places at most {provider_limit}")
    if keys.min_nodes > most:
        where = "max_nodes" if keys.max_nodes is not None else f"the {provider} provider's {counted(most, 'node')}"
        raise BoundsProblem("min_nodes", f"{keys.min_nodes} is more than {where} ({most})")
    size = cluster_size if cluster_size is not None else keys.min_nodes
    if not keys.min_nodes <= size <= most:
        raise BoundsProblem("cluster_size", f"{size} is outside min_nodes..max_nodes ({keys.min_nodes}..{most})")
    balance = BalanceSpec(min_nodes=keys.min_nodes, max_nodes=most, **{k: getattr(keys, k) for k in BALANCE_KEYS})
    return size, most, balance


def balance_from_flags(
    spec: BalanceSpec, flags: dict[str, Any], cap: int | None, provider_limit: int | None, provider: str
) -> BalanceSpec:
    """``spec`` with ``loadbalance``'s flags (those given) instead, checked like the config's:
    ``cap`` is the cluster's ``max_nodes``, ``provider_limit`` what its provider can place."""
    values = {**spec.model_dump(), **{k: v for k, v in flags.items() if v is not None}}
    if cap is not None and values["max_nodes"] > cap:
        raise BoundsProblem("max_nodes", f"{values['max_nodes']}: the cluster may have at most {cap} nodes (max_nodes)")
    if provider_limit is not None and values["max_nodes"] > provider_limit:
        raise BoundsProblem(
            "max_nodes", f"{values['max_nodes']}: the {provider} provider places at most {provider_limit}"
        )
    if values["min_nodes"] > values["max_nodes"]:
        raise BoundsProblem("min_nodes", f"{values['min_nodes']} is more than max_nodes ({values['max_nodes']})")
    return BalanceSpec.model_validate(values)
