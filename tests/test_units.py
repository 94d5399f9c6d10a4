"""Fast tests of pure logic: no processes, no network; an in-memory provider where a cluster is needed.

Each runs in milliseconds; the real-process tests beside them exercise the same code for real.
"""

from __future__ import annotations

import ast
import asyncio
import io
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from globular.cluster import ClusterContext, node_names
from globular.errors import GlobularError, NodeFailures, PluginFailed
from globular.ipcluster.preflight import Requirement, judge
from globular.ipcluster.settings import IPClusterSettings, engines_for, port_range
from globular.plugins.base import NodeCheck, Plugin, PluginContext
from globular.providers.base import CommandResult, NodeProvider, Runner, StopResult
from globular.providers.local import LocalProvider
from globular.reporting import NullReporter
from globular.spec import ClusterSpec, parse_duration
from globular.state import ClusterRecord, NodeRecord, ProcessRecord, StateStore

SRC = Path(__file__).resolve().parent.parent / "src" / "globular"


# -- an in-memory provider -------------------------------------------------------


class MemoryRunner(Runner):
    async def run(
        self, argv: list[str], *, input: bytes | None = None, timeout: float | None = 60.0, check: bool = True
    ) -> CommandResult:
        return CommandResult(0, "", "")

    async def write_file(self, path: str, data: bytes, mode: int = 0o600) -> None:
        pass

    async def stop(self, procs: list[ProcessRecord], timeout: float = 10.0) -> StopResult:
        self.stopped = [p.pid for p in procs]
        return StopResult(len(procs), 0, [])


class MemoryProvider(NodeProvider):
    """Nodes that are records only; what it made and released is kept for the test."""

    name = "memory"

    def __init__(self, spec: ClusterSpec, *, cluster: str, home: Path):
        super().__init__(spec, cluster=cluster, home=home)
        self.made: list[str] = []
        self.released: list[str] = []
        self.fail_release = False

    @property
    def region(self) -> str:
        return "memory"

    async def create_nodes(
        self,
        names: list[str],
        on_ready: Callable[[NodeRecord], None],
        *,
        existing: Sequence[NodeRecord] = (),
        hosts: list[str] | None = None,
    ) -> list[NodeRecord]:
        nodes = []
        for i, name in enumerate(names, start=len(existing)):
            node = NodeRecord(name=name, address=f"198.18.0.{10 + i}", workdir=f"/n/{name}", cores=2, python="python3")
            self.made.append(name)
            nodes.append(node)
            on_ready(node)
        return nodes

    async def terminate_nodes(self, nodes: list[NodeRecord]) -> None:
        if self.fail_release:
            raise GlobularError("the provider cannot release them")
        self.released += [n.name for n in nodes]

    def make_runner(self, node: NodeRecord) -> Runner:
        return MemoryRunner(node)


def memory_cluster(tmp_path: Path, desired: list[str]) -> ClusterContext:
    spec = ClusterSpec(template="t", cluster_size=len(desired), provider="local")
    record = ClusterRecord(name="mem", region="memory", spec=spec, desired=desired)
    store = StateStore(tmp_path)
    store.create(record)
    ctx = ClusterContext(record, home=tmp_path, store=store, reporter=NullReporter())
    ctx.provider = MemoryProvider(spec, cluster="mem", home=tmp_path)
    return ctx


class Recorder(Plugin):
    """Notes every hook it sees; fails in ``on_remove_node`` when told to."""

    def __init__(self, name: str = "rec", fail_remove: bool = False):
        super().__init__(name, Plugin.Settings())
        self.seen: list[str] = []
        self.fail_remove = fail_remove

    async def on_add_node(self, ctx: PluginContext, node: NodeRecord) -> None:
        self.seen.append(f"add {node.name}")

    async def on_remove_node(self, ctx: PluginContext, node: NodeRecord) -> None:
        self.seen.append(f"remove {node.name}")
        if self.fail_remove:
            raise GlobularError("cannot unmount scratch")


# -- naming and the node set ----------------------------------------------------------


def test_fanned_out_work_keeps_the_successes_beside_the_failures():
    from globular.fanout import each_node

    nodes = [NodeRecord(name=n, address="198.18.0.9", workdir="/w", cores=1, python="p") for n in ("a", "b", "c")]

    async def work(node: NodeRecord) -> str:
        if node.name == "b":
            raise GlobularError("disk full")
        return node.name.upper()

    with pytest.raises(NodeFailures) as failed:
        asyncio.run(each_node(nodes, work))
    assert str(failed.value) == "b: disk full" and failed.value.succeeded == {"a": "A", "c": "C"}


def test_node_names_start_with_the_master_and_fill_gaps():
    assert node_names(3) == ["master", "node001", "node002"]
    assert node_names(2, ["master", "node002"]) == ["node001", "node003"]
    assert node_names(0) == []


def test_reconcile_makes_the_desired_nodes_then_releases_the_ones_no_longer_desired(tmp_path):
    ctx = memory_cluster(tmp_path, node_names(3))
    plugin = Recorder()
    added, checks, _ = asyncio.run(ctx.reconcile([plugin]))
    assert [n.name for n in added] == ["master", "node001", "node002"] and checks == []
    assert plugin.seen == []  # a start joins nothing: the plugins' run hook follows
    ctx.record.desired = ["master", "node002"]
    asyncio.run(ctx.reconcile([plugin], join=True))
    assert [n.name for n in ctx.nodes] == ["master", "node002"]
    assert plugin.seen == ["remove node001"] and ctx.provider.released == ["node001"]
    saved = StateStore(tmp_path).get("mem")
    assert saved.desired == ["master", "node002"] and [n.name for n in saved.nodes] == ["master", "node002"]


def test_nodes_that_become_ready_together_are_saved_together(tmp_path, monkeypatch):
    """Saving is O(changes) per step: the 16 nodes one provider call makes cost one save, not 16."""
    ctx = memory_cluster(tmp_path, node_names(16))
    saves = []
    monkeypatch.setattr(ctx.store, "save", lambda record: saves.append(len(record.nodes)))
    asyncio.run(ctx.reconcile([]))
    assert len(ctx.nodes) == 16 and saves == [16]


