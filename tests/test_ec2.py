"""The ec2 provider against moto's EC2 server (started here, on 127.0.0.1).

moto stands in for the EC2 API only.  The instances it "launches" get addresses
in a 198.18.0.0/24 subnet, handed out in order from .4; the test hosts
(tests/testhosts.py, network namespaces running sshd) sit at exactly those
addresses, so the SSH bring-up, the controller and the engines are real.
"""

from __future__ import annotations

import sys
import urllib.request
from pathlib import Path

import pytest

import testhosts
from conftest import bare_hosts, read_record, share_env_cache, wait_until

boto3 = pytest.importorskip("boto3")
reason = testhosts.available()
pytestmark = [pytest.mark.cluster, pytest.mark.skipif(reason is not None, reason=reason or "")]

REGION = "us-east-1"
CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}


@pytest.fixture(scope="module")
def moto_url():
    """moto's EC2 in a thread of this process, on a port the kernel picked (no pick-then-bind race)."""
    server_module = pytest.importorskip("moto.moto_server.threaded_moto_server", reason="moto[server] is not installed")
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    try:
        assert wait_until(lambda: _answers(url), timeout=30), "moto's server did not answer"
        yield url
    finally:
        server.stop()


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(f"{url}/moto-api/", timeout=1).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def net(tmp_path_factory, bare_python, env_cache):
    # 198.18.0.4-7: the first four addresses moto gives in the subnet; a stock image: Python, nothing else
    with bare_hosts(tmp_path_factory.mktemp("ec2hosts"), 4, bare_python, env_cache, first=4) as hosts:
        yield hosts


class Account:
    """A fresh moto account with a VPC, a subnet in 198.18.0.0/24 and the test key pair."""

    def __init__(self, url: str, key: Path):
        urllib.request.urlopen(urllib.request.Request(f"{url}/moto-api/reset", method="POST"), timeout=10).close()
        self.url = url
        self.ec2 = boto3.client("ec2", region_name=REGION, endpoint_url=url, **CREDENTIALS)
        vpc = self.ec2.create_vpc(CidrBlock="198.18.0.0/24")["Vpc"]["VpcId"]
        self.subnet = self.ec2.create_subnet(VpcId=vpc, CidrBlock="198.18.0.0/24")["Subnet"]["SubnetId"]
        self.ec2.import_key_pair(KeyName="testkey", PublicKeyMaterial=Path(f"{key}.pub").read_bytes())
        self.ami = self.ec2.describe_images()["Images"][0]["ImageId"]

    def instances(self, *states: str) -> list[dict]:
        filters = [{"Name": "instance-state-name", "Values": list(states)}] if states else []
        return [i for r in self.ec2.describe_instances(Filters=filters)["Reservations"] for i in r["Instances"]]

    def live(self) -> list[dict]:
        return self.instances("pending", "running", "stopping", "stopped", "shutting-down")

    def groups(self) -> dict[str, dict]:
        return {g["GroupName"]: g for g in self.ec2.describe_security_groups()["SecurityGroups"]}

    def snapshot(self) -> dict:
        """What a cluster must leave as it found it."""
        return {
            "live": sorted(i["InstanceId"] for i in self.live()),
            "groups": sorted((g["GroupId"], g["GroupName"]) for g in self.groups().values()),
            "keys": sorted(k["KeyName"] for k in self.ec2.describe_key_pairs()["KeyPairs"]),
            "vpcs": sorted(v["VpcId"] for v in self.ec2.describe_vpcs()["Vpcs"]),
            "subnets": sorted(s["SubnetId"] for s in self.ec2.describe_subnets()["Subnets"]),
        }


@pytest.fixture
def account(moto_url, net):
    return Account(moto_url, net.key)


