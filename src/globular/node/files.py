"""Files on a node: written atomically (0600), waited for, tailed; node folders made and removed."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from globular.node.facts import cpus
from globular.node.proc import _alive, sweep
from globular.node.protocol import Refused, Request, verb


@verb(any_python=True)
def wait_files(req: Request) -> Any:
    """Wait until every file exists and parses as JSON, or a watched process dies."""
    deadline = time.monotonic() + float(req.get("timeout", 30))
    while True:
        found = {}
        for path in req["files"]:
            try:
                with open(path) as f:
                    found[path] = json.load(f)
            except (OSError, ValueError):
                break
        if len(found) == len(req["files"]):
            return {"files": found}
        dead = [p for p in req.get("watch", []) if not _alive(p)]
        if dead:
            return {"dead": dead}
        if time.monotonic() >= deadline:
            return {"timeout": True}
        time.sleep(0.02)


@verb(any_python=True)
def write(req: Request) -> Any:
    """Write ``req["data"]`` (base64) to ``req["path"]`` atomically, with mode ``req["mode"]``;
    the folder is made (0700) if need be.  (It travels on stdin: it may be a secret.)"""
    import base64
    import tempfile

    path = os.path.expanduser(req["path"])
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, mode=0o700, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(base64.b64decode(req["data"]))
        os.chmod(tmp, int(req.get("mode", 0o600)))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return True


@verb(any_python=True)
def logs(req: Request) -> Any:
    """The last ``req["bytes"]`` of every file in the folder ``req["dir"]``: name -> text."""
    folder = os.path.expanduser(req["dir"])
    found = {}
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return {}
    for name in names:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            found[name] = tail({"path": path, "bytes": req.get("bytes", 65536)})
    return found


@verb(any_python=True)
def tail(req: Request) -> Any:
    try:
        with open(req["path"], "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - int(req.get("bytes", 4000))))
            return f.read().decode("utf-8", "replace")
    except OSError as exc:
        return f"(no log: {exc.strerror})"


@verb()
def prepare(req: Request) -> Any:
    """Make the node's folder (0700) and say what the node has: cores, Python, modules."""
    import importlib.util

    path = os.path.realpath(os.path.expanduser(req["dir"]))
    os.makedirs(path, mode=0o700, exist_ok=True)
    missing = [m for m in req.get("modules", []) if importlib.util.find_spec(m) is None]
    return {
        "workdir": path,
        "cpus": cpus(),
        "python": sys.executable,
        "version": ".".join(map(str, sys.version_info[:3])),
        "missing": missing,
    }


@verb(any_python=True)
def remove_dir(req: Request) -> Any:
    """Remove a node's folder, and its parent when that is left empty; only inside ``root``.
    With ``mark``, first stop the processes marked with it (see ``sweep``): one round trip."""
    import shutil

    if req.get("mark"):
        swept = sweep({"mark": req["mark"]})
        if swept["remaining"]:
            raise Refused(f"processes {[p['pid'] for p in swept['remaining']]} survived SIGKILL")

    root = os.path.realpath(os.path.expanduser(req["root"]))
    path = os.path.realpath(req["path"])
    if os.path.commonpath([root, path]) != root or path == root:
        raise Refused(f"refusing to remove {path}: not inside {root}")
    shutil.rmtree(path, ignore_errors=True)
    parent = os.path.dirname(path)
    if parent != root:
        try:
            os.rmdir(parent)
        except OSError:
            pass
    return not os.path.exists(path)


@verb(any_python=True)
def read_json(req: Request) -> Any:
    """The JSON file ``req["path"]``, or None."""
    try:
        with open(req["path"]) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
