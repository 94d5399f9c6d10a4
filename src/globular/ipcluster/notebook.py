"""The notebook half of IPCluster: JupyterLab on the master, HTTPS only, password only.

The password is hashed here (argon2, jupyter_server's own ``passwd``) and only
the hash goes to the master, inside the server's config file (0600, on stdin,
never on a command line).  A password globular made up is kept on this machine
only, in ``~/.globular/ipcluster/<cluster>-<region>-notebook.json`` (0600), so
that ``globular notebook NAME`` can show it again.  The certificate is kept in
``~/.globular/tls/<cluster>-<region>/`` across starts of the same cluster.

Kernels run with the master's IPYTHONDIR, whose default profile holds the
controller's client connection file: ``Client()`` needs no argument.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from globular.errors import BadInput, GlobularError, NodeError
from globular.ipcluster.roles import DATA_KEY, master_is_here
from globular.ipcluster.settings import IPClusterSettings
from globular.paths import globular_home, write_private
from globular.plugins.base import PluginContext
from globular.providers.base import ProcessSpec
from globular.registry import make_provider
from globular.state import NodeRecord, StateStore

if TYPE_CHECKING:
    from globular.ipcluster.tls import CertPair

NOTEBOOK = "notebook"  # process role


@dataclass(frozen=True)
class NotebookInfo:
    url: str
    port: int
    directory: str
    password: str | None  # None when it is the config's notebook_passwd
    fingerprint: str
    cert_note: str = ""


def notebook_file(ctx: PluginContext) -> Path:
    """Where this machine keeps the notebook's URL (and a generated password), 0600."""
    return ctx.home / "ipcluster" / f"{ctx.name}-{ctx.region}-notebook.json"


def tls_folder(home: Path, name: str, region: str) -> Path:
    return home / "tls" / f"{name}-{region}"


def notebook_certificate(ctx: PluginContext, settings: IPClusterSettings, address: str) -> CertPair:
    from globular.ipcluster.tls import (  # cryptography loads only when a notebook is wanted
        kept_certificate,
        load_certificate,
    )

    """The certificate the server will use: the user's, or the cluster's kept self-signed one."""
    if settings.notebook_certfile or settings.notebook_keyfile:
        if not (settings.notebook_certfile and settings.notebook_keyfile):
            raise GlobularError("notebook_certfile and notebook_keyfile go together: set both, or neither")
        try:
            return load_certificate(
                Path(settings.notebook_certfile).expanduser(), Path(settings.notebook_keyfile).expanduser()
            )
        except (OSError, ValueError) as exc:
            raise GlobularError(str(exc)) from None
    return kept_certificate(tls_folder(ctx.home, ctx.name, ctx.region), address)


def notebook_folder(settings: IPClusterSettings) -> str:
    """Where the notebook server starts on the master: ``notebook_directory`` (relative to the
    home folder), else the home folder."""
    directory = settings.notebook_directory
    if not directory:
        return "~"
    if directory.startswith(("/", "~")):
        return directory
    return f"~/{directory}"


async def start_notebook(
    ctx: PluginContext, settings: IPClusterSettings, master: NodeRecord, ipython_dir: str, cert: CertPair
) -> NotebookInfo:
    """Start JupyterLab on the master and wait until it answers over HTTPS."""
    from jupyter_server.auth.security import passwd

    runner = ctx.runner(master)
    # the top page (labtop) needs globular and this machine's records: a master that is this machine
    here = master_is_here(ctx)
    modules = ["jupyterlab", "globular"] if here else ["jupyterlab"]
    facts = await runner.nodeproc("prepare", {"dir": notebook_folder(settings), "modules": modules})
    top_page = here and "globular" not in facts["missing"]
    if "jupyterlab" in facts["missing"]:
        raise NodeError(
            master.name, f"jupyterlab is not installed for {facts['python']}: enable_notebook needs it on the master"
        )
    directory = facts["workdir"]

    password = settings.notebook_passwd or secrets.token_urlsafe(12)
    hashed = await asyncio.to_thread(passwd, password)
    jupyter = f"{master.workdir}/jupyter"
    certfile, keyfile = f"{jupyter}/tls/cert.pem", f"{jupyter}/tls/key.pem"
    await runner.write_file(certfile, cert.cert, 0o600)
    await runner.write_file(keyfile, cert.key, 0o600)
    config = server_config(settings, master, directory, (certfile, keyfile), hashed)
    if top_page:
        from globular.ipcluster.labtop import EXTENSION

        config["ServerApp"]["jpserver_extensions"] = {EXTENSION: True}
        config["ServerApp"]["tornado_settings"] = {"globular_home": str(ctx.home)}
    await runner.write_file(
        f"{jupyter}/config/jupyter_server_config.json", json.dumps(config, indent=1).encode(), 0o600
    )
    env = {
        "JUPYTER_CONFIG_DIR": f"{jupyter}/config",
        "JUPYTER_RUNTIME_DIR": f"{jupyter}/runtime",
        "IPYTHONDIR": ipython_dir,
        "GLOBULAR_CLUSTER": ctx.name,
        "GLOBULAR_NODE": master.name,
    }
    spec = ProcessSpec(
        argv=[master.python, "-m", "jupyterlab", "--no-browser"],
        log=f"{master.workdir}/logs/notebook.log",
        role=NOTEBOOK,
        env=env,
        cwd=directory,
    )
    ctx.reporter.begin("notebook", "notebook server on master", 1)
    procs = await runner.spawn([spec])
    ctx.track(master, procs)
    info_file = f"{jupyter}/runtime/jpserver-{procs[0].pid}.json"
    server = (await runner.wait_files([info_file], watch=procs, timeout=120))[info_file]
    port = int(server["port"])
    own = not (settings.notebook_certfile or settings.notebook_keyfile)
    await wait_https(ctx, master, port, cert.cert if own else None, procs[0].log or "")
    ctx.reporter.advance("notebook")
    ctx.reporter.end("notebook")
    return keep_notebook(ctx, master, port, directory, None if settings.notebook_passwd else password, cert, top_page)


