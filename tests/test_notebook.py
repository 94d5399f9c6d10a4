"""The notebook server on the master: HTTPS only, password only, kernels that reach the engines."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import stat

import psutil
import pytest

from conftest import gone, read_record, recorded_pids
from notebook_client import Jupyter

pytestmark = pytest.mark.cluster

CONFIG = (
    "[global]\ndefault_template = t\n"
    "[cluster t]\ncluster_size = 2\ncores_per_node = 1\nplugins = ipcluster\n"
    "[plugin ipcluster]\nsetup_class = ipcluster\nenable_notebook = true\n{extra}"
)
MAP = (
    "from ipyparallel import Client\nrc = Client()\nprint(sorted(rc.ids), rc[:].map_sync(lambda x: x**30, range(8)))\n"
)


def summary_value(stdout: str, label: str) -> str:
    line = next(line for line in stdout.splitlines() if line.startswith(label + " "))
    return line[len(label) :].strip()


def served_certificate(port: int) -> bytes:
    return ssl.get_server_certificate(("127.0.0.1", port)).encode()


def test_notebook_https_password_kernel_map_and_stop(cli, home, write_config, tmp_path):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))  # the configured port is in use (ours, held open): the next free one is taken
    taken.listen()
    port_wanted = taken.getsockname()[1]
    notebooks = tmp_path / "work" / "notebooks"
    config = str(
        write_config(CONFIG.format(extra=f"notebook_directory = {notebooks}\nnotebook_port = {port_wanted}\n"))
    )
    try:
        started = cli("-c", config, "start", "nb")
    finally:
        taken.close()
    assert started.returncode == 0, started.output
    url = summary_value(started.stdout, "notebook")
    password = summary_value(started.stdout, "password")
    port = int(url.rsplit(":", 1)[1].strip("/"))
    assert url == f"https://127.0.0.1:{port}/" and port != port_wanted
    assert len(password) >= 16 and started.stdout.count(password) == 1
    assert notebooks.is_dir()

    # the password: only its hash on the master (0600), nowhere else but the local notebook file
    record = read_record(home, "nb")
    master = record["nodes"][0]
    server_config = tmp_path / master["workdir"] / "jupyter" / "config" / "jupyter_server_config.json"
    assert stat.S_IMODE(server_config.stat().st_mode) == 0o600
    hashed = json.loads(server_config.read_text())["PasswordIdentityProvider"]["hashed_password"]
    assert hashed.startswith("argon2:") and password not in server_config.read_text()
    kept = home / "ipcluster" / "nb-local-notebook.json"
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600 and json.loads(kept.read_text())["password"] == password
    for path in [*home.rglob("*"), *tmp_path.joinpath(master["workdir"]).rglob("*")]:
        if path.is_file() and path != kept:
            assert password.encode() not in path.read_bytes(), path
    for pid in recorded_pids(record):
        for proc in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
            assert password not in " ".join(proc.cmdline())

    # TLS with the cluster's own certificate, verified (it names 127.0.0.1)
    cert_pem = (home / "tls" / "nb-local" / "cert.pem").read_bytes()
    assert ssl.PEM_cert_to_DER_cert(served_certificate(port).decode()) == ssl.PEM_cert_to_DER_cert(cert_pem.decode())
    context = ssl.create_default_context(cadata=cert_pem.decode())

    # plain HTTP gets no answer at all
    plain = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    with pytest.raises((ConnectionError, http.client.HTTPException)):
        plain.request("GET", "/api/contents")
        plain.getresponse()
    plain.close()

    # no password: the API refuses, pages send you to the login page
    anonymous = Jupyter(url, context)
    assert anonymous.request("GET", "/api/contents")[0] == 403
    status, headers, _ = anonymous.request("GET", "/lab")
    assert status == 302 and headers["Location"].startswith("/login")

    # a wrong password: the login page again, and still no API
    wrong = Jupyter(url, context)
    status, body = wrong.login(password + "x")
    assert status == 401 and b"Invalid credentials" in body
    assert wrong.request("GET", "/api/contents")[0] == 403

    # the password: a notebook made through the REST API, a kernel that maps over the engines
    user = Jupyter(url, context)
    status, _ = user.login(password)
    assert status == 302
    status, _, body = user.request("POST", "/api/contents", {"type": "notebook"})
    assert status == 201, body
    path = json.loads(body)["path"]
    assert (notebooks / path).exists()
    status, _, body = user.request(
        "POST", "/api/sessions", {"path": path, "type": "notebook", "kernel": {"name": "python3"}}
    )
    assert status == 201, body
    kernel = json.loads(body)["kernel"]["id"]
    printed = user.execute(kernel, MAP)
    assert printed.strip() == f"[0, 1] {[x**30 for x in range(8)]}"
    # globular's Client is a drop-in there too (where globular is installed: on this machine's
    # notebook; a remote master's environment has ipyparallel, whose Client() is the same there)
    dropin = user.execute(kernel, MAP.replace("from ipyparallel import Client", "from globular import Client"))
    assert dropin.strip() == f"[0, 1] {[x**30 for x in range(8)]}"

    shown = cli("notebook", "nb")
    assert shown.returncode == 0 and url in shown.stdout and password in shown.stdout

    # IPClusterStop stops the server (and its kernel) by pid
    server_pids = recorded_pids(read_record(home, "nb"), "notebook")
    kernels = [p.pid for p in psutil.Process(server_pids[0]).children(recursive=True)]
    assert kernels
    stopped = cli("runplugin", "ipclusterstop", "nb")
    assert stopped.returncode == 0, stopped.output
    assert all(gone(pid) for pid in server_pids + kernels)
    assert not kept.exists()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    missing = cli("notebook", "nb")
    assert missing.returncode == 1 and "runs no notebook server" in missing.stderr
    assert cli("terminate", "-y", "nb").returncode == 0
    assert (home / "tls" / "nb-local" / "cert.pem").read_bytes() == cert_pem  # kept for the next start


def test_certificate_is_kept_across_starts_and_terminate_stops_the_server(cli, home, write_config):
    config = str(write_config(CONFIG.format(extra="notebook_passwd = correct horse battery\n")))
    first = cli("-c", config, "start", "nb2")
    assert first.returncode == 0, first.output
    assert "the notebook_passwd of your config" in first.stdout and "correct horse" not in first.stdout
    assert "correct horse" not in (home / "clusters" / "nb2.json").read_text()  # not kept in the state record
    port = int(summary_value(first.stdout, "notebook").rsplit(":", 1)[1].strip("/"))
    cert = served_certificate(port)
    context = ssl.create_default_context(cadata=cert.decode())
    user = Jupyter(f"https://127.0.0.1:{port}/", context)
    assert user.login("correct horse battery")[0] == 302
    server = recorded_pids(read_record(home, "nb2"), "notebook")
    assert cli("terminate", "-y", "nb2").returncode == 0
    assert all(gone(pid) for pid in server)

    again = cli("-c", config, "start", "nb2")
    assert again.returncode == 0, again.output
    port = int(summary_value(again.stdout, "notebook").rsplit(":", 1)[1].strip("/"))
    assert served_certificate(port) == cert  # the same certificate: browsers keep trusting it
    assert cli("terminate", "-y", "nb2").returncode == 0


def test_missing_certificate_fails_start_before_anything_runs(cli, home, write_config, tmp_path):
    config = str(
        write_config(
            CONFIG.format(extra=f"notebook_certfile = {tmp_path}/nope.pem\nnotebook_keyfile = {tmp_path}/nope.key\n")
        )
    )
    result = cli("-c", config, "start", "nb3")
    assert result.returncode == 2  # checked as the config is read: file, line, section, key
    assert (
        result.stderr.strip()
        == f"error: {config}:10 [plugin ipcluster] notebook_certfile: {tmp_path}/nope.pem is not a file here"
    )
    assert not (home / "clusters" / "nb3.json").exists()
    (tmp_path / "cert.pem").write_text("")
    half = str(write_config(CONFIG.format(extra=f"notebook_certfile = {tmp_path}/cert.pem\n"), name="half"))
    result = cli("-c", half, "start", "nb3")
    assert result.returncode == 1 and "notebook_certfile and notebook_keyfile go together" in result.stderr
