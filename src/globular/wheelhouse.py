"""The wheelhouse of a node environment, made on this machine: what a node's Python takes (its
target: version, ABI, platform tags), what the cluster wants there (:class:`Wanted`), and the
wheels for that, resolved and downloaded once into ``~/.globular/wheels/<digest>`` by pip for the
node's platform.  Shipping them and building the environment is :mod:`globular.environment`'s."""

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

from globular.errors import BadInput, GlobularError
from globular.paths import private_dir
from globular.providers.base import CommandResult
from globular.providers.here import run_here
from globular.spec import ClusterSpec
from globular.state import NodeRecord

if TYPE_CHECKING:
    from globular.plugins.base import Plugin

log = logging.getLogger(__name__)

FORMAT = 1  # bump when what goes into an environment changes
RESOLVE_TIMEOUT = 1800.0  # s for pip to resolve and download one wheelhouse here
INDEX_TIMEOUT = 30.0


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


def clear_wheel_cache(cache: Path) -> int:
    """Empty this machine's wheelhouse cache (``~/.globular/wheels``); how many wheelhouses went."""
    count = sum(1 for p in cache.iterdir() if not p.name.startswith(".")) if cache.is_dir() else 0
    shutil.rmtree(cache, ignore_errors=True)
    return count