def ec2_config(
    account: Account, net, tmp_path, *, cluster: str = "", plugins: str = "ipcluster", aws: str = "",
    ipcluster: str = "", python: str | None = None,
) -> str:  # fmt: skip
    """A config for ``cloud``; the instances' Python is bare, and their environment (built by
    globular) is shared with the other tests, as an AMI's would be after its first start."""
    share_env_cache(net.env_cache, tmp_path / "globular-home", tmp_path / "hosts")
    path = tmp_path / "config"
    path.write_text(
        "[global]\ndefault_template = cloud\n"
        "[aws info]\n"
        f"aws_access_key_id = testing\naws_secret_access_key = testing\n"
        f"aws_region_name = {REGION}\naws_endpoint_url = {account.url}\n{aws}"
        f"[key testkey]\nkey_location = {net.key}\n"
        "[cluster cloud]\nprovider = ec2\nkeyname = testkey\n"
        f"node_image_id = {account.ami}\nnode_instance_type = t3.micro\nsubnet_id = {account.subnet}\n"
        "permission = 198.18.0.0/24\nuser = root\n"
        f"python = {python or net.python}\nremote_dir = {tmp_path / 'hosts'}\n"
        "cores_per_node = 1\npoll_interval = 0.2\nboot_timeout = 60\nconnect_timeout = 3\n"
        f"plugins = {plugins}\n{cluster}"
        f"[plugin ipcluster]\nsetup_class = ipcluster\n{ipcluster}"
    )
    return str(path)


def tags(instance: dict) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in instance.get("Tags", [])}


def portable(f):
    """``f``, sent by value: the hosts cannot import the tests' modules."""
    f.__module__ = "__main__"
    return f


def node_name() -> str:
    import os

    return os.environ["GLOBULAR_NODE"]


@pytest.fixture
def terminated(cli, home):
    """Terminates, after the test, the clusters it names if the test left them."""
    names: list[tuple[str, str]] = []
    yield lambda name, config: names.append((name, config))
    for name, config in names:
        if (home / "clusters" / f"{name}.json").exists():
            cli("-c", config, "terminate", "-y", name)


def test_start_grow_shrink_terminate_leaves_the_account_as_found(account, net, cli, home, tmp_path, terminated):
    from globular import connect

    before = account.snapshot()
    config = ec2_config(account, net, tmp_path)
    terminated("sky", config)
    started = cli("-c", config, "start", "-s", "2", "sky")
    assert started.returncode == 0, started.output

    # instances: tagged with cluster, node and role, at the subnet's addresses
    running = {tags(i)["globular:node"]: i for i in account.instances("running")}
    assert sorted(running) == ["master", "node001"]
    assert {n: tags(i)["globular:role"] for n, i in running.items()} == {"master": "master", "node001": "node"}
    assert all(tags(i)["globular:cluster"] == "sky" and tags(i)["Name"] == f"sky-{n}" for n, i in running.items())
    assert sorted(i["PrivateIpAddress"] for i in running.values()) == ["198.18.0.4", "198.18.0.5"]
    assert all(i["KeyName"] == "testkey" and i["SubnetId"] == account.subnet for i in running.values())

    # one group, SSH from the configured CIDR and the cluster to itself: nothing else
    group = account.groups()["@globular-sky"]
    assert all([g["GroupId"]] == [x["GroupId"] for x in i["SecurityGroups"]] for g in [group] for i in running.values())
    rules = sorted(
        (
            p["IpProtocol"],
            p.get("FromPort"),
            p.get("ToPort"),
            tuple(r["CidrIp"] for r in p.get("IpRanges", [])),
            tuple(r["GroupId"] for r in p.get("UserIdGroupPairs", [])),
        )
        for p in group["IpPermissions"]
    )
    assert rules == sorted([("tcp", 22, 22, ("198.18.0.0/24",), ()), ("-1", None, None, (), (group["GroupId"],))])
    assert not any(r["CidrIp"] == "0.0.0.0/0" for p in group["IpPermissions"] for r in p.get("IpRanges", []))

    record = read_record(home, "sky")
    assert record["region"] == REGION
    conn_file = home / "ipcluster" / f"sky-{REGION}.json"
    assert conn_file.exists() and (conn_file.stat().st_mode & 0o777) == 0o600
    known = home / "ec2" / f"sky-{REGION}.known_hosts"
    assert known.exists()

    rc = connect("sky")
    try:
        assert wait_until(lambda: len(rc.ids) == 2, timeout=30)
        assert sorted(rc[:].apply_sync(portable(node_name))) == ["master", "node001"]

        added = cli("-c", config, "addnode", "sky")
        assert added.returncode == 0, added.output
        assert sorted(tags(i)["globular:node"] for i in account.instances("running")) == [
            "master",
            "node001",
            "node002",
        ]
        assert wait_until(lambda: len(rc.ids) == 3, timeout=30)  # the connected client sees the new engine

        removed = cli("-c", config, "removenode", "sky", "node001")
        assert removed.returncode == 0, removed.output
        assert sorted(tags(i)["globular:node"] for i in account.instances("running")) == ["master", "node002"]
        gone = [i for i in account.instances("terminated") if tags(i)["globular:node"] == "node001"]
        assert len(gone) == 1
        assert wait_until(lambda: len(rc.ids) == 2, timeout=30)
        assert "@globular-sky" in account.groups()  # the group stays while the cluster lives
    finally:
        rc.close()

    listed = cli("-c", config, "listclusters")
    assert listed.returncode == 0 and "sky" in listed.stdout and REGION in listed.stdout
    assert "running elsewhere" not in listed.stdout  # this machine has its record

    stopped = cli("-c", config, "terminate", "-y", "sky")
    assert stopped.returncode == 0, stopped.output
    assert account.snapshot() == before
    assert not known.exists() and not conn_file.exists()
    assert not (home / "clusters" / "sky.json").exists()


