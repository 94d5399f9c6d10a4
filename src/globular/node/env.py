"""Node environments, on the node: describe its Python, build a venv from shipped wheels, prune.

Its verbs (``env_probe``, ``env_build``, ``env_prune``) run on the node as ``python -c
SOURCE VERB REQUEST-JSON`` (:mod:`globular.node`) with the host's own Python, so it uses the
standard library only.  ``env_build`` reads a tar stream of wheels on stdin (its request is
the argument: it holds no secret).

An environment is ``<root>/<name>``: a symbolic link to the folder
``<root>/<name>-<token>`` in which it was built.  The link is made (atomically,
by rename) only once the venv is complete, so a build that was interrupted — a
killed process, a host that dropped — leaves a folder nothing trusts; the next
build of the same name removes it.  Builds of one name take an exclusive lock
(``<root>/.<name>.lock``): a second writer waits, then finds the first one's work.
The folder is never renamed, so the scripts pip writes keep working paths.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from typing import IO, Any

from globular.node.protocol import Refused, Request, verb

MARKER = "globular-env.json"
STALE_SECONDS = 3600  # a wheel folder this old belongs to no running build


def _root(req: Request) -> str:
    return os.path.realpath(os.path.expanduser(str(req["root"])))


def _ready(root: str, name: str) -> bool:
    link = os.path.join(root, name)
    return os.path.islink(link) and os.path.isfile(os.path.join(link, MARKER))


def _free_bytes(path: str) -> int:
    while not os.path.exists(path):
        path = os.path.dirname(path)
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _libc() -> tuple[str | None, str | None]:
    """("glibc", "2.36"), ("musl", "1.2"), or (None, None)."""
    try:
        _, version = (os.confstr("CS_GNU_LIBC_VERSION") or "").split()
        return "glibc", version
    except (AttributeError, OSError, ValueError):
        pass
    import glob
    import re

    for path in glob.glob("/lib/ld-musl-*.so.1"):
        out = subprocess.run([path], capture_output=True, text=True).stderr
        found = re.search(r"Version (\d+)\.(\d+)", out)
        if found:
            return "musl", f"{found[1]}.{found[2]}"
    return None, None


@verb()
def env_probe(req: Request) -> dict[str, Any]:
    """What building an environment here needs to know: the Python, its platform,
    whether it has ``venv``, the free space under ``root``, the environments ready there."""
    import importlib.util
    import platform
    import sysconfig

    root = _root(req)
    impl = sys.implementation.name
    nodot = f"{sys.version_info[0]}{sys.version_info[1]}"
    if impl == "cpython":
        abi = f"cp{nodot}{getattr(sys, 'abiflags', '')}"
    else:
        abi = (sysconfig.get_config_var("SOABI") or "none").split("-")[0].replace(".", "_")
    libc, libc_version = _libc()
    ready = []
    if os.path.isdir(root):
        ready = sorted(n for n in os.listdir(root) if not n.startswith(".") and _ready(root, n))
    return {
        "python": ".".join(map(str, sys.version_info[:3])),
        "executable": sys.executable,
        "implementation": {"cpython": "cp", "pypy": "pp"}.get(impl, impl),
        "nodot": nodot,
        "abi": abi,
        "system": sys.platform,
        "machine": platform.machine(),
        "platform": sysconfig.get_platform(),
        "libc": libc,
        "libc_version": libc_version,
        "venv": importlib.util.find_spec("venv") is not None,
        "root": root,
        "free": _free_bytes(root),
        "ready": ready,
        "cpus": os.cpu_count() or 1,
    }


def _die_with_parent() -> None:
    """Linux: end this process when the one that started it (sshd's session) goes."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - not Linux, or no libc: the SIGTERM handler still cleans up
        pass


def _receive_wheels(stream: IO[bytes], folder: str) -> list[str]:
    """Unpack the tar stream of wheels into ``folder``: plain files with plain names only."""
    import tarfile

    os.makedirs(folder, mode=0o700)
    names = []
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            name = member.name
            if not member.isreg() or "/" in name or name.startswith(".") or not name.endswith(".whl"):
                raise Refused(f"refusing {name!r} in the wheel stream: wheels only")
            source = tar.extractfile(member)
            assert source is not None  # a regular file
            with open(os.path.join(folder, name), "wb") as out:
                shutil.copyfileobj(source, out)
            names.append(name)
    return sorted(names)


def _tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            return "\n".join(f.read().splitlines()[-lines:])
    except OSError:
        return ""


@verb()
def env_build(req: Request) -> dict[str, Any]:
    """Build environment ``req["name"]`` under ``req["root"]`` from the wheels on stdin."""
    import fcntl
    import secrets
    import signal

    _die_with_parent()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the clean-up below runs
    started = time.monotonic()
    root, name = _root(req), req["name"]
    if "/" in name or name.startswith("."):
        raise Refused(f"bad environment name {name!r}")
    os.makedirs(root, mode=0o700, exist_ok=True)
    token = secrets.token_hex(4)
    wheels = os.path.join(root, f".{name}-{token}.wheels")
    target = os.path.join(root, f"{name}-{token}")
    log = os.path.join(root, f".{name}-{token}.log")
    try:
        # the wheels are received before the lock, so that every node's transfer runs at once
        received = _receive_wheels(sys.stdin.buffer, wheels)
        with open(os.path.join(root, f".{name}.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # a second writer waits here, then finds the first one's work
            link = os.path.join(root, name)
            if _ready(root, name):
                return {
                    "cached": True,
                    "python": os.path.join(link, "bin", "python"),
                    "seconds": time.monotonic() - started,
                }
            current = os.readlink(link) if os.path.islink(link) else None
            for entry in os.listdir(root):  # what an interrupted build left
                path = os.path.join(root, entry)
                if entry.startswith(f"{name}-") and entry != current:
                    shutil.rmtree(path, ignore_errors=True)  # venv folders are made under the lock: none is in use
                elif (
                    entry.startswith(f".{name}-")
                    and token not in entry
                    # wheels are received outside the lock: only old ones are surely abandoned
                    and time.time() - os.lstat(path).st_mtime > STALE_SECONDS
                ):
                    _remove(path)
            with open(log, "w") as out:
                made = subprocess.run(
                    [sys.executable, "-m", "venv", "--without-pip", target], stdout=out, stderr=subprocess.STDOUT
                )
            if made.returncode != 0:
                raise Refused(f"`{sys.executable} -m venv --without-pip {target}` failed:\n{_tail(log)}")
            python = os.path.join(target, "bin", "python")
            _install(python, wheels, received, req.get("installer") or {}, log)
            marker = {"name": name, "wheels": received, "base_python": sys.executable, "built": time.time()}
            with open(os.path.join(target, MARKER), "w") as f:
                json.dump(marker, f, indent=1)
            staged = os.path.join(root, f".{name}-{token}.link")
            os.symlink(os.path.basename(target), staged)
            os.replace(staged, link)  # the environment exists from here on
            os.unlink(log)
            if current and current != os.path.basename(target):
                shutil.rmtree(os.path.join(root, current), ignore_errors=True)
            return {
                "cached": False,
                "python": os.path.join(link, "bin", "python"),
                "seconds": time.monotonic() - started,
            }
    except BaseException as exc:
        if not _ready_target(root, name, target):
            shutil.rmtree(target, ignore_errors=True)
        if isinstance(exc, (SystemExit, KeyboardInterrupt)):  # stopped: nobody reads its log
            try:
                os.unlink(log)
            except OSError:
                pass
        raise
    finally:
        shutil.rmtree(wheels, ignore_errors=True)


def _uv_binary(wheels: str, name: str) -> str | None:
    """The uv binary out of uv's wheel ``name`` (None if it holds none)."""
    import zipfile

    with zipfile.ZipFile(os.path.join(wheels, name)) as wheel:
        member = next((m for m in wheel.namelist() if m.endswith(".data/scripts/uv")), None)
        if member is None:
            return None
        path = os.path.join(wheels, "uv")
        with wheel.open(member) as src, open(path, "wb") as out:
            shutil.copyfileobj(src, out)
    os.chmod(path, 0o700)
    return path


def _install(python: str, wheels: str, received: list[str], installer: dict[str, Any] | None, log: str) -> None:
    """Install the wheels into the venv of ``python``, offline: with uv when ``installer`` names
    its wheel (several times faster; that wheel is installed only if ``installer["install"]``),
    else — or if uv cannot run here — with pip, run from its own wheel."""
    installer = installer or {}
    name = installer.get("wheel") if installer.get("wheel") in received else None
    uv = _uv_binary(wheels, name) if name else None
    packages = [os.path.join(wheels, w) for w in received if w != name or installer.get("install")]
    if uv:
        argv = [
            uv,
            "pip",
            "install",
            "--python",
            python,
            "--offline",
            "--no-index",
            "--no-deps",
            "--no-cache",
            "--no-config",
            "--compile-bytecode",
            "--quiet",
            *packages,
        ]
        with open(log, "a") as out:
            try:
                if subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode == 0:
                    return
            except OSError as exc:  # a binary this host cannot run
                out.write(f"uv cannot run here ({exc}): installing with pip\n")
    pip = [w for w in received if w.startswith("pip-")]
    if not pip:
        raise Refused("no pip wheel in the wheel stream")
    argv = [
        python,
        os.path.join(wheels, pip[0], "pip"),
        "install",
        "--isolated",
        "--no-index",
        "--no-deps",
        "--no-cache-dir",
        "--disable-pip-version-check",
        "--no-warn-script-location",
        "--quiet",
        *packages,
    ]
    with open(log, "a") as out:
        installed = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if installed.returncode != 0:
        raise Refused(f"installing into {os.path.dirname(os.path.dirname(python))} failed:\n{_tail(log)}")


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        os.unlink(path)


def _ready_target(root: str, name: str, target: str) -> bool:
    link = os.path.join(root, name)
    return os.path.islink(link) and os.readlink(link) == os.path.basename(target)


def _unlink_if_there(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


@verb()
def env_prune(req: Request) -> dict[str, Any]:
    """Remove every environment under ``root`` but those named in ``keep``; what was removed."""
    import fcntl

    root = _root(req)
    keep = set(req.get("keep", []))
    removed: list[str] = []
    import re

    try:
        names = {e.lstrip(".").split("-")[0].split(".")[0] for e in os.listdir(root)}
    except (FileNotFoundError, NotADirectoryError):  # none here, or another node removed the folder just now
        return {"removed": removed, "root": root}
    # Nodes that share a file system prune the same folder at once.  The lock keeps a build out;
    # two pruners can still both hold a lock (one took the lock file another had just unlinked),
    # so every removal here tolerates a name that is already gone.
    for name in sorted(n for n in names - keep if re.fullmatch(r"[0-9a-f]{20}", n)):
        lock_path = os.path.join(root, f".{name}.lock")
        try:
            lock = open(lock_path, "a")  # noqa: SIM115 - held across the removal below
        except FileNotFoundError:  # another node removed the whole folder meanwhile
            break
        with lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # being built right now: leave it
            try:
                entries = os.listdir(root)
            except FileNotFoundError:
                entries = []
            for entry in entries:
                if entry == name or entry.startswith((f"{name}-", f".{name}-")):
                    path = os.path.join(root, entry)
                    if os.path.islink(path):
                        _unlink_if_there(path)
                    else:
                        shutil.rmtree(path, ignore_errors=True)
            _unlink_if_there(lock_path)
        removed.append(name)
    try:
        os.rmdir(root)
    except OSError:
        pass
    return {"removed": removed, "root": root}
