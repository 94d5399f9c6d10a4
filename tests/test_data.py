"""Files in and out (issue 29): ``globular put`` / ``get`` on local nodes and on ssh test hosts
whose Python is a bare one; what is refused, what is sent again, what an interrupt leaves."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import testhosts
from conftest import bare_hosts, local_config, share_env_cache, ssh_config, wait_until
from globular.errors import BadInput, FileFailed, NodeError
from globular.node.transfer import PART, list_tree
from globular.transfer import TooBig, local_files, safe_rel

SHA = """
import globular, json, sys
client = globular.connect(sys.argv[1])
def sums(names):
    import hashlib, os
    out = {"cwd": os.getcwd()}
    for name in names:
        with open(name, "rb") as f:  # relative: the engine's working folder
            out[name] = hashlib.sha256(f.read()).hexdigest()
    return out
print(json.dumps(client[:].apply_sync(sums, json.loads(sys.argv[2]))))
client.close()
"""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def make_data(folder: Path, big: int) -> dict[str, str]:
    """A folder of three files (one of ``big`` bytes); their SHA-256 by the name the engines open."""
    (folder / "sub").mkdir(parents=True)
    (folder / "a.csv").write_text("x,y\n1,2\n")
    (folder / "sub" / "b.txt").write_text("hello\n")
    with (folder / "sub" / "big.bin").open("wb") as f:
        for _ in range(big // (1 << 20)):
            f.write(os.urandom(1 << 20))
    return {f"{folder.name}/{p.relative_to(folder).as_posix()}": sha256(p) for p in folder.rglob("*") if p.is_file()}


def engines_read(name: str, names: list[str]) -> list[dict]:
    done = subprocess.run(
        [sys.executable, "-c", SHA, name, json.dumps(names)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


# -- pure logic ------------------------------------------------------------------------------


def test_what_is_refused_before_anything_is_sent(tmp_path):
    data = tmp_path / "data"
    (data / "in").mkdir(parents=True)
    (data / "in" / "f.txt").write_text("1")
    (data / "here").symlink_to(data / "in" / "f.txt")  # inside the tree: its bytes are sent
    assert [f.rel for f in local_files([data])] == ["data/here", "data/in/f.txt"]
    (tmp_path / "latest").symlink_to(data)  # a link named: sent under its own name, as cp -r does
    assert [f.rel for f in local_files([tmp_path / "latest"])] == ["latest/here", "latest/in/f.txt"]
    (tmp_path / "latest").unlink()
    (data / "in").chmod(0)  # a folder put cannot read: named, not silently left out
    try:
        if os.geteuid() != 0:  # root reads it anyway
            with pytest.raises(FileFailed, match=r"cannot read .*data/in: Permission denied \(EACCES\)"):
                local_files([data])
    finally:
        (data / "in").chmod(0o755)
    (data / "out").symlink_to("/etc/hostname")
    with pytest.raises(BadInput, match=r"data/out: a link out of .*data \(to /etc/hostname\): refused"):
        local_files([data])
    (data / "out").unlink()
    os.mkfifo(data / "pipe")
    with pytest.raises(BadInput, match=r"data/pipe: not a regular file"):
        local_files([data])
    with pytest.raises(BadInput, match="no such file or folder"):
        local_files([tmp_path / "missing"])
    for bad in ("../x", "/etc/passwd", "a/../../b", ""):
        with pytest.raises(NodeError, match="outside the folder"):
            safe_rel(bad, "node001")
    assert safe_rel("a/b.txt", "node001") == "a/b.txt"


def test_a_listing_never_follows_links_and_hides_what_jupyter_hides(tmp_path):
    (tmp_path / "nb" / ".ipynb_checkpoints").mkdir(parents=True)
    (tmp_path / "nb" / "a.ipynb").write_text("{}")
    (tmp_path / "nb" / ".ipynb_checkpoints" / "a-checkpoint.ipynb").write_text("{}")
    (tmp_path / "nb" / ".hidden").write_text("x")
    (tmp_path / "nb" / f".b.ipynb{PART}1234").write_text("half")
    (tmp_path / "nb" / "etc").symlink_to("/etc")
    listing = list_tree(str(tmp_path / "nb"), skip=(".ipynb_checkpoints",), hidden=False)
    assert list(listing["files"]) == ["a.ipynb"] and listing["links"] == {"etc": "/etc"}
    everything = list_tree(str(tmp_path / "nb"))
    assert sorted(everything["files"]) == [".hidden", ".ipynb_checkpoints/a-checkpoint.ipynb", "a.ipynb"]
    assert list_tree(str(tmp_path / "none"))["kind"] is None


# -- local nodes ------------------------------------------------------------------------------


@pytest.mark.cluster
def test_put_and_get_on_local_nodes(cli, home, write_config, tmp_path):
    config = str(write_config(local_config()))
    sums = make_data(tmp_path / "data", 2 << 20)
    started = cli("-c", config, "start", "-s", "2", "files")
    assert started.returncode == 0, started.output
    try:
        put = cli("put", "files", str(tmp_path / "data"), ".", "--output", "json")
        again = cli("put", "files", str(tmp_path / "data"), ".", "--output", "json")
        seen = engines_read("files", sorted(sums))
        got = cli("get", "files", "data", str(tmp_path / "back"), "-n", "master", "-n", "node001")
        one = cli("get", "files", "data/a.csv", str(tmp_path / "one"))
    finally:
        stopped = cli("terminate", "-y", "files")
    assert put.returncode == 0, put.output
    assert json.loads(put.stdout)["result"]["sent"] == 6 and json.loads(again.stdout)["result"]["sent"] == 0
    assert json.loads(again.stdout)["result"]["skipped"] == 6
    assert len(seen) == 2 and all({k: v for k, v in s.items() if k != "cwd"} == sums for s in seen)
    assert got.returncode == 0, got.output
    for node in ("master", "node001"):
        assert {f"data/{p.relative_to(tmp_path / 'back' / node / 'data').as_posix()}": sha256(p)
                for p in (tmp_path / "back" / node / "data").rglob("*") if p.is_file()} == sums  # fmt: skip
    assert one.returncode == 0 and (tmp_path / "one" / "a.csv").read_text() == "x,y\n1,2\n", one.output
    assert stopped.returncode == 0, stopped.output


# -- ssh test hosts with a bare Python ----------------------------------------------------------

BIG = 200 << 20


def start_lab(cli, home: Path, tmp_path: Path, net, env_cache: Path):
    """``globular start lab`` on the test hosts ``net`` (the shared environment cache at hand):
    the hosts' ``remote_dir``, and what start did."""
    remote_dir = tmp_path / "hosts"
    share_env_cache(env_cache, home, remote_dir)
    config = ssh_config(tmp_path / "config", net, remote_dir)
    return remote_dir, cli("-c", str(config), "start", "lab", timeout=600)