def server_config(
    settings: IPClusterSettings, master: NodeRecord, directory: str, tls: tuple[str, str], hashed: str
) -> dict[str, Any]:
    """The Jupyter server's config: HTTPS with ``tls`` (cert, key files), the password's hash
    ``hashed`` and no token, on the master's address."""
    certfile, keyfile = tls
    return {
        "ServerApp": {
            "ip": master.address,
            "port": settings.notebook_port,
            "port_retries": 50,
            "open_browser": False,
            "root_dir": directory,
            "certfile": certfile,
            "keyfile": keyfile,
            "allow_root": True,
            "allow_remote_access": True,
        },
        "IdentityProvider": {"token": ""},
        "PasswordIdentityProvider": {
            "hashed_password": hashed,
            "password_required": True,
            "allow_password_change": False,
        },
        "LabApp": {"check_for_updates_class": "jupyterlab.NeverCheckForUpdate"},
    }


def keep_notebook(
    ctx: PluginContext,
    master: NodeRecord,
    port: int,
    directory: str,
    password: str | None,
    cert: CertPair,
    top_page: bool,
) -> NotebookInfo:
    """The running server, kept here (``<cluster>-<region>-notebook.json``, 0600, with a password
    globular made up) and in the record (without it)."""
    url = f"https://{master.address}:{port}/"
    info = NotebookInfo(
        url=url, port=port, directory=directory, password=password, fingerprint=cert.fingerprint, cert_note=cert.note
    )
    saved: dict[str, Any] = {
        "url": url,
        "address": master.address,
        "port": port,
        "directory": directory,
        "fingerprint": cert.fingerprint,
    }
    if top_page:
        saved["top"] = f"{url}globular/top/{ctx.name}"
    if info.password:
        saved["password"] = info.password
    write_private(notebook_file(ctx), json.dumps(saved, indent=2).encode())
    ctx.plugin_data(DATA_KEY)["notebook"] = {k: v for k, v in saved.items() if k != "password"}
    ctx.save()
    return info


def https_context(cert_pem: bytes | None) -> ssl.SSLContext:
    """Trusts exactly the cluster's own certificate (hostname checked against its names);
    with None (a certificate the user supplied, maybe for a name only), checks nothing."""
    if cert_pem is None:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    return ssl.create_default_context(cadata=cert_pem.decode())


async def wait_https(
    ctx: PluginContext, master: NodeRecord, port: int, cert_pem: bytes | None, log: str, timeout: float = 60
) -> None:
    """Wait until the server answers ``GET /api`` over HTTPS with its certificate."""
    import urllib.error
    import urllib.request

    host, local_port = await ctx.runner(master).forward_port(master.address, port)
    url = f"https://{host}:{local_port}/api"
    context = https_context(cert_pem)

    def get() -> int:
        with urllib.request.urlopen(url, context=context, timeout=5) as reply:
            status: int = reply.status
            return status

    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            if await asyncio.to_thread(get) == 200:
                return
        except (urllib.error.URLError, OSError) as exc:
            last = exc
        if time.monotonic() >= deadline:
            tail = await ctx.runner(master).tail(log)
            raise NodeError(master.name, f"the notebook server did not answer {url} within {timeout:g}s ({last})", tail)
        await asyncio.sleep(0.2)


async def stop_notebook(ctx: PluginContext) -> int:
    """Stop the notebook server (by pid) and forget its local file; the certificate is kept."""
    stopped = 0
    for node in ctx.nodes:
        procs = node.processes_with_role(NOTEBOOK)
        if procs:
            await ctx.stop_processes(node, procs)
            stopped += len(procs)
    notebook_file(ctx).unlink(missing_ok=True)
    data = ctx.plugin_data(DATA_KEY)
    if data:
        data.pop("notebook", None)
    return stopped


def saved_notebook(home: Path, name: str, region: str) -> dict[str, Any]:
    path = home / "ipcluster" / f"{name}-{region}-notebook.json"
    try:
        saved: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        raise GlobularError(f"cluster {name!r} runs no notebook server (enable_notebook = true starts one)") from None
    return saved


def notebook_info(name: str) -> dict[str, Any]:
    """The notebook server of cluster ``name``: url, port, directory, fingerprint, and the
    password when globular made it up (it is kept on this machine only, 0600)."""
    home = globular_home()
    record = StateStore(home).get(name)
    return saved_notebook(home, record.name, record.region)


async def forward_notebook(name: str, local_port: int, ready: Callable[[str], None]) -> None:
    """Forward ``127.0.0.1:local_port`` to the notebook server on the master over ssh,
    until cancelled; ``ready(url)`` is called once it listens."""
    home = globular_home()
    record = StateStore(home).get(name)
    info = notebook_info(name)
    provider = make_provider(record.spec, cluster=record.name, home=home)
    try:
        runner = provider.runner(record.master)
        if runner.direct:
            raise BadInput(f"the master of {name!r} is reached from here directly: open {info['url']}")
        host, port = await runner.forward_port(info["address"], info["port"], local_port)
        ready(f"https://{host}:{port}/")
        await asyncio.Event().wait()
    finally:
        await provider.close()
