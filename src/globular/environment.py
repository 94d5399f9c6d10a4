"""Node environments: each node gets a venv with what the cluster needs, built offline.

(Longer than most modules: the local half of one capability, read top to bottom —
the node's target, the wheelhouse resolved for it, and shipping it; the node's
half is :mod:`globular.node`.)

With ``environment = managed`` (the default of providers whose nodes are other
machines), globular

1. asks every node (at once) for its Python: version, implementation, ABI,
   platform, libc, whether it has ``venv``, the free space, and the
   environments it already has (:mod:`globular.node`, run with the host's Python);
2. resolves, **on this machine**, a wheelhouse for each distinct (package set,
   node platform) with pip (``pip download --only-binary=:all:`` for the nodes'
   platform tags): ipyparallel at exactly this machine's version and whatever the
   plugins ask for (``Plugin.node_packages``), plus ``packages`` and
   ``requirements`` of the ``[cluster]`` section.  Wheelhouses are cached in
   ``~/.globular/wheels/<digest>`` by a digest of (package set, requirements file,
   wheelhouse folder, node target), so the index is asked once;
3. ships the wheels over the connection it already holds (a tar stream on stdin)
   and builds ``<remote_dir>/envs/<name>`` on every node at once (a venv made
   ``--without-pip``, filled by pip run from its own wheel, ``--no-index``).  A
   node that already has the environment (same digest, same base Python) installs
   nothing: ``env cached`` in the node's step line.

Then ``node.python`` is the environment's Python: the controller, the engines,
the notebook and every helper run from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import logging
import os
import re
import shutil
import sys
import tarfile
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from filelock import FileLock, Timeout

from globular.errors import BadInput, CommandError, GlobularError, NodeError, NodeFailures
from globular.fanout import each_node
from globular.paths import private_dir
from globular.providers.base import NODE_SOURCE, CommandResult
from globular.providers.here import run_here
from globular.spec import ClusterSpec
from globular.state import NodeRecord

if TYPE_CHECKING:
    from globular.plugins.base import Plugin, PluginContext
    from globular.providers.base import NodeProvider

log = logging.getLogger(__name__)

FORMAT = 1  # bump when what goes into an environment changes
PROBE_TIMEOUT = 30.0
BUILD_TIMEOUT = 900.0
RESOLVE_TIMEOUT = 1800.0  # s for pip to resolve and download one wheelhouse here
INDEX_TIMEOUT = 30.0
SPACE_FACTOR = 4  # a venv takes about this many times its wheels' size, while they are unpacked beside it
SPACE_MARGIN = 64 * 2**20


def environment_mode(spec: ClusterSpec, default: str) -> str:
    return spec.environment.mode or default


# -- what a node's Python takes ------------------------------------------------


@dataclass(frozen=True)
class Target:
    """What wheels a node's Python can install: pip's --implementation, --python-version,
    --abi and --platform values."""

    implementation: str  # "cp"
    python_version: str  # "3.11"
    abi: str  # "cp311"
    platforms: tuple[str, ...]

    @classmethod
    def from_probe(cls, facts: dict[str, Any]) -> Target:
        major_minor = ".".join(facts["python"].split(".")[:2])
        return cls(facts["implementation"], major_minor, facts["abi"], tuple(target_platforms(facts)))

    def describe(self) -> str:
        impl = {"cp": "CPython", "pp": "PyPy"}.get(self.implementation, self.implementation)
        return f"{impl} {self.python_version} on {self.platforms[0] if self.platforms else 'an unknown platform'}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "implementation": self.implementation,
            "python_version": self.python_version,
            "abi": self.abi,
            "platforms": list(self.platforms),
        }


# manylinux's legacy names and the glibc they stand for (PEP 600)
_LEGACY_MANYLINUX = (("manylinux2014", 17), ("manylinux2010", 12), ("manylinux1", 5))
_LEGACY_ARCHES = {
    "manylinux2014": {"x86_64", "i686", "aarch64", "ppc64le", "s390x", "armv7l"},
    "manylinux2010": {"x86_64", "i686"},
    "manylinux1": {"x86_64", "i686"},
}


def target_platforms(facts: dict[str, Any]) -> list[str]:
    """The platform tags of a node, most specific first, from its probe: pip matches
    ``--platform`` values exactly, so every manylinux level the node's glibc admits is listed."""
    machine = facts["machine"]
    if facts["system"].startswith("linux"):
        arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine.lower(), machine)
        if arch in ("i386", "i586"):
            arch = "i686"
        tags = []
        version = facts.get("libc_version") or ""
        major, _, minor = version.partition(".")
        if facts.get("libc") == "glibc" and major == "2" and minor.isdigit():
            glibc = int(minor)
            tags += [f"manylinux_2_{m}_{arch}" for m in range(glibc, 4, -1) if m >= 17 or arch in ("x86_64", "i686")]
            tags += [
                f"{name}_{arch}" for name, needs in _LEGACY_MANYLINUX if glibc >= needs and arch in _LEGACY_ARCHES[name]
            ]
        elif facts.get("libc") == "musl" and major == "1" and minor.isdigit():
            tags += [f"musllinux_1_{m}_{arch}" for m in range(int(minor), -1, -1)]
        return [*tags, f"linux_{arch}"]
    return [re.sub(r"[-.]", "_", facts["platform"])]