@pytest.mark.cluster
@pytest.mark.skipif(testhosts.available() is not None, reason=str(testhosts.available()))
def test_put_and_get_on_three_ssh_hosts(cli, home, tmp_path, bare_python, env_cache):
    sums = make_data(tmp_path / "data", BIG)
    with bare_hosts(tmp_path / "net", 3, bare_python, env_cache) as net:
        remote_dir, started = start_lab(cli, home, tmp_path, net, env_cache)
        try:
            assert started.returncode == 0, started.output
            put = cli("put", "lab", str(tmp_path / "data"), ".", "--output", "json", timeout=600)
            assert put.returncode == 0, put.output
            seen = engines_read("lab", sorted(sums))
            again = cli("put", "lab", str(tmp_path / "data"), ".", "--output", "json", timeout=300)
            got = cli("get", "lab", "data", str(tmp_path / "back"), *(a for n in ("master", "node001", "node002")
                      for a in ("-n", n)), timeout=600)  # fmt: skip
            with (
                small_disk(tmp_path / "full-there", host=net.hosts[1]) as there,
                small_disk(tmp_path / "full-here") as here,
            ):
                full_there = cli("put", "lab", str(tmp_path / "data"), str(there), "-n", "node001", timeout=300)
                full_here = cli("get", "lab", "data", str(here), timeout=300)
            net.limit_rate("100mbit")  # 200 MB: 16 s a host, however fast this machine
            try:
                interrupted = interrupt_a_put(tmp_path, remote_dir)
            finally:
                net.limit_rate(None)
        finally:
            stopped = cli("terminate", "-y", "lab", timeout=300)
    result = json.loads(put.stdout)["result"]
    assert result["sent"] == 9 and result["bytes"] == 3 * sum(
        (tmp_path / "data").joinpath(*k.split("/")[1:]).stat().st_size for k in sums
    )
    assert len(seen) == 3 and all({k: v for k, v in s.items() if k != "cwd"} == sums for s in seen), seen
    assert json.loads(again.stdout)["result"]["sent"] == 0, again.stdout  # nothing changed: nothing sent
    assert got.returncode == 0, got.output
    for node in ("master", "node001", "node002"):
        back = tmp_path / "back" / node / "data"
        assert {f"data/{p.relative_to(back).as_posix()}": sha256(p) for p in back.rglob("*") if p.is_file()} == sums
    # a full disk, there or here, is said to be one, with the file's path: not a lost connection
    assert full_there.returncode == 1 and "lost its connection" not in full_there.stderr, full_there.output
    assert f"node001: cannot write {tmp_path / 'full-there'}/data/" in full_there.stderr, full_there.stderr
    assert f"free in {tmp_path / 'full-there'}/data/sub for 209.7 MB (a full disk)" in full_there.stderr, (
        full_there.stderr
    )
    assert full_here.returncode == 1 and f"cannot write {tmp_path / 'full-here'}/data/" in full_here.stderr
    assert "No space left on device (ENOSPC)" in full_here.stderr, full_here.stderr
    assert interrupted["returncode"] == 130, interrupted
    assert interrupted["complete_looking"] == [] and interrupted["parts_left"] == [], interrupted
    assert stopped.returncode == 0, stopped.output