def test_reconcile_with_join_runs_on_add_node_and_undoes_a_failed_join(tmp_path):
    ctx = memory_cluster(tmp_path, ["master"])
    asyncio.run(ctx.reconcile([]))
    plugin = Recorder()
    ctx.record.desired += ["node001"]
    added, _, _ = asyncio.run(ctx.reconcile([plugin], join=True))
    assert [n.name for n in added] == ["node001"] and plugin.seen == ["add node001"]

    class Refuses(Recorder):
        async def on_add_node(self, ctx: PluginContext, node: NodeRecord) -> None:
            raise GlobularError("no scratch disk")

    ctx.record.desired += ["node002"]
    with pytest.raises(NodeFailures, match="node002: plugin 'rec' failed in on_add_node: no scratch disk"):
        asyncio.run(ctx.reconcile([Refuses()], join=True))
    assert ctx.record.desired == ["master", "node001"] and [n.name for n in ctx.nodes] == ["master", "node001"]
    assert ctx.provider.released == ["node002"]


def test_release_runs_every_step_and_raises_the_first_failure(tmp_path):
    ctx = memory_cluster(tmp_path, ["master", "node001"])
    asyncio.run(ctx.reconcile([]))
    node = ctx.record.node("node001")
    node.processes.append(ProcessRecord(pid=4242, start=1, role="worker"))
    first, second = Recorder("first", fail_remove=True), Recorder("second", fail_remove=True)
    ctx.provider.fail_release = True
    with pytest.raises(PluginFailed) as failure:
        asyncio.run(ctx.release([node], [first, second]))
    assert failure.value.plugin == "second"  # reverse order: the last plugin is asked first
    assert first.seen == second.seen == ["remove node001"]  # both hooks ran despite the failures
    assert node.processes == []  # stopped (by pid) although the hooks failed
    assert "node001" in [n.name for n in ctx.nodes]  # not released: it stays for a later reconcile


def test_local_nodes_added_later_share_the_cores_of_the_cluster_they_join(tmp_path, monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 12)
    spec = ClusterSpec(template="t", cluster_size=2, provider="local")
    provider = LocalProvider(spec, cluster="cores", home=tmp_path)
    first = asyncio.run(provider.create_nodes(["master", "node001"], lambda node: None))
    later = asyncio.run(provider.create_nodes(["node002"], lambda node: None, existing=first))
    assert [n.cores for n in first] == [6, 6] and [n.cores for n in later] == [4]  # 12 cores / 3 nodes


# -- ipcluster's settings and preflight ------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"), [("30m", 1800), ("2h", 7200), ("1h30m", 5400), ("90s", 90), ("5", 300), (12, 12)]
)
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "1d", "m"])
def test_bad_durations(text):
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


def test_controller_ports_are_parsed_once_into_the_allowed_ports():
    settings = IPClusterSettings.model_validate({"controller_ports": "10000-10029"})
    assert settings.allowed_ports == list(range(10000, 10030)) == list(port_range("10000-10029"))
    assert IPClusterSettings().allowed_ports is None
    for bad, why in [("10000-10005", "at least 20"), ("80-200", "1024-65535"), ("lots", "FIRST-LAST")]:
        with pytest.raises(ValueError, match=why):
            IPClusterSettings.model_validate({"controller_ports": bad})


def test_the_master_keeps_a_core_for_the_controller():
    master = NodeRecord(name="master", address="198.18.0.2", workdir="/w", cores=4, python="p")
    node = NodeRecord(name="node001", address="198.18.0.3", workdir="/w", cores=4, python="p")
    assert engines_for(master, IPClusterSettings()) == 3 and engines_for(node, IPClusterSettings()) == 4
    assert engines_for(master, IPClusterSettings(master_engines=0)) == 0


def facts(**changes: object) -> dict[str, object]:
    here = ".".join(map(str, sys.version_info[:3]))
    base = {"python": here, "executable": "/usr/bin/python3", "cpus": 4, "load": [0.5, 0, 0], "modules": {}}
    return {**base, **changes}


def test_judge_fails_another_python_and_a_missing_module_and_warns_about_a_busy_node():
    check = NodeCheck("node001", "198.18.0.3", engines=4)
    judge(check, facts(python="3.9.2", modules={"msgpack": {"error": "not installed"}}),
          [Requirement("msgpack", need="packer = msgpack")])  # fmt: skip
    assert len(check.problems) == 2 and not check.ok
    assert "Python 3.9.2" in check.problems[0] and "packer = msgpack needs the msgpack package" in check.problems[1]
    busy = NodeCheck("node002", "198.18.0.4", engines=2)
    judge(busy, facts(load=[9.0, 0, 0]), [])
    assert busy.ok and busy.warnings == ["the node is busy (its load is at least its 4 cores): engines will share it"]


def test_judge_compares_major_versions_only_for_problems():
    from importlib.metadata import version

    ours = version("ipyparallel")
    check = NodeCheck("n", "198.18.0.5")
    judge(check, facts(modules={"ipyparallel": {"version": "1.0.0"}}), [Requirement("ipyparallel", compare=True)])
    assert check.problems == [f"ipyparallel 1.0.0 there, {ours} here: major versions differ (install {ours} there)"]


# -- the renderer ----------------------------------------------------------------------------


def test_identical_warnings_from_many_nodes_are_shown_once():
    from globular.cli.render import group_warnings

    pairs = [(f"node{i:03d}", "the node is busy") for i in range(1, 48)] + [("master", "Python 3.11.2 there")]
    lines = group_warnings(pairs)
    assert lines == ["node001, node002, node003 and 44 more nodes: the node is busy", "master: Python 3.11.2 there"]