def test_a_cluster_started_elsewhere_is_listed_and_terminated_from_its_tags(account, net, cli, home, tmp_path):
    before = account.snapshot()
    config = ec2_config(account, net, tmp_path, plugins="", cluster="spot_bid = 0.05\n")
    started = cli("-c", config, "start", "-s", "2", "far")
    assert started.returncode == 0, started.output
    instances = account.instances("running")
    assert len(instances) == 2 and all(i.get("InstanceLifecycle") == "spot" for i in instances)

    elsewhere = tmp_path / "other-machine"  # a second machine: same config, no record
    env = {"GLOBULAR_HOME": str(elsewhere)}
    listed = cli("-c", config, "listclusters", env=env)
    assert listed.returncode == 0, listed.output
    row = next(line for line in listed.stdout.splitlines() if "far" in line)
    assert "running elsewhere" in row and "ec2" in row and REGION in row and " 2 " in row

    stopped = cli("-c", config, "terminate", "-y", "far", env=env)
    assert stopped.returncode == 0, stopped.output
    assert account.snapshot() == before
    assert not (elsewhere / "clusters" / "far.json").exists()
    assert "No clusters" in cli("-c", config, "listclusters", env=env).stdout.replace("far", "")
    # the first machine's record now names instances that are gone: its terminate still works
    again = cli("-c", config, "terminate", "-y", "far")
    assert again.returncode == 0, again.output
    assert account.snapshot() == before


def test_without_permission_and_no_public_address_it_asks_for_one_and_makes_nothing(account, net, cli, tmp_path):
    before = account.snapshot()
    config = ec2_config(account, net, tmp_path, plugins="")
    text = Path(config).read_text().replace("permission = 198.18.0.0/24\n", "my_address_url = http://127.0.0.1:9/\n")
    Path(config).write_text(text)
    result = cli("-c", config, "start", "-s", "1", "closed")
    assert result.returncode == 2, result.output
    assert "permission" in result.stderr and "cannot tell this machine's public address" in result.stderr
    assert account.snapshot() == before


def test_a_node_that_never_answers_ssh_fails_the_start_and_everything_is_released(account, net, cli, home, tmp_path):
    before = account.snapshot()
    config = ec2_config(account, net, tmp_path, cluster="", plugins="ipcluster")
    Path(config).write_text(Path(config).read_text().replace("boot_timeout = 60", "boot_timeout = 6"))
    # five instances: the fifth gets 198.18.0.8, where no host answers
    result = cli("-c", config, "start", "-s", "5", "half")
    assert result.returncode == 1, result.output
    assert "node004" in result.stderr and "198.18.0.8" in result.stderr
    assert account.snapshot() == before
    assert not (home / "clusters" / "half.json").exists()