@contextlib.contextmanager
def small_disk(path: Path, size: str = "64k", host=None):
    """A tmpfs of ``size`` at ``path``, here or in test host ``host``'s mount namespace (its sshd
    runs under `ip netns exec`, which has one of its own): a disk that fills up at once;
    unmounted after, whatever happened."""
    path.mkdir()
    inside = ["nsenter", "-t", str(host.sshd_pid), "-m", "--"] if host is not None else []
    testhosts.sh(*inside, "mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path))
    try:
        yield path
    finally:
        testhosts.sh(*inside, "umount", "-l", str(path), check=False)


def interrupt_a_put(tmp_path: Path, remote_dir: Path) -> dict:
    """SIGINT to a `globular put` of a new 200 MB file while its bytes flow: what it leaves."""
    new = tmp_path / "fresh"
    new.mkdir()
    with (new / "huge.bin").open("wb") as f:
        for _ in range(BIG // (1 << 20)):
            f.write(os.urandom(1 << 20))
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent))
    proc = subprocess.Popen([sys.executable, "-m", "globular", "put", "lab", str(new), "."], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip

    def parts() -> list[Path]:
        return [p for p in remote_dir.rglob(f".huge.bin{PART}*")]

    assert wait_until(lambda: any(p.stat().st_size > 0 for p in parts()), timeout=120), "no transfer started"
    os.kill(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    size = (new / "huge.bin").stat().st_size
    finals = [p for p in remote_dir.rglob("fresh/huge.bin")]
    return {
        "returncode": proc.returncode,
        "stderr": err.decode()[-2000:],
        "complete_looking": [str(p) for p in finals if p.stat().st_size != size],  # a final name is whole, or absent
        "parts_left": [str(p) for p in parts()],
    }


def test_each_notebook_copy_is_whole_and_only_what_changed_travels(tmp_path):
    """save_notebooks through a local node's runner: a second copy with nothing changed is the
    first; a changed file makes a new copy whose unchanged files share the first's bytes, and a
    file gone from the master is gone from the new copy."""
    import asyncio

    from globular.ipcluster.keep import save_notebooks
    from globular.ipcluster.settings import IPClusterSettings
    from globular.providers.local import LocalRunner
    from globular.state import NodeRecord

    folder = tmp_path / "nb"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.ipynb").write_text("{}")
    (folder / "sub" / "b.ipynb").write_text('{"b": 1}')
    (folder / "gone.ipynb").write_text("{}")
    (folder / ".ipynb_checkpoints").mkdir()
    (folder / ".ipynb_checkpoints" / "a-checkpoint.ipynb").write_text("{}")
    master = NodeRecord(name="master", address="127.0.0.1", workdir=str(tmp_path / "w"), cores=1, python=sys.executable)
    settings = IPClusterSettings(enable_notebook=True, notebook_directory=str(folder))
    home = tmp_path / "home"

    def save():
        return asyncio.run(save_notebooks("c", "ssh", master, LocalRunner(master), settings, home))

    first = save()
    assert first.files == 3 and first.copied == 3 and not (first.folder / ".ipynb_checkpoints").exists()
    assert first.source == str(folder)  # the master's folder, not the temporary one here
    assert save().folder == first.folder  # nothing changed: the last copy stands
    os.utime(folder / "a.ipynb", (1, 1))  # changed (its time)
    (folder / "gone.ipynb").unlink()
    second = save()
    assert second.folder != first.folder and second.copied == 1 and second.files == 2
    assert sorted(p.relative_to(second.folder).as_posix() for p in second.folder.rglob("*.ipynb")) == [
        "a.ipynb",
        "sub/b.ipynb",
    ]
    assert (second.folder / "sub" / "b.ipynb").stat().st_ino == (first.folder / "sub" / "b.ipynb").stat().st_ino
    assert (first.folder / "gone.ipynb").exists()  # earlier copies are left as they were
    assert (second.folder / "a.ipynb").stat().st_mode & 0o222 == 0  # a snapshot: no edit in place reaches older copies
    too_small = IPClusterSettings(enable_notebook=True, notebook_directory=str(folder), notebook_save_limit="3 B")
    with pytest.raises(TooBig, match=r"the notebooks of .* alone hold 10 B, over notebook_save_limit \(3 B\)"):
        asyncio.run(save_notebooks("c", "ssh", master, LocalRunner(master), too_small, home))


def test_a_whole_home_as_the_notebook_folder_keeps_the_notebooks_and_names_the_rest(tmp_path):
    """notebook_directory unset: the folder is the master's home, with a conda install, a venv,
    links, a FIFO and a big file in it.  The notebooks and the small files beside them are
    kept, up to notebook_save_limit; the rest is left out and named, never a refusal; a copy
    killed half-way (its .part folder) is swept by the next save."""
    import asyncio

    from globular.ipcluster.keep import left_out_text, save_notebooks
    from globular.ipcluster.settings import IPClusterSettings
    from globular.providers.local import LocalRunner
    from globular.state import NodeRecord

    folder = tmp_path / "home"
    (folder / "project").mkdir(parents=True)
    (folder / "project" / "run.ipynb").write_text("{}" * 100)
    (folder / "project" / "small.csv").write_text("x\n" * 10)
    (folder / "big.h5").write_bytes(b"\0" * 5000)
    (folder / "miniforge3" / "conda-meta").mkdir(parents=True)
    (folder / "miniforge3" / "lib.py").write_text("pass\n")
    (folder / "env" / "lib").mkdir(parents=True)
    (folder / "env" / "pyvenv.cfg").write_text("home = /usr\n")
    (folder / ".bashrc").write_text("alias x=y\n")
    (folder / "etc").symlink_to("/etc")
    (folder / "shadow").symlink_to("/etc/shadow")
    os.mkfifo(folder / "pipe")
    master = NodeRecord(name="master", address="127.0.0.1", workdir=str(tmp_path / "w"), cores=1, python=sys.executable)
    settings = IPClusterSettings(enable_notebook=True, notebook_directory=str(folder), notebook_save_limit="1 kB")
    home = tmp_path / "globular"
    stale = home / "notebooks" / "c-ssh" / ".20260101-000000.part-999999"  # a save killed with kill -9
    stale.mkdir(parents=True)
    (stale / "half.ipynb").write_text("{")
    saved = asyncio.run(save_notebooks("c", "ssh", master, LocalRunner(master), settings, home))
    kept = sorted(p.relative_to(saved.folder).as_posix() for p in saved.folder.rglob("*") if p.is_file())
    assert kept == ["project/run.ipynb", "project/small.csv"]
    assert sorted(saved.left_out) == [
        "big.h5 (5.0 KB: over notebook_save_limit)",
        "env/ (a Python environment)",
        "etc (a link to /etc)",
        "miniforge3/ (a Python environment)",
        "pipe (not a regular file)",
        "shadow (a link to /etc/shadow)",
    ]
    assert left_out_text(saved.left_out, shown=2).endswith(" and 4 more (--output json lists them)")
    assert not stale.exists()


# -- hostile nodes: what a get brings home ---------------------------------------------------------


def local_fetch(tmp_path: Path, folder: Path, before_copy=None) -> Path:
    """``fetch`` of ``folder`` from a local node (this machine) into ``tmp_path/back``, in process;
    ``before_copy(path)`` runs on each node file after the listing, just before its copy (where
    a hostile node changes it)."""
    import asyncio

    from globular.providers.local import LocalRunner
    from globular.state import NodeRecord
    from globular.transfer import fetch

    class Runner(LocalRunner):
        async def download(self, remote, local, size, mtime, progress):
            if before_copy is not None:
                before_copy(remote)
            return await super().download(remote, local, size, mtime, progress)

    node = NodeRecord(name="master", address="127.0.0.1", workdir=str(tmp_path / "w"), cores=1, python=sys.executable)
    runner = Runner(node)
    asyncio.run(fetch([node], lambda _: runner, lambda _: str(folder), tmp_path / "back"))
    return tmp_path / "back" / folder.name


def test_get_never_brings_home_setuid_setgid_or_sticky_bits(tmp_path):
    folder = tmp_path / "scratch"
    folder.mkdir()
    for name, mode in (("setuid", 0o4755), ("setgid", 0o2750), ("sticky", 0o1777), ("plain", 0o640)):
        (folder / name).write_text("#!/bin/sh\n")
        os.chmod(folder / name, mode)
    back = local_fetch(tmp_path, folder)
    umask = os.umask(0o022)
    os.umask(umask)
    for name, mode in (("setuid", 0o755), ("setgid", 0o750), ("sticky", 0o777), ("plain", 0o640)):
        assert (back / name).stat().st_mode & 0o7777 == mode & ~umask, name


def test_a_local_get_refuses_a_file_swapped_for_a_link_after_the_listing(tmp_path):
    """The node's file is listed, then swapped for a link to a secret before it is copied (a hook
    in the runner's download makes the swap happen exactly there): the copy refuses it."""
    from globular.errors import NodeFailures

    secret = tmp_path / "shadow"
    secret.write_text("root:TOP-SECRET-HASH:19000:0:99999:7:::\n")
    folder = tmp_path / "scratch"
    folder.mkdir()
    (folder / "notes.txt").write_text("harmless\n")

    def swap(remote: str) -> None:
        os.unlink(remote)
        os.symlink(secret, remote)  # between the listing and the copy

    with pytest.raises(NodeFailures) as failed:
        local_fetch(tmp_path, folder, swap)
    assert "notes.txt: refused, it is a link now" in str(failed.value)
    back = tmp_path / "back"
    assert not any(b"TOP-SECRET" in p.read_bytes() for p in back.rglob("*") if p.is_file())


def test_a_local_get_reads_no_more_than_the_listed_size(tmp_path):
    folder = tmp_path / "scratch"
    folder.mkdir()
    (folder / "log.txt").write_text("0123456789")

    def grow(remote: str) -> None:
        with open(remote, "a") as f:
            f.write("and a lot more written meanwhile")

    back = local_fetch(tmp_path, folder, grow)
    assert (back / "log.txt").read_text() == "0123456789"


@pytest.mark.cluster
@pytest.mark.skipif(testhosts.available() is not None, reason=str(testhosts.available()))
def test_a_get_over_ssh_drops_setuid_and_carries_names_that_are_not_utf8(cli, home, tmp_path, bare_python, env_cache):
    with bare_hosts(tmp_path / "net", 1, bare_python, env_cache) as net:
        _, started = start_lab(cli, home, tmp_path, net, env_cache)
        try:
            assert started.returncode == 0, started.output
            [master] = json.loads((home / "clusters" / "lab.json").read_text())["nodes"]
            scratch = Path(master["workdir"]) / "scratch"
            scratch.mkdir()
            (scratch / "tool").write_text("#!/bin/sh\n")
            os.chmod(scratch / "tool", 0o4755)
            odd = os.fsencode(scratch) + b"/caf\xe9-\xff.txt"  # Latin-1 and a stray byte: not UTF-8
            with open(odd, "wb") as f:
                f.write(b"odd name\n")
            got = cli("get", "lab", "scratch", str(tmp_path / "back"), timeout=300)
        finally:
            stopped = cli("terminate", "-y", "lab", timeout=300)
    assert got.returncode == 0, got.output
    back = tmp_path / "back" / "scratch"
    assert (back / "tool").stat().st_mode & 0o7000 == 0 and (back / "tool").stat().st_mode & 0o111
    with open(os.fsencode(back) + b"/caf\xe9-\xff.txt", "rb") as f:
        assert f.read() == b"odd name\n"
    assert stopped.returncode == 0, stopped.output


def test_the_next_transfer_sweeps_what_a_killed_one_left_and_spares_a_live_one(tmp_path):
    """kill -9 of a put or a get leaves its temporary file (hidden from listings) for ever: the
    next transfer of that folder removes the ones untouched for STALE_PART, on the node and here,
    and leaves a fresh one (a transfer running beside it) alone."""
    from globular.node.transfer import STALE_PART

    folder = tmp_path / "results"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "a.csv").write_text("1\n")
    old = time.time() - STALE_PART - 60

    def part(where: Path, name: str, stale: bool) -> Path:
        path = where / f".{name}.part-0123abcd"
        path.write_bytes(b"\0" * 1000)
        if stale:
            os.utime(path, (old, old))
        return path

    node_stale, node_live = part(folder / "sub", "big.h5", True), part(folder, "live.h5", False)
    back = tmp_path / "back" / "results" / "sub"
    back.mkdir(parents=True)
    here_stale, here_live = part(back, "a.csv", True), part(back.parent, "other", False)
    landed = local_fetch(tmp_path, folder)
    assert (landed / "sub" / "a.csv").read_text() == "1\n"
    assert not node_stale.exists() and not here_stale.exists()
    assert node_live.exists() and here_live.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs")
def test_a_full_disk_here_is_named_with_the_file_not_a_traceback(tmp_path):
    from globular.errors import FileFailed, NodeFailures

    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "big.bin").write_bytes(os.urandom(200_000))
    with small_disk(tmp_path / "back"), pytest.raises(NodeFailures) as caught:
        local_fetch(tmp_path, folder)
    assert isinstance(caught.value.failures["master"], FileFailed)
    assert str(caught.value) == (
        f"master: cannot write {tmp_path / 'back' / 'results' / 'big.bin'}: No space left on device (ENOSPC)"
    )
    assert not any(p.name.startswith(".big.bin.part-") for p in (tmp_path / "back").rglob("*"))