def probe_problems(facts: dict[str, Any], here: tuple[int, int] = sys.version_info[:2]) -> list[str]:
    """Why no environment can be built from this Python (empty: it can)."""
    problems = []
    there = tuple(int(p) for p in facts["python"].split(".")[:2])
    if there != tuple(here):
        problems.append(
            f"Python {facts['python']} at {facts['executable']}, {here[0]}.{here[1]} here: functions sent from here "
            f"would not run there (set python = a Python {here[0]}.{here[1]} on the hosts)"
        )
    if not facts["venv"]:
        problems.append(f"{facts['executable']} has no venv module (on Debian/Ubuntu: apt-get install python3-venv)")
    return problems


# -- the wheelhouse, on this machine --------------------------------------------


@dataclass(frozen=True)
class Wanted:
    """The packages one node needs; ``origins`` says who asked for each, for messages."""

    requirements: tuple[str, ...]
    origins: tuple[tuple[str, str], ...]  # (requirement, who asked)
    requirements_file: str | None
    wheelhouse: str | None


def wanted_for(spec: ClusterSpec, plugins: list[Plugin], node: NodeRecord) -> Wanted:
    pairs: list[tuple[str, str]] = [("pip", "globular (installs the rest)")]
    for plugin in plugins:
        pairs += [(req, f"[plugin {plugin.name}]") for req in plugin.node_packages(node)]
    pairs += [(req, f"[cluster {spec.template}] packages") for req in spec.environment.packages]
    unique = dict.fromkeys(req for req, _ in pairs)
    return Wanted(tuple(sorted(unique)), tuple(pairs), spec.environment.requirements, spec.environment.wheelhouse)