def test_ec2_config_sections_are_checked_with_file_section_and_key(tmp_path, monkeypatch):
    from globular.config import Config
    from globular.errors import ConfigError

    monkeypatch.setenv("HOME", str(tmp_path))  # the key files the configs name: ~/.ssh/k.pem, ./x
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".ssh").mkdir()
    (tmp_path / ".ssh" / "k.pem").write_text("")
    (tmp_path / "x").write_text("")

    base = "[cluster c]\nprovider = ec2\nkeyname = k\nnode_image_id = ami-1\npermission = 203.0.113.7/32\n"
    spec = Config.from_text(
        base + "[key k]\nkey_location = ~/.ssh/k.pem\n[aws info]\naws_region_name = eu-west-1\n", file="cfg"
    ).cluster_spec("c")
    assert spec.provider_settings["key_location"] == "~/.ssh/k.pem"
    assert spec.provider_settings["aws_region_name"] == "eu-west-1"

    cases = {
        base: ("cluster c", "keyname", "no [key k] section"),
        base + "[key k]\nkey_location = x\n[aws info]\naws_secret = 1\n": ("aws info", "aws_secret", "unknown setting"),
        base + "[key k]\nkey_file = x\n": ("key k", "key_file", "unknown setting"),
        base.replace("203.0.113.7/32", "wide")
        + "[key k]\nkey_location = x\n[permission wide]\ncidr_ip = 0.0.0.0/0\nfrom_port = 1000\n": (
            "permission wide",
            "from_port",
            "SSH only",
        ),
        base.replace("203.0.113.7/32", "10.0.0.300/8") + "[key k]\nkey_location = x\n": (
            "cluster c",
            "permission",
            "not a CIDR",
        ),
        base.replace("node_image_id = ami-1\n", "") + "[key k]\nkey_location = x\n": (
            "cluster c",
            "node_image_id",
            "required",
        ),
        base + "[key k]\nkey_location = ~/.ssh/gone.pem\n": ("key k", "key_location", "is not a file here"),
    }
    for text, (section, key, message) in cases.items():
        with pytest.raises(ConfigError) as caught:
            Config.from_text(text, file="cfg").cluster_spec("c")
        err = caught.value
        assert (err.section, err.key) == (section, key), str(err)
        assert message in str(err) and str(err).startswith("cfg"), str(err)


NOTEBOOK = {
    "cells": [{"cell_type": "code", "id": "c1", "metadata": {}, "execution_count": None, "outputs": [],
               "source": "import ipyparallel as ipp\nrc = ipp.Client()"}],
    "metadata": {}, "nbformat": 4, "nbformat_minor": 5,
}  # fmt: skip


def write_notebook(started_stdout: str, home: Path, password: str) -> None:
    """A notebook written the way JupyterLab writes one (the contents API), and its checkpoint."""
    import ssl

    from notebook_client import Jupyter

    url = next(line.split()[-1] for line in started_stdout.splitlines() if line.strip().startswith("notebook "))
    cert = next((home / "tls").glob("*/cert.pem")).read_text()
    lab = Jupyter(url, ssl.create_default_context(cadata=cert))
    assert lab.login(password)[0] == 302
    status, _, body = lab.request("PUT", "/api/contents/analysis.ipynb", {"type": "notebook", "content": NOTEBOOK})
    assert status in (200, 201), body
    assert lab.request("POST", "/api/contents/analysis.ipynb/checkpoints")[0] == 201