def test_json_output_is_one_versioned_envelope(monkeypatch):
    from globular.cli.render import Output

    buffer = io.StringIO()
    monkeypatch.setattr(sys, "stdout", buffer)
    out = Output("json", command="status")
    out.result({"nodes": [NodeCheck("m", "198.18.0.2")], "path": Path("/x")}, ok=False)
    document = json.loads(buffer.getvalue())
    assert document["globular"] == 1 and document["command"] == "status" and document["ok"] is False
    assert document["result"]["path"] == "/x" and document["result"]["nodes"][0]["ok"] is True
    buffer.truncate(0)
    buffer.seek(0)
    out.error(GlobularError("no cluster named 'x'"), 1)
    assert json.loads(buffer.getvalue())["error"] == {
        "type": "GlobularError",
        "message": "no cluster named 'x'",
        "exit_code": 1,
    }


def test_piped_tables_are_never_cut(monkeypatch):
    from globular.cli.render import Output

    buffer = io.StringIO()
    monkeypatch.setattr(sys, "stdout", buffer)
    out = Output("plain")
    out.console.file = buffer
    table = out.table("name", "health")
    long = "degraded: " + ", ".join(f"{i} of 9 ipengine dead" for i in range(12))
    table.add_row("a-cluster-with-a-long-name", long)
    out.print(table)
    assert "a-cluster-with-a-long-name" in buffer.getvalue() and long in buffer.getvalue()


# -- the house -----------------------------------------------------------------------------------


def imports_of(path: Path) -> set[str]:
    """Every globular module ``path`` imports, wherever the import is (TYPE_CHECKING and functions too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("globular"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if module_path(sub) else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("globular")}
    return found


def module_path(name: str) -> Path | None:
    base = SRC.parent.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def module_graph() -> dict[str, set[str]]:
    graph = {}
    for path in SRC.rglob("*.py"):
        name = ".".join(path.relative_to(SRC.parent).with_suffix("").parts).removesuffix(".__init__")
        graph[name] = imports_of(path) - {name}
    return graph


def test_no_module_imports_itself_through_others():
    graph = module_graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(name: str) -> None:
        state[name] = 1
        stack.append(name)
        for dep in sorted(graph.get(name, ())):
            if state.get(dep) == 1:
                cycles.append([*stack[stack.index(dep) :], dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)
    assert cycles == []


def entry_point_modules(group: str) -> set[str]:
    """The modules pyproject.toml's ``group`` entry points name."""
    import tomllib

    project = tomllib.loads((SRC.parents[1] / "pyproject.toml").read_text())["project"]
    return {value.partition(":")[0] for value in project["entry-points"][group].values()}


ROOMS = (  # the folders and top-level modules of src/globular, lowest first: each imports only those before it
    "errors", "paths", "results", "aio", "limits", "logs", "node", "spec", "bounds", "state", "fanout", "reporting",
    "providers", "plugins", "wheelhouse", "environment", "registry", "config", "reference", "cluster", "transfer",
    "operations", "salvage", "status", "balance", "client", "ipcluster", "api", "cli", "__main__",
)  # fmt: skip
PLUGIN_API = ("errors", "providers", "reporting", "results", "spec", "state", "plugins")