def wheelhouse_contents(folder: str | None) -> list[tuple[str, int, int]] | None:
    """What a ``wheelhouse = DIR`` holds (names, sizes, mtimes: no file is opened), so that
    a wheel added to it makes a new wheelhouse here rather than being ignored."""
    if not folder:
        return None
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        return []
    return [(e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in entries if e.is_file()]


def digest(wanted: Wanted, target: Target) -> str:
    """The name of a wheelhouse: what goes in, and for what Python."""
    requirements_text = Path(wanted.requirements_file).read_text() if wanted.requirements_file else None
    blob = json.dumps(
        {
            "format": FORMAT,
            "requirements": list(wanted.requirements),
            "requirements_file": requirements_text,
            "wheelhouse": wanted.wheelhouse,
            "wheelhouse_contents": wheelhouse_contents(wanted.wheelhouse),
            "target": target.as_dict(),
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def env_name(wheelhouse_digest: str, base_python: str) -> str:
    """The name of a node's environment: its wheelhouse and the Python it is made from."""
    return hashlib.sha256(f"{wheelhouse_digest}\0{base_python}".encode()).hexdigest()[:20]


@dataclass
class Wheelhouse:
    digest: str
    path: Path
    wheels: list[str]
    size: int
    installer: dict[str, Any] = field(default_factory=dict)  # uv's wheel, which installs the rest
    _tar: bytes | None = field(default=None, repr=False)

    def tar(self) -> bytes:
        """The wheels as one uncompressed tar stream (wheels are zip files already)."""
        if self._tar is None:
            buffer = io.BytesIO()
            with tarfile.open(fileobj=buffer, mode="w") as tar:
                for name in self.wheels:
                    tar.add(self.path / name, arcname=name, recursive=False)
            self._tar = buffer.getvalue()
        return self._tar


class PackageProblem(BadInput):
    """The packages asked for cannot be had for the nodes (exit code 2: the config asks for them)."""


def explain_pip_failure(stderr: str, wanted: Wanted, target: Target, exists: Any = None) -> str:
    """pip's failure, in one line that names the package, who asked for it, and the nodes' platform.

    ``exists(name)`` says whether the index has the project at all (None: not asked).
    """
    origins: dict[str, str] = {}
    for req, who in wanted.origins:
        origins.setdefault(_project(req), who)
    lines = [line.strip() for line in stderr.splitlines()]
    if "The conflict is caused by:" in lines:
        start = lines.index("The conflict is caused by:") + 1
        causes = []
        for line in lines[start:]:
            if not line or line.startswith(("To fix", "ERROR")):
                break
            causes.append(line)
        return "version conflict between the packages asked for: " + "; ".join(causes)
    for line in lines:
        found = re.match(
            r"ERROR: Could not find a version that satisfies the requirement (\S+) \(from versions: (.*)\)", line
        )
        if found:
            req, versions = found[1], found[2]
            name = _project(req)
            who = origins.get(name) or "a dependency"
            if versions == "none":
                if wanted.wheelhouse:
                    return (
                        f"no wheel of {req} in wheelhouse = {wanted.wheelhouse} for the nodes' {target.describe()} "
                        f"(asked for by {who}); add one: pip download --only-binary=:all: -d {wanted.wheelhouse} ..."
                    )
                if exists is not None and not exists(name):
                    return f"no package named {name!r} on the package index (asked for by {who})"
                return (
                    f"no wheel of {req} for the nodes' {target.describe()} (asked for by {who}); the nodes do not "
                    "build from source: choose a version that has one, or put a wheel in wheelhouse = DIR"
                )
            shown = versions if len(versions) < 120 else versions[:117] + "..."
            return f"no version of {name!r} satisfies {req!r} with a wheel for {target.describe()} (asked for by {who}; there are: {shown})"
    if any(line.startswith("RecursionError") for line in lines):  # older pips on a -r loop
        return (
            f"requirements = {wanted.requirements_file} includes itself (-r), directly or through another file"
            if wanted.requirements_file
            else "pip ran out of stack (RecursionError) resolving the packages"
        )
    errors = [line.removeprefix("ERROR: ") for line in lines if line.startswith("ERROR:")]
    errors = [e for e in errors if e.strip() not in ("Exception:", "")]  # pip's crash header says nothing
    if errors:
        return errors[-1]
    tail = [line for line in lines if line]
    return tail[-1] if tail else "pip failed without a message"


def _project(requirement: str) -> str:
    name = re.split(r"[\s<>=!~;\[(@]", requirement.strip(), maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


def _pip(*args: str) -> list[str]:
    return [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]


async def _index_has(name: str) -> bool:
    """Does the package index know project ``name`` at all (in any form)?"""
    try:
        done = await run_here(_pip("index", "versions", name), timeout=INDEX_TIMEOUT)
    except (TimeoutError, OSError):
        return True  # not known to be missing
    return done.returncode == 0


async def _pip_here(argv: list[str], what: str) -> CommandResult:
    """pip in a child process of its own: a cancel (Ctrl-C, SIGTERM) kills it, and so does
    RESOLVE_TIMEOUT (a wheelhouse file that blocks pip's open(), a huge requirements file)."""
    try:
        return await run_here(argv, timeout=RESOLVE_TIMEOUT)
    except TimeoutError:
        raise GlobularError(
            f"{what}: pip did not finish in {RESOLVE_TIMEOUT / 60:g} minutes and was stopped "
            "(a file in wheelhouse that cannot be read, an index that does not answer?)"
        ) from None
    except OSError as exc:
        raise GlobularError(f"cannot run pip here to prepare the node environment: {exc}") from None


async def _missing_project(output: str, wanted: Wanted) -> Callable[[str], bool] | None:
    """For explain_pip_failure: which projects pip found no version of the index knows at all
    (asked of the index now; None with a wheelhouse of the user's: no index is asked)."""
    if wanted.wheelhouse:
        return None
    names = {
        _project(m[1])
        for m in re.finditer(
            r"Could not find a version that satisfies the requirement (\S+) \(from versions: none\)", output
        )
    }
    known = {name: await _index_has(name) for name in sorted(names)}
    return lambda name: known.get(name, True)


@contextlib.asynccontextmanager
async def _locked(path: Path) -> AsyncIterator[None]:
    """``path``'s file lock, waited for without blocking the event loop (a cancel ends the wait)."""
    lock = FileLock(str(path))
    while True:
        try:
            lock.acquire(timeout=0)
            break
        except Timeout:
            await asyncio.sleep(0.1)
    try:
        yield
    finally:
        lock.release()


async def resolve(wanted: Wanted, target: Target, cache: Path) -> Wheelhouse:
    """The wheelhouse for ``wanted`` on ``target``: from the cache, else made with pip download."""
    key = digest(wanted, target)
    private_dir(cache)
    final = cache / key
    async with _locked(cache / f".{key}.lock"):
        manifest = final / "manifest.json"
        if manifest.is_file():
            data = json.loads(manifest.read_text())
            return Wheelhouse(key, final, data["wheels"], data["size"], data.get("installer", {}))
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=cache))
        try:
            argv = _pip(
                "download",
                "--only-binary=:all:",
                "--progress-bar=off",
                "--dest",
                str(tmp),
                "--implementation",
                target.implementation,
                "--python-version",
                target.python_version,
                "--abi",
                target.abi,
                *(a for p in target.platforms for a in ("--platform", p)),
            )
            if wanted.wheelhouse:
                argv += ["--no-index", "--find-links", wanted.wheelhouse]
            if wanted.requirements_file:
                argv += ["--requirement", wanted.requirements_file]
            argv += list(wanted.requirements)
            started = time.monotonic()
            log.info("resolving node packages for %s: %s", target.describe(), " ".join(wanted.requirements))
            done = await _pip_here(argv, "resolving the node packages")
            if done.returncode != 0:
                if "No module named pip" in done.stderr:
                    raise GlobularError(f"preparing node environments needs pip here ({sys.executable} -m ensurepip)")
                output = done.stdout + "\n" + done.stderr
                missing = await _missing_project(output, wanted)
                raise PackageProblem(
                    "cannot make the node environment: " + explain_pip_failure(output, wanted, target, missing)
                )
            installer = await _download_uv(tmp, target, wanted)
            wheels = sorted(p.name for p in tmp.iterdir() if p.name.endswith(".whl"))
            size = sum((tmp / w).stat().st_size for w in wheels)
            (tmp / "manifest.json").write_text(
                json.dumps(
                    {
                        "wheels": wheels,
                        "size": size,
                        "requirements": list(wanted.requirements),
                        "installer": installer,
                        "target": target.as_dict(),
                        "made": time.time(),
                    },
                    indent=1,
                )
            )
            os.replace(tmp, final)
            log.info(
                "wheelhouse %s: %d wheels, %.1f MB in %.1fs", key, len(wheels), size / 2**20, time.monotonic() - started
            )
            return Wheelhouse(key, final, wheels, size, installer)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


UV_REQUIREMENT = "uv>=0.5"


async def _download_uv(folder: Path, target: Target, wanted: Wanted) -> dict[str, Any]:
    """Add uv's wheel for the nodes' platform (a static binary: it installs the wheels several
    times faster than pip).  ``{"wheel": name, "install": False}``: the installer's wheel, not to
    be installed (``install``: the user asked for uv too); ``{}``: none, the nodes use pip."""
    before = {p.name for p in folder.iterdir()}
    mine = [w for w in before if w.startswith("uv-")]
    if mine:
        return {"wheel": mine[0], "install": True}  # the user's own uv is in the set already
    argv = _pip(
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--progress-bar=off",
        "--dest",
        str(folder),
        "--implementation",
        target.implementation,
        "--python-version",
        target.python_version,
        *(a for p in target.platforms for a in ("--platform", p)),
    )
    if wanted.wheelhouse:
        argv += ["--no-index", "--find-links", wanted.wheelhouse]
    done = await _pip_here([*argv, UV_REQUIREMENT], "fetching uv's wheel for the nodes")
    added = [p.name for p in folder.iterdir() if p.name not in before and p.name.startswith("uv-")]
    if done.returncode != 0 or not added:
        log.info("no uv wheel for %s: the nodes install with pip", target.describe())
        return {}
    return {"wheel": added[0], "install": False}


# -- on the nodes --------------------------------------------------------------------


async def _call(
    cluster: PluginContext,
    node: NodeRecord,
    python: str,
    verb: str,
    request: dict[str, Any],
    *,
    input: bytes | None = None,
    timeout: float,
) -> Any:
    # the node programs, run by ``python`` (the host's own: the environment is not made yet).  The
    # request goes on stdin, as every request does; only where stdin carries the wheels (env_build)
    # is it the argument, and it holds no secret (a folder, a name, the installer)
    if input is None:
        argv, input = [python, "-c", NODE_SOURCE, verb], json.dumps(request).encode()
    else:
        argv = [python, "-c", NODE_SOURCE, verb, json.dumps(request)]
    result = await cluster.runner(node).run(argv, input=input, timeout=timeout)
    try:
        return json.loads(result.stdout)
    except ValueError:
        raise CommandError(
            node.name, f"globular.node {verb}", result.returncode, result.stderr, result.stdout
        ) from None


def base_python(node: NodeRecord) -> str:
    """The host's own Python, from which the node's environment is made."""
    return node.data.get("env", {}).get("base_python") or node.python


async def prepare(
    cluster: PluginContext, provider: NodeProvider, plugins: list[Plugin], nodes: list[NodeRecord]
) -> dict[str, dict[str, Any]]:
    """Give each of ``nodes`` its environment (see the module's doc); node name -> what was done."""
    spec = provider.spec
    if environment_mode(spec, provider.default_environment) != "managed" or not nodes:
        return {}
    reporter = cluster.reporter
    root = provider.envs_dir()
    reporter.begin("env", "node environments", len(nodes))
    try:

        async def probe(node: NodeRecord) -> Any:
            if base_python(node) == node.python:  # the helper runs it already: one round trip, no new Python
                return await cluster.runner(node).nodeproc("env_probe", {"root": root}, timeout=PROBE_TIMEOUT)
            return await _call(cluster, node, base_python(node), "env_probe", {"root": root}, timeout=PROBE_TIMEOUT)

        probes = await each_node(nodes, probe)
        problems = {n.name: "; ".join(p) for n in nodes if (p := probe_problems(probes[n.name]))}
        if problems:
            raise NodeFailures({name: GlobularError(text) for name, text in problems.items()})

        # one wheelhouse per distinct (packages, target), made at once
        wants = {n.name: wanted_for(spec, plugins, n) for n in nodes}
        targets = {n.name: Target.from_probe(probes[n.name]) for n in nodes}
        digests = {
            key: digest(*key) for key in {(wants[n.name], targets[n.name]) for n in nodes}
        }  # one read of a requirements file each
        names = {
            n.name: env_name(digests[(wants[n.name], targets[n.name])], probes[n.name]["executable"]) for n in nodes
        }
        needed = {(wants[n.name], targets[n.name]) for n in nodes if names[n.name] not in probes[n.name]["ready"]}
        cache = cluster.home / "wheels"
        if needed:
            reporter.begin("wheels", "wheelhouse (this machine)", len(needed))
        houses: dict[tuple[Wanted, Target], Wheelhouse] = {}

        async def make(key: tuple[Wanted, Target]) -> None:
            houses[key] = await resolve(key[0], key[1], cache)
            reporter.advance("wheels")

        try:
            await asyncio.gather(*(make(k) for k in needed))
        finally:
            if needed:
                reporter.end("wheels")

        async def build(node: NodeRecord) -> dict[str, Any]:
            facts, name = probes[node.name], names[node.name]
            started = time.monotonic()
            if name in facts["ready"]:
                python, cached = f"{facts['root']}/{name}/bin/python", True
            else:
                house = houses[(wants[node.name], targets[node.name])]
                needs = house.size * SPACE_FACTOR + SPACE_MARGIN
                if facts["free"] < needs:
                    raise NodeError(
                        node.name,
                        f"only {facts['free'] / 2**20:.0f} MB free under {facts['root']}; "
                        f"its environment needs about {needs / 2**20:.0f} MB",
                    )
                try:
                    request = {"root": root, "name": name, "installer": house.installer}
                    reply = await _call(
                        cluster,
                        node,
                        facts["executable"],
                        "env_build",
                        request,
                        input=house.tar(),
                        timeout=BUILD_TIMEOUT,
                    )
                except CommandError as exc:
                    if exc.returncode is None or exc.returncode == 3:
                        raise NodeError(node.name, f"building its environment failed: {exc.stderr.strip()}") from None
                    raise
                python, cached = reply["python"], reply["cached"]
            node.python = python
            node.data["env"] = {
                "name": name,
                "base_python": facts["executable"],
                "cached": cached,
                "root": facts["root"],
            }
            cluster.node_step(node, "env")
            reporter.advance("env")
            return {"name": name, "cached": cached, "seconds": round(time.monotonic() - started, 2)}

        done = await each_node(nodes, build)
    finally:
        reporter.end("env")
        cluster.save()
    return done


async def prune(cluster: PluginContext, provider: NodeProvider, keep: set[str]) -> dict[str, list[str]]:
    """Remove the environments on ``cluster``'s nodes but those named in ``keep``; node -> what went."""
    root = provider.envs_dir()

    async def one(node: NodeRecord) -> list[str]:
        reply = await _call(
            cluster, node, base_python(node), "env_prune", {"root": root, "keep": sorted(keep)}, timeout=120
        )
        removed: list[str] = reply["removed"]
        return removed

    return await each_node(cluster.nodes, one)


def clear_wheel_cache(cache: Path) -> int:
    """Empty this machine's wheelhouse cache (``~/.globular/wheels``); how many wheelhouses went."""
    count = sum(1 for p in cache.iterdir() if not p.name.startswith(".")) if cache.is_dir() else 0
    shutil.rmtree(cache, ignore_errors=True)
    return count