def test_terminate_copies_the_notebooks_home_first_and_stops_when_it_cannot(
    account, net, cli, home, tmp_path, terminated
):
    """The master's notebooks are copied home before anything is released (byte for byte, the
    checkpoints left out); a copy that cannot be made stops terminate with nothing released,
    and --discard-notebooks goes on without them."""
    notebooks = tmp_path / "notebooks"  # the master's notebook folder (the hosts share this disk)
    config = ec2_config(account, net, tmp_path, cluster="environment = system\n", python=sys.executable,
                        ipcluster=f"enable_notebook = true\nnotebook_passwd = lab-password-1\nnotebook_directory = {notebooks}\n")  # fmt: skip
    before = account.snapshot()
    started = cli("-c", config, "start", "-s", "1", "nbs", timeout=300)
    terminated("nbs", config)
    assert started.returncode == 0, started.output
    write_notebook(started.stdout, home, "lab-password-1")
    (notebooks / "scratch").symlink_to("/etc")  # a link out of the folder: left out, and named
    moved = notebooks.rename(tmp_path / "moved-away")  # the folder is gone: no copy, so terminate stops
    refused = cli("-c", config, "terminate", "-y", "nbs", timeout=300)
    moved.rename(notebooks)
    assert refused.returncode == 1, refused.output
    assert "the notebooks of nbs were not copied home" in refused.stderr and "no such file or folder" in refused.stderr
    assert "--discard-notebooks" in refused.stderr
    assert len(account.live()) == 1 and (home / "clusters" / "nbs.json").exists()  # nothing released
    done = cli("-c", config, "terminate", "-y", "nbs", timeout=300)
    assert done.returncode == 0, done.output
    [copy] = (home / "notebooks").glob("nbs-*/*/analysis.ipynb")
    assert copy.read_bytes() == (notebooks / "analysis.ipynb").read_bytes()
    assert not list((home / "notebooks").rglob("*checkpoint*")) and str(copy.parent) in " ".join(done.stdout.split())
    assert "left out: scratch (a link to /etc)" in " ".join(done.stdout.split()), done.stdout
    assert account.snapshot() == before

    again = cli("-c", config, "start", "-s", "1", "nbs", timeout=300)
    assert again.returncode == 0, again.output
    discarded = cli("-c", config, "terminate", "-y", "--discard-notebooks", "nbs", timeout=300)
    assert discarded.returncode == 0, discarded.output
    assert "not copied home (discarded)" in discarded.stdout and account.snapshot() == before


def test_an_instance_terminated_behind_globulars_back_is_replaced(account, net, cli, home, tmp_path, terminated):
    """min_nodes 2; node001's instance is terminated in the account (a spot reclaim, the console):
    the ec2 provider's status says so, the balancer takes the node out and a new instance
    replaces it, whose engine joins."""
    from globular import connect

    bounds = "min_nodes = 2\nmax_nodes = 3\npolling_interval = 1s\nkill_after = 10m\n"
    config = ec2_config(account, net, tmp_path, cluster=bounds)
    terminated("spot", config)
    started = cli("-c", config, "start", "spot")
    assert started.returncode == 0 and "Its balancer follows the work (2..3 nodes)" in started.stdout, started.output
    [old] = [i["InstanceId"] for i in account.instances("running") if tags(i)["globular:node"] == "node001"]
    account.ec2.terminate_instances(InstanceIds=[old])

    def replaced() -> bool:
        node = next((n for n in read_record(home, "spot")["nodes"] if n["name"] == "node001"), None)
        return node is not None and node["data"].get("instance_id") not in (None, old) and bool(node["processes"])

    assert wait_until(replaced, timeout=120)
    assert wait_until(
        lambda: "registered" in next(n for n in read_record(home, "spot")["nodes"] if n["name"] == "node001")["steps"],
        timeout=60,
    )
    log = (home / "logs" / "spot.balancer.log").read_text()
    assert f"lost node001: instance {old} is terminated" in log, log
    running = sorted(tags(i)["globular:node"] for i in account.instances("running"))
    assert running == ["master", "node001"], running
    rc = connect("spot")
    try:
        assert wait_until(lambda: len(rc.ids) == 2, timeout=30)
        assert sorted(rc[:].apply_sync(portable(node_name))) == ["master", "node001"]
    finally:
        rc.close()
    stopped = cli("-c", config, "terminate", "-y", "spot")
    assert stopped.returncode == 0, stopped.output