def room_of(module: str) -> str:
    """A module's room: its folder under globular/, or itself when it is a top-level module."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "globular"


def room_graph() -> dict[str, dict[str, set[str]]]:
    """Room -> rooms it imports -> the modules that do (the package's ``__init__``, its public face, aside)."""
    rooms: dict[str, dict[str, set[str]]] = {}
    for name, imports in module_graph().items():
        if name == "globular":
            continue
        for target in imports:
            if room_of(target) not in (room_of(name), "globular"):
                rooms.setdefault(room_of(name), {}).setdefault(room_of(target), set()).add(name)
    return rooms


def test_the_rooms_import_downward_only():
    """The folder-level import graph of src/globular: every room imports only rooms below it in
    ROOMS (so there is no circle), with no names allowed by exception; plugins/ (the plugin API
    third parties build on) imports only the API's rooms; nothing outside providers/ names a
    provider's own module (they are found through the registry); the commands the CLI loads
    through the globular.commands entry points live in cli/."""
    graph = room_graph()
    present = {room_of(n) for n in module_graph()} - {"globular"}
    assert present <= set(ROOMS), f"rooms missing from ROOMS: {sorted(present - set(ROOMS))}"
    for room, targets in sorted(graph.items()):
        for target, by in sorted(targets.items()):
            assert ROOMS.index(target) < ROOMS.index(room), f"{sorted(by)} ({room}) import {target}, above it"
    assert set(graph.get("plugins", {})) <= set(PLUGIN_API), graph["plugins"]
    for name, classes in sorted(provider_classes_named().items()):
        assert room_of(name) == "providers", f"{name} names a provider's own class: {sorted(classes)}"
    commands = entry_point_modules("globular.commands")
    assert {room_of(m) for m in commands} == {"cli"}, commands


def provider_classes_named() -> dict[str, set[str]]:
    """Module -> the providers' and runners' own classes it imports (a subclass of NodeProvider or
    Runner, not the interface itself), wherever the import is."""
    import importlib

    from globular.providers.base import NodeProvider, Runner

    found: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        name = ".".join(path.relative_to(SRC.parent).with_suffix("").parts).removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("globular.providers."):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    value = getattr(module, alias.name, None)
                    own = isinstance(value, type) and issubclass(value, (NodeProvider, Runner))
                    if own and value not in (NodeProvider, Runner):
                        found.setdefault(name, set()).add(alias.name)
    return found


def test_every_verb_asked_of_a_node_is_one_the_node_programs_answer():
    """What the core and the plugins ask through ``nodeproc`` (a string anywhere in src) is a verb
    of globular.node, so any provider's runner answers it by running the node programs."""
    import re

    from globular import node

    asked = {m for path in SRC.rglob("*.py") for m in re.findall(r'nodeproc\(\s*"([a-z_]+)"', path.read_text())}
    assert asked and asked <= set(node.VERBS), sorted(asked - set(node.VERBS))


def test_the_old_ipcluster_path_is_the_same_modules():
    """globular.plugins.ipcluster[.X] (where the plugin was; users' Lab cluster files name it) is
    globular.ipcluster[.X], the same module objects, in whichever order they are imported."""
    import subprocess

    code = (
        "import globular.plugins.ipcluster.labcluster as a, globular.ipcluster.labcluster as b\n"
        "from globular.plugins.ipcluster.labpanel import CLASS\n"
        "import globular.ipcluster.settings as c\n"
        "from globular.plugins.ipcluster.settings import IPClusterSettings\n"
        "import importlib\n"
        "print(a is b, c.IPClusterSettings is IPClusterSettings, b.__spec__.name,"
        " importlib.import_module(CLASS.rpartition('.')[0]) is b)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["True", "True", "globular.ipcluster.labcluster", "True"], done.stderr


def every_import(path: Path) -> set[str]:
    """Every module ``path`` imports (any package), wherever the import is."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return found


def test_providers_name_no_plugin_and_no_environment_and_the_renderer_no_plugin():
    """A provider never names what the plugins need (ipyparallel, ZeroMQ): the plugins ask in
    their preflight; nor does it decide about node environments.  The renderer shows plain
    data (globular.results), not the plugins' classes."""
    banned = ("ipyparallel", "zmq", "globular.environment", "globular.wheelhouse", "globular.plugins")
    for path in sorted((SRC / "providers").glob("*.py")):
        leaks = {m for m in every_import(path) if m.startswith(banned)}
        assert leaks == set(), f"providers/{path.name} imports {sorted(leaks)}"
    assert {m for m in every_import(SRC / "cli" / "render.py") if m.startswith("globular.plugins")} == set()


def test_the_node_programs_need_nothing_but_python():
    """globular.node imports only the standard library and itself, and its modules joined into
    one source (the one way they travel) run alone: every verb answers there as here."""
    import subprocess

    from globular import node

    for path in sorted((SRC / "node").glob("*.py")):
        outside = {
            m for m in every_import(path)
            if m.split(".")[0] not in sys.stdlib_module_names and not m.startswith("globular.node")
        }  # fmt: skip
        assert outside == set(), f"node/{path.name} imports {sorted(outside)}"
    assert set(node.VERBS) >= {"spawn", "stop", "facts", "free_ports", "env_build", "env_probe"}
    assert set(node.VERBS) > node.ANY_PYTHON
    done = subprocess.run(
        [sys.executable, "-I", "-S", "-c", node.SOURCE, "free_ports"],
        input=json.dumps({"ip": "127.0.0.1", "count": 2}),
        capture_output=True,
        text=True,
        timeout=30,
    )  # -S: not even site-packages
    assert done.returncode == 0 and len(json.loads(done.stdout)) == 2, done.stderr
    refused = subprocess.run(
        [sys.executable, "-I", "-S", "-c", node.SOURCE, "remove_dir"],
        input=json.dumps({"root": "/nonexistent", "path": "/etc"}),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert refused.returncode == 3 and "refusing to remove /etc" in refused.stderr


def test_modules_stay_readable():
    """No module over 500 lines unless its docstring says why (``Longer than most: ...``)."""
    long = {}
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        if len(text.splitlines()) > 500 and "Longer than most" not in (ast.get_docstring(ast.parse(text)) or ""):
            long[path.name] = len(text.splitlines())
    assert long == {}


def test_no_test_asserts_in_a_finally_block():
    """A cleanup that fails must not hide the failure it cleans up after: fixtures clean up, or the
    cleanup's result is checked after the ``try``."""
    found = []
    for path in Path(__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Try):
                found += [
                    f"{path.name}:{a.lineno}" for s in node.finalbody for a in ast.walk(s) if isinstance(a, ast.Assert)
                ]
    assert found == []


def test_the_node_helper_answers_each_request_by_its_id(tmp_path):
    from globular.node.serve import serve

    log = tmp_path / "a.log"
    log.write_text("line one\nline two\n")
    requests = [
        {"id": 7, "verb": "tail", "request": {"path": str(log), "bytes": 9}},
        {"id": 8, "verb": "remove_dir", "request": {"root": str(tmp_path / "root"), "path": "/etc"}},
        {"id": 9, "verb": "read_json", "request": {}},
    ]
    out = io.StringIO()
    serve(io.StringIO("".join(json.dumps(r) + "\n" for r in requests)), out)
    answers = {a["id"]: a for a in map(json.loads, out.getvalue().splitlines())}
    assert answers[7] == {"id": 7, "reply": "line two\n"}
    assert "refusing to remove /etc" in answers[8]["refused"]
    assert answers[9]["error"].startswith("KeyError")


def test_the_config_reference_in_docs_is_current():
    """docs/reference/config.md is generated from the settings models: regenerate it when they change
    (`globular config reference --markdown > docs/reference/config.md`)."""
    from globular.reference import markdown, reference

    docs = SRC.parent.parent / "docs" / "reference" / "config.md"
    assert docs.read_text() == markdown(reference()), "docs/reference/config.md is stale: regenerate it"
    keys = {(e.section, e.key) for e in reference()}
    assert ("[cluster] provider = ssh", "node_hosts") in keys and ("[cluster]", "packages") in keys
    assert ("[plugin NAME] setup_class = ipcluster", "encryption") in keys


def test_slurm_settings_and_the_sbatch_command_they_make(tmp_path):
    from pydantic import ValidationError

    from globular.providers.slurm import SlurmProvider
    from globular.providers.slurm_jobs import fraction_left, seconds_of
    from globular.providers.slurm_settings import SlurmSettings

    settings = SlurmSettings.model_validate(
        {
            "partition": "gpu",
            "time_limit": "1-02:00:00",
            "sbatch_args": "--mem=8G --gres='gpu:1'",
            "cores_per_node": "4",
        }
    )
    assert settings.sbatch_args == ["--mem=8G", "--gres=gpu:1"]  # split like a shell would, never run by one
    for bad in ({"time_limit": "2 hours"}, {"partition": "a b"}, {"partition": "--x"}, {"sbatch_args": "'open"}):
        with pytest.raises(ValidationError):
            SlurmSettings.model_validate(bad)
    spec = ClusterSpec(
        template="t",
        cluster_size=2,
        provider="slurm",
        provider_settings=settings.model_dump() | {"remote_dir": str(tmp_path)},
    )
    provider = SlurmProvider(spec, cluster="c", home=tmp_path)
    argv = provider.sbatch_argv("node001", host="cn7")
    assert argv[:2] == ["sbatch", "--parsable"]
    assert {"--partition=gpu", "--time=1-02:00:00", "--cpus-per-task=4", "--nodelist=cn7", "--job-name=glb-c-node001",
            f"--comment={provider.mark('node001')}", "--mem=8G", "--gres=gpu:1"} <= set(argv)  # fmt: skip
    assert seconds_of("1-02:00:00") == 93600 and seconds_of("10:00") == 600 and seconds_of("UNLIMITED") is None
    # idle shutdown: a Slurm node gives itself back by ending its own job, and nothing else
    node = NodeRecord(
        name="node001", address="10.0.0.7", workdir=str(tmp_path), cores=4, python="python3", data={"job_id": "417"}
    )
    assert provider.release_commands(node) == [["scancel", "417"]]
    assert provider.release_commands(NodeRecord(name="x", address="", workdir="", cores=1, python="python3")) == []
    local = ClusterSpec(template="t", cluster_size=1, provider="local")
    assert LocalProvider(local, cluster="c", home=tmp_path).release_commands(node) == []  # nothing to give back
    assert fraction_left("0:05:00", "1:00:00") == pytest.approx(1 / 12) and fraction_left("5:00", "NOT_SET") is None


def test_the_controllers_ports_are_none_that_other_processes_get_without_asking():
    """Engines (and their nannies, kernels) bind pyzmq's random ports, 49152 and up, while the
    controller starts; processes that bind port 0 get the kernel's ephemeral range.  The ports
    globular picks for the controller before it binds them are below both."""
    from globular.node.probe import free_ports

    ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = free_ports({"ip": "127.0.0.1", "count": 20})
    assert len(ports) == len(set(ports)) == 20
    assert all(20000 <= p < min(ephemeral, 49152) for p in ports), ports


# -- settings that would break globular's own arguments, names and environment ----------------


@pytest.mark.parametrize(
    "arg",
    [
        "--IPEngine.url_file=/tmp/x",
        "--profile-dir=/tmp/p",
        "--BaseIPythonApplication.ipython_dir=/tmp/i",
        "--url=tcp://x",
    ],
)
def test_engine_args_may_not_change_what_globular_sets(arg):
    from pydantic import ValidationError

    from globular.ipcluster.settings import IPClusterSettings

    with pytest.raises(ValidationError, match="globular sets"):
        IPClusterSettings.model_validate({"engine_args": arg})


def test_engine_env_values_on_one_line_and_bounded():
    from pydantic import ValidationError

    from globular.ipcluster.settings import IPClusterSettings

    assert IPClusterSettings.model_validate({"engine_env": "A=1, B=2"}).engine_env == {"A": "1", "B": "2"}
    with pytest.raises(ValidationError, match="the value of A spans lines"):
        IPClusterSettings.model_validate({"engine_env": "A=1\nB=2"})
    with pytest.raises(ValidationError, match="the value of BIG is 200000 bytes: at most 32768"):
        IPClusterSettings.model_validate({"engine_env": "BIG=" + "x" * 200_000})


@pytest.mark.parametrize(("value", "ok"), [("90", True), ("1:30:00", True), ("2-12", True), ("99:00", True),
                                            ("1:99:99", False), ("1:30:60", False), ("2-24:00", False), ("UNLIMITED", True)])  # fmt: skip
def test_slurm_time_limits_in_range(value, ok):
    from pydantic import ValidationError

    from globular.providers.slurm_settings import SlurmSettings

    if ok:
        assert SlurmSettings.model_validate({"time_limit": value}).time_limit == value
    else:
        with pytest.raises(ValidationError, match="is not a Slurm time"):
            SlurmSettings.model_validate({"time_limit": value})


@pytest.mark.parametrize(
    ("args", "why"),
    [
        ("--comment=x", "globular sets --comment"),
        ("--job-name=mine", "globular sets --job-name"),
        ("-J mine", "globular sets -J"),
        ("--output=/tmp/o", "globular sets --output"),
        ("--wrap=true", "globular sets --wrap"),
        ("--mem=8G ; rm", "';' is not an sbatch option"),
        ("script.sh", "'script.sh' is not an sbatch option"),
    ],
)
def test_sbatch_args_keep_globulars_own_options_and_take_no_script(args, why):
    from pydantic import ValidationError

    from globular.providers.slurm_settings import SlurmSettings

    with pytest.raises(ValidationError, match=why):
        SlurmSettings.model_validate({"sbatch_args": args})
    assert SlurmSettings.model_validate({"sbatch_args": "--mem 8G --gres=gpu:1 -c 2"}).sbatch_args == [
        "--mem", "8G", "--gres=gpu:1", "-c", "2"
    ]  # fmt: skip


def test_how_engines_start_is_decided_once_in_the_settings():
    """restart_dead_engines' supervisor starts each engine itself: engine_fork is off with it,
    and asking for both is refused, naming engine_fork."""
    from pydantic import ValidationError

    from globular.ipcluster.settings import IPClusterSettings

    assert IPClusterSettings.model_validate({}).engine_fork is True
    assert IPClusterSettings.model_validate({"restart_dead_engines": "true"}).engine_fork is False
    with pytest.raises(ValidationError) as refused:
        IPClusterSettings.model_validate({"restart_dead_engines": "true", "engine_fork": "true"})
    (error,) = refused.value.errors()
    assert error["ctx"]["key"] == "engine_fork" and "the supervisor starts each engine" in error["msg"]


def test_nodes_that_share_a_file_system_prune_it_at_once(tmp_path):
    """Hosts with one home prune the same envs folder at the same moment (env prune runs on
    every node at once): none of them may fail on a name another has just removed."""
    import threading

    from globular.node.env import env_prune

    for attempt in range(40):
        root = tmp_path / f"envs{attempt}"
        root.mkdir()
        for i in range(3):
            name = f"{i:020x}"
            (root / f"{name}-abcd").mkdir()
            (root / f"{name}-abcd" / "marker").write_text("x")
            (root / name).symlink_to(f"{name}-abcd")
            (root / f".{name}.lock").write_text("")
        errors: list[BaseException] = []

        def prune(root=root, errors=errors) -> None:
            try:
                env_prune({"root": str(root), "keep": []})
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=prune) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == [] and not root.exists(), (attempt, errors)


def test_the_top_page_watches_while_asked_and_stops_after(monkeypatch):
    """labtop.Watcher: frames and history while the page asks; closed once nobody asked; an
    error (the cluster gone) shown, and a later request tries again."""
    from globular.ipcluster import labtop, top

    made: list[FakeWatch] = []

    class FakeWatch:
        def __init__(self, name: str, home: Path):
            self.closed, self.n = False, 0
            made.append(self)
            if name == "gone":
                raise GlobularError("cluster 'gone' not found")

        async def open(self) -> None:
            pass

        async def frame(self) -> top.Frame:
            self.n += 1
            return top.Frame("c", float(self.n), [], 0, self.n, 0, float(self.n), 0, 1, 1, None, [], {"completed": 0})

        async def close(self) -> None:
            self.closed = True

    monkeypatch.setattr(top, "Watch", FakeWatch)

    async def scenario() -> tuple[dict, dict, bool, dict]:
        watcher = labtop.Watcher("c", Path("/nowhere"), interval=0.01, linger=0.1)
        first = watcher.ask()
        await asyncio.sleep(0.05)
        later = watcher.ask()
        await asyncio.sleep(0.3)  # nobody asks: it stops
        stopped = watcher.task is not None and watcher.task.done() and made[0].closed
        gone = labtop.Watcher("gone", Path("/nowhere"), interval=0.01, linger=0.1)
        gone.ask()
        await asyncio.sleep(0.02)
        return first, later, stopped, gone.ask()

    first, later, stopped, gone = asyncio.run(scenario())
    assert first["frame"] is None and first["history"] == []
    assert later["frame"]["running"] == len(later["history"]) >= 2
    assert [p["busy"] for p in later["history"]] == list(range(1, len(later["history"]) + 1))
    assert stopped
    assert gone["error"] == "cluster 'gone' not found" and gone["frame"] is None


def test_installing_globular_enables_the_top_page():
    import tomllib

    from globular.ipcluster import labtop

    root = Path(__file__).parent.parent
    files = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["data-files"]
    [config] = files["etc/jupyter/jupyter_server_config.d"]
    assert json.loads((root / config).read_text()) == {"ServerApp": {"jpserver_extensions": {labtop.EXTENSION: True}}}
    assert labtop._jupyter_server_extension_points() == [{"module": labtop.EXTENSION}]
    # the page's script goes into the wheel beside the module, and is the page's
    data = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "labtop.html" in data["globular.ipcluster"]
    assert "setTimeout(tick, 1000)" in labtop.page_body() and 'replace(/\\/$/, "")' in labtop.page_body()


def test_the_helper_of_the_hosts_python_answers_what_any_python_answers():
    """Once a node's environment is made its Python changes; the helper already running (the
    host's Python) still answers the questions any Python answers alike, so a cached
    environment starts no second Python; a question about the environment's own Python (its
    modules) gets a helper of that Python."""
    from globular.providers.helper import HelperRunner

    class FakeHelper:
        def __init__(self, python: str):
            self.python, self.alive, self.asked = python, True, []

        async def ask(self, verb: str, request: dict, timeout: float) -> dict:
            self.asked.append(verb)
            return {}

        def close(self) -> None:
            self.alive = False

    class FakeRunner(HelperRunner):
        async def start_helper(self):  # type: ignore[override]
            started.append(FakeHelper(self.node.python))
            return started[-1]

        async def run(self, argv, *, input=None, timeout=60.0, check=True):  # type: ignore[override]
            raise AssertionError("no command runs")

        async def write_file(self, path: str, data: bytes, mode: int = 0o600) -> None:
            await self.nodeproc("write", {"path": path})

    started: list[FakeHelper] = []
    node = NodeRecord(name="node001", address="198.18.0.12", workdir="/w", cores=1, python="/usr/bin/python3")
    runner = FakeRunner(node)

    async def scenario() -> None:
        await runner.nodeproc("env_probe", {})
        node.python = "/w/envs/e1/bin/python"  # the environment is made
        for verb in ("read_json", "node_facts", "free_ports", "write", "spawn", "wait_files", "alive"):
            await runner.nodeproc(verb, {})
        assert len(started) == 1
        await runner.nodeproc("facts", {"modules": ["ipyparallel"]})  # its modules: its own Python
        await runner.nodeproc("spawn", {})

    asyncio.run(scenario())
    assert [h.python for h in started] == ["/usr/bin/python3", "/w/envs/e1/bin/python"]
    assert started[0].asked[-1] == "alive" and not started[0].alive
    assert started[1].asked == ["facts", "spawn"]


def test_preflight_answers_are_kept_per_environment_and_question():
    from globular.ipcluster.preflight import answers_file, answers_key

    bare = NodeRecord(name="n", address="a", workdir="/w", cores=1, python="/usr/bin/python3")
    managed = bare.model_copy(update={"data": {"env": {"root": "/w/envs", "name": "e1", "cached": True}}})
    assert answers_file(bare) is None
    assert answers_file(managed) == "/w/envs/e1/globular-preflight.json"
    one = {"modules": ["ipyparallel", "zmq"], "load": ["zmq"], "questions": {"curve": "x"}}
    assert answers_key(one) == answers_key({**one, "modules": ["zmq", "ipyparallel"]})
    assert answers_key(one) != answers_key({**one, "questions": {}})
    assert answers_key(one) != answers_key({**one, "modules": ["ipyparallel", "zmq", "msgpack"]})


def test_slurm_waiters_share_one_squeue_and_never_read_one_older_than_their_sleep(tmp_path, monkeypatch):
    """Nodes waiting for their jobs share each squeue; a node that slept sees a newer one (a master
    once read its first PENDING for 1.5 s while the other jobs were seen running at 0.75 s)."""
    import globular.providers.slurm as slurm_provider
    from globular.providers.slurm import SlurmProvider
    from globular.providers.slurm_jobs import Job

    calls: list[tuple[float, list[str]]] = []
    runs_at = {"1": 0.3, "2": 0.2, "3": 0.2}  # seconds after the start

    async def fake_jobs(ids: list[str]) -> dict[str, Job]:
        now = time.monotonic() - began
        calls.append((now, ids))
        await asyncio.sleep(0.005)
        return {i: Job(i, "RUNNING" if now >= runs_at[i] else "PENDING", node="h") for i in ids}

    monkeypatch.setattr(slurm_provider, "jobs", fake_jobs)
    spec = ClusterSpec(template="t", cluster_size=3, provider="slurm", provider_settings={"remote_dir": str(tmp_path)})
    provider = SlurmProvider(spec, cluster="c", home=tmp_path)
    nodes = {job: NodeRecord(name=f"n{job}", address="", workdir="/w", cores=1, python="p") for job in runs_at}

    async def wait_all() -> dict[str, float]:
        async def one(job: str) -> tuple[str, float]:
            await provider._wait_running(nodes[job], job, None)
            return job, time.monotonic() - began

        return dict(await asyncio.gather(*(one(job) for job in runs_at)))

    began = time.monotonic()
    seen = asyncio.run(wait_all())
    for job, at in seen.items():  # seen at the first or second look after it runs (polls at 0.1, 0.3, 0.7 s ...),
        assert runs_at[job] <= at < runs_at[job] + 0.7, (job, at, calls)  # never after a stale answer (1.5 s)
    after_first = [ids for t, ids in calls[3:]]
    assert after_first and all(ids == sorted(set(ids)) and len(ids) > 1 for ids in after_first[:2]), calls
    assert len(calls) <= 3 + 6, calls  # three first looks, then one squeue a round for all of them


def test_a_job_is_seen_running_as_its_log_changes_not_at_the_next_squeue(tmp_path, monkeypatch):
    """The keeper's first line in the job log makes the waiter ask Slurm at once; a log that was
    there before (a node of that name in an earlier cluster) and does not change, does not."""
    import globular.providers.slurm as slurm_provider
    from globular.providers.slurm import SlurmProvider
    from globular.providers.slurm_jobs import Job

    monkeypatch.setattr(slurm_provider, "FIRST_POLL", 0.6)
    monkeypatch.setattr(slurm_provider, "POLL", 0.6)
    calls: list[float] = []

    async def fake_jobs(ids: list[str]) -> dict[str, Job]:
        now = time.monotonic() - began
        calls.append(now)
        return {i: Job(i, "RUNNING" if now >= 0.2 else "PENDING", node="h") for i in ids}

    monkeypatch.setattr(slurm_provider, "jobs", fake_jobs)
    spec = ClusterSpec(template="t", cluster_size=2, provider="slurm", provider_settings={"remote_dir": str(tmp_path)})
    provider = SlurmProvider(spec, cluster="c", home=tmp_path)
    logs = tmp_path / "c" / "jobs"
    logs.mkdir(parents=True)
    (logs / "old.log").write_text("globular keeper of job 7 on h: an earlier cluster's\n")
    new, old = (NodeRecord(name=n, address="", workdir="/w", cores=1, python="p") for n in ("new", "old"))
    marks = {n.name: provider._log_mark(n.name) for n in (new, old)}  # as bring_up takes them, before sbatch

    async def keeper_starts() -> None:
        await asyncio.sleep(0.25)
        (logs / "new.log").write_text("globular keeper of job 1 on h: /tmp/globular-0-1/keeper.sock\n")

    async def wait(node: NodeRecord, job: str) -> float:
        await provider._wait_running(node, job, marks[node.name])
        return time.monotonic() - began

    async def both() -> list[float]:
        return await asyncio.gather(wait(new, "1"), wait(old, "2"), keeper_starts())

    began = time.monotonic()
    seen_new, seen_old, _ = asyncio.run(both())
    assert 0.25 <= seen_new < 0.45, (seen_new, calls)  # within a look or two (LOG_POLL) of the line
    assert seen_old >= 0.6, (seen_old, calls)  # its unchanged log: the poll's squeue, FIRST_POLL s on


def test_engine_ids_go_to_the_nodes_in_the_records_order_whichever_answers_first(tmp_path, monkeypatch):
    """The master's engines are 0, 1 ... even when another node's files are written first (the
    ids were claimed after the writes: a GPU test once found the master's GPU engines at e1, e2)."""
    from globular.fanout import each_node
    from globular.ipcluster import engines
    from globular.ipcluster.roles import DATA_KEY

    ctx = memory_cluster(tmp_path, ["master", "node001"])
    asyncio.run(ctx.reconcile([], prepare=False))

    async def write_file(self: Runner, path: str, data: bytes, mode: int = 0o600) -> None:
        await asyncio.sleep(0.05 if self.node.is_master else 0)  # the master answers last

    class Claimed(Exception):
        pass

    async def install(*args: object) -> None:
        pass

    def engine_spec(*args: object) -> None:
        raise Claimed  # what follows the claim is not this test's

    monkeypatch.setattr(MemoryRunner, "write_file", write_file)
    monkeypatch.setattr(engines.userconfig, "install", install)
    monkeypatch.setattr(engines, "engine_spec", engine_spec)
    counts = {"master": 2, "node001": 1}
    with pytest.raises(NodeFailures):
        asyncio.run(
            each_node(ctx.nodes, lambda n: engines.start_engines(ctx, n, counts[n.name], {}, IPClusterSettings()))
        )
    assert ctx.plugin_data(DATA_KEY)["engine_ids"] == {"0": "master", "1": "master", "2": "node001"}


def test_slurm_asks_a_hosts_address_once_for_all_the_nodes_there(tmp_path, monkeypatch):
    import globular.providers.slurm as slurm_provider
    from globular.providers.slurm import SlurmProvider

    asked: list[str] = []

    async def node_address(host: str) -> str:
        asked.append(host)
        await asyncio.sleep(0.01)
        if host == "bad" and asked.count("bad") == 1:
            raise GlobularError("scontrol: timed out")
        return {"h1": "198.18.0.11", "h2": "198.18.0.12", "bad": "198.18.0.13"}[host]

    monkeypatch.setattr(slurm_provider, "node_address", node_address)
    spec = ClusterSpec(template="t", cluster_size=3, provider="slurm", provider_settings={"remote_dir": str(tmp_path)})
    provider = SlurmProvider(spec, cluster="c", home=tmp_path)

    async def addresses() -> list[str | BaseException]:
        first = await asyncio.gather(*(provider._address(h) for h in ("h1", "h1", "h2", "bad")), return_exceptions=True)
        return [*first, await provider._address("bad"), await provider._address("h1")]

    found = asyncio.run(addresses())
    assert found[0] == found[1] == found[5] == "198.18.0.11" and found[2] == "198.18.0.12" and found[4] == "198.18.0.13"
    assert isinstance(found[3], GlobularError) and asked == ["h1", "h2", "bad", "bad"]  # a failed one is asked again


def test_settings_are_validated_once_and_travel_typed_with_the_spec(tmp_path, monkeypatch):
    """The config validates a template's provider and plugin settings; the provider and the plugin
    made from that spec use those very objects (no second validation of a dumped dict).  A spec
    read back from a record validates on first use, then keeps the typed form."""
    from globular.config import Config
    from globular.ipcluster.plugin import IPCluster
    from globular.providers.local import LocalSettings
    from globular.registry import make_provider

    text = "[cluster t]\nprovider = local\ncores_per_node = 2\nplugins = ipcluster\n"
    text += "[plugin ipcluster]\nsetup_class = ipcluster\nmaster_engines = 1\n"
    calls: list[str] = []
    original = IPClusterSettings.model_validate.__func__  # type: ignore[attr-defined]

    def counted(cls, *args, **kwargs):
        calls.append(cls.__name__)
        return original(cls, *args, **kwargs)

    spec = Config.from_text(text, file="cfg").cluster_spec("t")
    monkeypatch.setattr(IPClusterSettings, "model_validate", classmethod(counted))
    monkeypatch.setattr(LocalSettings, "model_validate", classmethod(counted))
    provider = make_provider(spec, cluster="t", home=tmp_path)
    plugin = IPCluster.from_spec(spec.plugins[0])
    assert provider.settings is spec.typed_provider_settings(LocalSettings) and provider.settings.cores_per_node == 2
    assert plugin.settings is spec.plugins[0].typed_settings(IPClusterSettings)
    assert calls == []  # nothing validated again

    again = ClusterSpec.model_validate_json(spec.model_dump_json())  # as a record is read
    first = again.plugins[0].typed_settings(IPClusterSettings)
    assert first is again.plugins[0].typed_settings(IPClusterSettings) and first.master_engines == 1
    assert make_provider(again, cluster="t", home=tmp_path).settings is again.typed_provider_settings(LocalSettings)
    assert calls == ["IPClusterSettings", "LocalSettings"]  # once each


def test_ipcluster_forgets_only_the_files_of_its_own_cluster(tmp_path):
    """``terminate --force`` of an unreadable record asks every plugin to forget the cluster:
    ipcluster removes the connection files that name it (any region, with their notebook
    file), never those of a cluster whose name starts the same."""
    from globular.ipcluster.plugin import IPCluster

    folder = tmp_path / "ipcluster"
    folder.mkdir()
    files = {
        "a-local.json": "a", "a-us-east-1.json": "a", "a-b-local.json": "a-b", "a-ssh.json": None,
    }  # fmt: skip
    for name, cluster in files.items():
        (folder / name).write_text(json.dumps({"globular_cluster": cluster} if cluster else {"key": "x"}))
    (folder / "a-local-notebook.json").write_text("{}")
    (folder / "a-b-local-notebook.json").write_text("{}")
    IPCluster.forget(tmp_path, "a")
    assert sorted(p.name for p in folder.iterdir()) == ["a-b-local-notebook.json", "a-b-local.json", "a-ssh.json"]


def test_addnode_host_is_refused_by_the_core_for_a_provider_that_places_its_nodes(tmp_path):
    """``--host`` reaches only a provider that places nodes (ssh, slurm); for the others the core
    says where their nodes come from, before anything changes."""
    from globular import operations
    from globular.config import Config
    from globular.errors import BadInput

    spec = Config.from_text("[cluster t]\nprovider = local\n", file="cfg").cluster_spec("t")
    master = NodeRecord(name="master", address="127.0.0.1", workdir=str(tmp_path), cores=1, python=sys.executable)
    record = ClusterRecord(name="c", region="local", spec=spec, status="running", nodes=[master], desired=["master"])
    StateStore(tmp_path).create(record)
    with pytest.raises(BadInput, match="the local provider makes its nodes on this machine: it takes no --host"):
        asyncio.run(operations.add_nodes("c", hosts=["somewhere"], home=tmp_path))
    assert StateStore(tmp_path).get("c").desired == ["master"]
