"""Clusters whose record is lost or broken: found again through their provider (``discover``,
``adopt``: ec2 tags, Slurm jobs), or forced away whatever fails (``force_terminate``: a way out
of any state)."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from globular.cluster import ClusterContext, node_order
from globular.errors import ClusterNotFound, GlobularError
from globular.logs import cluster_log
from globular.operations import TerminateResult, home_store_reporter, stop_balancer, terminate
from globular.plugins.base import Plugin
from globular.providers.base import NodeProvider
from globular.registry import make_provider, provider_class, resolve_plugin
from globular.reporting import Reporter
from globular.spec import ClusterSpec
from globular.state import ClusterRecord, NodeRecord, check_cluster_name

log = logging.getLogger(__name__)


async def force_terminate(name: str, *, home: Path | None = None, reporter: Reporter | None = None) -> TerminateResult:
    """A way out of any state: terminate cluster ``name`` whatever fails on the way.

    With a readable record this is :func:`terminate`, and when that fails, every
    node is still swept for the cluster's marked processes and released where it
    can be.  With an unreadable record, this machine is swept for every process
    marked with the cluster (see :func:`~globular.providers.base.process_mark`) and
    its local files are removed; what could not be done (nodes on other machines
    the record no longer names reliably) is said in the warnings.  The record goes.
    """
    from globular.errors import StateError
    from globular.node.proc import sweep
    from globular.providers.base import process_mark

    home, store, reporter = home_store_reporter(home, reporter)
    started = time.monotonic()
    check_cluster_name(name)
    try:
        return await terminate(name, discard=True, home=home, reporter=reporter)
    except ClusterNotFound:
        raise
    except (GlobularError, OSError) as exc:
        first = exc
    warnings = [f"terminate failed ({first}); forcing"]
    nodes = stopped = 0
    with store.operation(name), cluster_log(home, name):
        try:
            record: ClusterRecord | None = store.get(name)
        except StateError:
            record = None
        if record is not None:
            try:
                await stop_balancer(record)
            except (GlobularError, OSError) as exc:
                warnings.append(f"its balancer could not be stopped ({exc})")
            ctx = ClusterContext(record, home=home, store=store, reporter=reporter)
            nodes = len(record.nodes)
            try:
                for node in list(record.nodes):
                    try:
                        await ctx.release([node], [])
                    except (GlobularError, OSError) as exc:
                        warnings.append(f"{node.name}: could not be released ({exc})")
                try:
                    await ctx.provider.release_cluster()
                except (GlobularError, OSError) as exc:
                    warnings.append(f"the provider's cluster resources remain ({exc})")
                stopped = ctx.stopped.stopped + ctx.stopped.killed
            finally:
                await ctx.close()
        else:
            mark = process_mark(home, name)
            swept = sweep({"mark": mark, "timeout": 5})
            stopped = swept["stopped"] + swept["killed"]
            hosts = _hosts_named(store.dir / f"{name}.json")
            if hosts:
                warnings.append(
                    f"the record is unreadable: on {', '.join(hosts)} (named in it) stop the processes whose "
                    f"environment holds GLOBULAR_MARK={mark}/..., and remove their node folders"
                )
        _forget(home, name, record)
        store.delete(name)
    return TerminateResult(name, nodes, stopped, 0, time.monotonic() - started, warnings)


def _hosts_named(path: Path) -> list[str]:
    """The hosts an unreadable record names (its nodes' logins), when it is JSON at all (a record
    of another version, say; a torn one names none)."""
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return []
    nodes = data.get("nodes") if isinstance(data, dict) else None
    logins = {n.get("login") for n in nodes if isinstance(n, dict)} if isinstance(nodes, list) else set()
    return sorted(login for login in logins if isinstance(login, str))


def _forget(home: Path, name: str, record: ClusterRecord | None) -> None:
    """What the cluster's provider and plugins keep on this machine, removed (every installed
    one's, when the record cannot say which)."""
    from globular.registry import RegistryError, plugin_classes, provider_names

    if record is not None:
        owners: list[type[NodeProvider] | type[Plugin]] = [provider_class(record.spec.provider)]
        owners += [resolve_plugin(p.setup_class)[1] for p in record.spec.plugins]
    else:
        owners = [*plugin_classes()]
        for provider in provider_names():
            try:
                owners.append(provider_class(provider))
            except RegistryError as exc:
                log.info("provider %s not asked to forget %s: %s", provider, name, exc)
    for owner in owners:
        owner.forget(home, name)


@dataclass
class FoundCluster:
    """A cluster a provider's account holds that this machine has no record of."""

    name: str
    spec: ClusterSpec
    region: str
    nodes: list[NodeRecord]


async def discover(specs: list[ClusterSpec], *, home: Path | None = None) -> list[FoundCluster]:
    """Clusters started elsewhere (ec2: found by their tags; slurm: by their jobs) in the accounts ``specs`` use.

    Each account (provider, region, credentials) is asked once; clusters this
    machine has a record of are left out.
    """
    home, store, _ = home_store_reporter(home, None)
    known = {r.name for r in store.list()[0]}
    asked: set[tuple[str, str, object]] = set()
    found: dict[str, FoundCluster] = {}
    for spec in specs:
        provider = make_provider(spec, cluster="", home=home)
        owner = provider.account()
        account = (spec.provider, provider.region, owner)
        if owner is None or account in asked:
            continue
        asked.add(account)
        try:
            for name, nodes in (await provider.discover()).items():
                if name not in known and name not in found:
                    found[name] = FoundCluster(name, spec, provider.region, sorted(nodes, key=node_order))
        finally:
            await provider.close()
    return sorted(found.values(), key=lambda f: f.name)


def adopt(found: FoundCluster, *, home: Path | None = None) -> ClusterRecord:
    """Record a cluster found elsewhere so that ``terminate`` (and ``listclusters``) can act on it."""
    _, store, _ = home_store_reporter(home, None)
    record = ClusterRecord(
        name=found.name,
        region=found.region,
        spec=found.spec,
        nodes=found.nodes,
        desired=[n.name for n in found.nodes],
        status="running",
        error="adopted: started elsewhere (or its record was lost), found by its provider (ec2 tags, Slurm jobs)",
    )
    store.create(record)
    return record
