"""The ``ec2`` provider: nodes are EC2 instances (boto3), brought up over SSH.

Credentials come from ``[aws info]`` when it has them, else from boto3's usual
chain (environment, ``~/.aws``, instance role).  Each cluster gets one security
group, ``@globular-<cluster>``, that lets in SSH from one CIDR (``permission``,
default: this machine's public address) and lets the cluster's own instances
reach each other; nothing else.  The controller and the notebook are reached
through SSH.  Instances are tagged with the cluster, the node name and the role,
so a cluster started on another machine can be found (:meth:`EC2Provider.discover`).

After an instance is ``running`` it is reached exactly like an ``ssh`` provider
host (the same bring-up), its host key accepted on first contact into a
known_hosts file of the cluster's own.

(Longer than most modules: one provider read top to bottom — credentials, the security
group, instances and their SSH bring-up, release, discovery by tags; its settings are
:mod:`globular.providers.ec2_settings`.)
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import asyncssh

from globular.errors import BadInput, GlobularError, HostUnreachable, NodeError
from globular.paths import write_private
from globular.providers.base import ProviderStatus
from globular.providers.ec2_settings import EC2Settings, aws_config_values
from globular.providers.ssh import RemoteProvider
from globular.providers.ssh_settings import SSHHost, SSHOptions
from globular.spec import ClusterSpec
from globular.spec import Settings as SettingsModel
from globular.state import NodeRecord

TAG_CLUSTER = "globular:cluster"
TAG_NODE = "globular:node"
TAG_ROLE = "globular:role"
Reply = dict[str, Any]  # an EC2 API answer (boto3's JSON)
LIVE_STATES = ["pending", "running", "stopping", "stopped"]


def group_name(cluster: str) -> str:
    return f"@globular-{cluster}"


def _tags(resource: Mapping[str, Any]) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in resource.get("Tags") or []}


def my_public_address(url: str, timeout: float = 5.0) -> str | None:
    """This machine's public IPv4 address as ``url`` sees it, or None."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            text = reply.read(64).decode().strip()
        return str(ipaddress.IPv4Address(text))
    except (OSError, ValueError):
        return None


class EC2Provider(RemoteProvider):
    name = "ec2"
    where_nodes_come_from = "makes its own instances"
    Settings = EC2Settings
    settings: EC2Settings
    rents_machines = True
    environments_outlive_nodes = False
    limit_reason = " (max_nodes, at most 1000)"

    def __init__(self, spec: ClusterSpec, *, cluster: str, home: Path):
        super().__init__(spec, cluster=cluster, home=home)
        self._client: Any = None

    # -- config ------------------------------------------------------------------

    @classmethod
    def config_values(
        cls, values: Mapping[str, str], sections: Mapping[str, str], extra: Mapping[str, Mapping[str, str]]
    ) -> tuple[dict[str, str], dict[str, str]]:
        """Take ``[aws info]``, ``[key NAME]`` and ``[permission NAME]`` into the cluster's values."""
        values, sections = dict(values), dict(sections)
        aws_config_values(values, sections, extra)  # fills the copies
        return values, sections

    @classmethod
    def max_nodes(cls, settings: SettingsModel) -> int | None:
        assert isinstance(settings, EC2Settings)
        return settings.max_nodes

    @property
    def region(self) -> str:
        return self.settings.aws_region_name

    # -- AWS -----------------------------------------------------------------------

    def client(self) -> Any:
        if self._client is None:
            import boto3  # only ec2 clusters pay for it

            session = boto3.session.Session(
                aws_access_key_id=self.settings.aws_access_key_id,
                aws_secret_access_key=self.settings.aws_secret_access_key,
                aws_session_token=self.settings.aws_session_token,
                region_name=self.settings.aws_region_name,
            )
            from botocore.config import Config

            limits = Config(connect_timeout=10, read_timeout=60, retries={"max_attempts": 4, "mode": "standard"})
            self._client = session.client("ec2", endpoint_url=self.settings.aws_endpoint_url, config=limits)
        return self._client

    async def call(self, operation: str, **kwargs: Any) -> Reply:
        """One EC2 API call in a thread; AWS errors become one clear line."""
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        method = getattr(self.client(), operation)
        try:
            return await asyncio.to_thread(method, **kwargs)
        except NoCredentialsError:
            raise GlobularError(
                "no AWS credentials: set aws_access_key_id and aws_secret_access_key in [aws info], "
                "or configure boto3 (AWS_PROFILE, ~/.aws/credentials)"
            ) from None
        except ClientError as exc:
            error = exc.response.get("Error", {})
            raise AWSError(operation, error.get("Code", "?"), error.get("Message", str(exc))) from None
        except BotoCoreError as exc:
            raise GlobularError(f"EC2 {operation}: {exc}") from None

    async def instances(
        self, *, ids: list[str] | None = None, states: list[str] | None = LIVE_STATES, any_cluster: bool = False
    ) -> list[Reply]:
        """The cluster's instances (tag filter), or those of ``ids``; with ``any_cluster``,
        every instance that carries a cluster tag (every page of the answer)."""
        tag = (
            {"Name": "tag-key", "Values": [TAG_CLUSTER]}
            if any_cluster
            else {"Name": f"tag:{TAG_CLUSTER}", "Values": [self.cluster]}
        )
        filters = [tag]
        if states:
            filters.append({"Name": "instance-state-name", "Values": states})
        kwargs: dict[str, Any] = {"Filters": filters}
        if ids:
            kwargs["InstanceIds"] = ids
        found = []
        reply = await self.call("describe_instances", **kwargs)
        while True:
            for reservation in reply.get("Reservations", []):
                found.extend(reservation.get("Instances", []))
            token = reply.get("NextToken")
            if not token:
                return found
            reply = await self.call("describe_instances", NextToken=token, **kwargs)

    async def _vpc_of_subnet(self) -> str | None:
        if self.settings.subnet_id:
            reply = await self.call("describe_subnets", SubnetIds=[self.settings.subnet_id])
            return str(reply["Subnets"][0]["VpcId"])
        reply = await self.call("describe_vpcs", Filters=[{"Name": "is-default", "Values": ["true"]}])
        vpcs = reply.get("Vpcs", [])
        if not vpcs:
            raise GlobularError(f"region {self.region} has no default VPC: set subnet_id")
        return str(vpcs[0]["VpcId"])

    async def find_group(self) -> Reply | None:
        reply = await self.call(
            "describe_security_groups", Filters=[{"Name": "group-name", "Values": [group_name(self.cluster)]}]
        )
        groups = reply.get("SecurityGroups", [])
        return groups[0] if groups else None

    def _ssh_cidr(self) -> str:
        if self.settings.permission:
            return self.settings.permission
        address = my_public_address(self.settings.my_address_url)
        if address is None:
            raise BadInput(
                f"cannot tell this machine's public address (asked {self.settings.my_address_url}): "
                "set permission = CIDR (who may SSH in, such as 203.0.113.7/32) in the cluster template"
            )
        return f"{address}/32"

    async def ensure_group(self) -> str:
        """The cluster's security group: SSH from one CIDR, everything between its own members."""
        name = group_name(self.cluster)
        group = await self.find_group()
        if group is not None:
            if _tags(group).get(TAG_CLUSTER) != self.cluster:
                raise GlobularError(
                    f"security group {name} ({group['GroupId']}) exists and is not globular's; delete or rename it"
                )
            return str(group["GroupId"])
        cidr = self._ssh_cidr()
        vpc = await self._vpc_of_subnet()
        created = await self.call(
            "create_security_group",
            GroupName=name,
            Description=f"globular cluster {self.cluster}: SSH from {cidr}, all traffic within the cluster",
            VpcId=vpc,
            TagSpecifications=[
                {"ResourceType": "security-group", "Tags": [{"Key": TAG_CLUSTER, "Value": self.cluster}]}
            ],
        )
        group_id = str(created["GroupId"])
        try:
            await self.call(
                "authorize_security_group_ingress",
                GroupId=group_id,
                IpPermissions=[
                    {
                        "IpProtocol": "tcp",
                        "FromPort": 22,
                        "ToPort": 22,
                        "IpRanges": [{"CidrIp": cidr, "Description": "ssh"}],
                    },
                    {
                        "IpProtocol": "-1",
                        "UserIdGroupPairs": [{"GroupId": group_id, "Description": "within the cluster"}],
                    },
                ],
            )
        except BaseException:
            await self.call("delete_security_group", GroupId=group_id)
            raise
        return group_id

    async def delete_group(self, timeout: float = 300.0) -> None:
        """Delete the cluster's group; AWS refuses while terminated instances still hold it, so retry."""
        group = await self.find_group()
        if group is None or _tags(group).get(TAG_CLUSTER) != self.cluster:
            return
        deadline = time.monotonic() + timeout
        while True:
            try:
                await self.call("delete_security_group", GroupId=group["GroupId"])
                return
            except AWSError as exc:
                if exc.code != "DependencyViolation" or time.monotonic() > deadline:
                    raise
            await asyncio.sleep(self.settings.poll_interval)

    # -- nodes ---------------------------------------------------------------------

    def release_commands(self, node: NodeRecord) -> list[list[str]]:
        """The instance powers itself off (its shutdown behaviour terminates it)."""
        return [["sudo", "-n", "shutdown", "-h", "now"], ["shutdown", "-h", "now"], ["poweroff"]]

    def ssh_options(self) -> SSHOptions:
        # a new instance's key is new: accepted, and the cluster's own known_hosts keeps it from then on
        known = self.home / "ec2" / f"{self.cluster}-{self.region}.known_hosts"
        return SSHOptions(self.settings.key_location, known, True, "key_location")

    def _launch_args(self, names: list[str], group_id: str, master: bool) -> Reply:
        image = (self.settings.master_image_id if master else None) or self.settings.node_image_id
        itype = (self.settings.master_instance_type if master else None) or self.settings.node_instance_type
        tags = [{"Key": TAG_CLUSTER, "Value": self.cluster}]
        args: dict[str, Any] = {
            "ImageId": image,
            "InstanceType": itype,
            "KeyName": self.settings.keyname,
            "MinCount": len(names),
            "MaxCount": len(names),
            "TagSpecifications": [{"ResourceType": "instance", "Tags": tags}],
            # a node that powers itself off (idle_shutdown) is gone, not stopped and still billed for its disk
            "InstanceInitiatedShutdownBehavior": "terminate",
        }
        if self.settings.subnet_id:
            args["SubnetId"] = self.settings.subnet_id
        args["SecurityGroupIds"] = [group_id]
        if self.settings.spot_bid:
            args["InstanceMarketOptions"] = {
                "MarketType": "spot",
                "SpotOptions": {"MaxPrice": f"{self.settings.spot_bid:.4f}", "SpotInstanceType": "one-time"},
            }
        return args

    async def create_nodes(
        self,
        names: list[str],
        on_ready: Callable[[NodeRecord], None],
        *,
        existing: Sequence[NodeRecord] = (),
        hosts: list[str] | None = None,
    ) -> list[NodeRecord]:
        if not Path(self.settings.key_location).expanduser().is_file():
            raise BadInput(
                f"key_location {self.settings.key_location} (the key of {self.settings.keyname}) does not exist"
            )
        group_id = await self.ensure_group()
        launched: list[str] = []
        handed: set[str] = set()

        def ready(node: NodeRecord) -> None:
            handed.add(node.data["instance_id"])
            on_ready(node)

        try:
            nodes = await self._launch(names, group_id, launched)
            await self._wait_running(nodes)
            return await self._bring_up(nodes, ready)
        except BaseException:
            # the caller releases what it was handed; the rest is ours
            await asyncio.shield(self._terminate_ids([i for i in launched if i not in handed]))
            if not existing and not handed:
                await asyncio.shield(self.release_cluster())
            raise

    async def _launch(self, names: list[str], group_id: str, launched: list[str]) -> list[NodeRecord]:
        batches = [(names[:1], True), (names[1:], False)] if names[0] == "master" else [(names, False)]
        nodes = []
        for batch, master in batches:
            if not batch:
                continue
            reply = await self.call("run_instances", **self._launch_args(batch, group_id, master))
            ids = [i["InstanceId"] for i in reply["Instances"]]
            launched.extend(ids)
            for name, instance_id in zip(batch, ids):
                await self.call(
                    "create_tags",
                    Resources=[instance_id],
                    Tags=[
                        {"Key": TAG_NODE, "Value": name},
                        {"Key": TAG_ROLE, "Value": "master" if name == "master" else "node"},
                        {"Key": "Name", "Value": f"{self.cluster}-{name}"},
                    ],
                )
                nodes.append(
                    NodeRecord(
                        name=name,
                        address="",
                        workdir=self._node_dir(name),
                        cores=1,
                        python=self.settings.python,
                        data={"instance_id": instance_id, "host": ""},
                    )
                )
        return nodes

    def _address_of(self, instance: Reply) -> str | None:
        public, private = instance.get("PublicIpAddress"), instance.get("PrivateIpAddress")
        if self.settings.address == "private":
            return private
        if self.settings.address == "public":
            return public
        return public or private

    async def _wait_running(self, nodes: list[NodeRecord]) -> None:
        """Wait until every instance runs and has an address (bounded by boot_timeout)."""
        waiting = {n.data["instance_id"]: n for n in nodes}
        self.reporter.begin("ec2-running", "instances running", len(nodes))
        deadline = time.monotonic() + self.settings.boot_timeout
        states: dict[str, str] = {}
        while waiting:
            for instance in await self.instances(ids=list(waiting), states=None):
                instance_id = instance["InstanceId"]
                state = instance["State"]["Name"]
                states[instance_id] = state
                node = waiting.get(instance_id)
                if node is None:
                    continue
                if state in ("shutting-down", "terminated", "stopping", "stopped"):
                    reason = (instance.get("StateReason") or {}).get("Message", "")
                    raise NodeError(node.name, f"instance {instance_id} is {state} ({reason or 'no reason given'})")
                address = self._address_of(instance)
                if state == "running" and address:
                    host = SSHHost(host=address, user=self.settings.user)
                    node.address, node.login, node.data["host"] = address, str(host), str(host)
                    node.data["address"] = address
                    self.on_step(node, "provision")
                    del waiting[instance_id]
                    self.reporter.advance("ec2-running")
            if not waiting:
                break
            if time.monotonic() > deadline:
                late = ", ".join(f"{n.name} ({i}: {states.get(i, 'unknown')})" for i, n in waiting.items())
                raise GlobularError(
                    f"instances not running with an address after {self.settings.boot_timeout:g}s: {late}"
                )
            await asyncio.sleep(self.settings.poll_interval)
        self.reporter.end("ec2-running")

    async def connect(self, host: SSHHost, *, key: str | None = None) -> asyncssh.SSHClientConnection:
        """Like the ssh provider's, but a new instance's sshd may not answer yet: retry until boot_timeout."""
        deadline = time.monotonic() + self.settings.boot_timeout
        while True:
            try:
                return await super().connect(host, key=key)
            except HostUnreachable:
                if time.monotonic() > deadline:
                    raise
            await asyncio.sleep(min(self.settings.poll_interval, 5.0))

    async def _terminate_ids(self, ids: list[str], wait: bool = True) -> None:
        if not ids:
            return
        await self.call("terminate_instances", InstanceIds=ids)
        if not wait:
            return
        deadline = time.monotonic() + self.settings.boot_timeout
        while True:
            alive = [i for i in await self.instances(ids=ids, states=None) if i["State"]["Name"] != "terminated"]
            if not alive or time.monotonic() > deadline:
                return
            await asyncio.sleep(self.settings.poll_interval)

    def _forget_host_keys(self, addresses: list[str]) -> None:
        """A terminated instance's address may come back with another key: drop its line."""
        path = self.ssh_options().known_hosts
        if not path.exists():
            return
        gone = set(addresses)
        kept = [
            line
            for line in path.read_text().splitlines()
            if line.split(" ", 1)[0].strip("[]").split("]:")[0] not in gone
        ]
        write_private(path, "".join(f"{line}\n" for line in kept).encode())

    async def terminate_nodes(self, nodes: list[NodeRecord]) -> None:
        """Terminate the nodes' instances and wait until they are gone (no SSH needed)."""
        for node in nodes:
            runner = self._runners.pop(node.name, None)
            if runner is not None:
                await runner.close()
        ids = [n.data["instance_id"] for n in nodes if n.data.get("instance_id")]
        if ids:
            self.reporter.begin("ec2-terminate", "instances terminating", len(ids))
            await self._terminate_ids(ids)
            self.reporter.end("ec2-terminate")
        self._forget_host_keys([n.data.get("address") or n.address for n in nodes])

    async def status(self, nodes: Sequence[NodeRecord]) -> ProviderStatus:
        """Each node's instance state; one terminated or stopped behind globular's back (a spot
        reclaim, someone in the console) is the node's problem."""
        report = ProviderStatus()
        ids = {n.data["instance_id"]: n.name for n in nodes if n.data.get("instance_id")}
        if not ids:
            return report
        found = {i["InstanceId"]: i for i in await self.instances(ids=list(ids), states=None)}
        for instance_id, name in ids.items():
            state = (found.get(instance_id, {}).get("State") or {}).get("Name", "gone")
            report.node_columns[name] = {"instance": f"{instance_id} {state}"}
            if state not in ("pending", "running"):
                report.node_problems[name] = f"instance {instance_id} is {state}"
                report.node_states[name] = f"instance {state}"
        return report

    async def release_cluster(self) -> None:
        """Every instance tagged with the cluster (even one no record knows), then the group."""
        stray = [i["InstanceId"] for i in await self.instances()]
        await self._terminate_ids(stray)
        await self.delete_group()
        self.ssh_options().known_hosts.unlink(missing_ok=True)

    def account(self) -> object | None:
        return (self.settings.aws_endpoint_url, self.settings.aws_access_key_id)

    async def discover(self) -> dict[str, list[NodeRecord]]:
        """Every globular cluster in this region (any machine started it): name → its nodes, from tags."""
        found: dict[str, list[NodeRecord]] = {}
        for instance in await self.instances(any_cluster=True):
            tags = _tags(instance)
            cluster, name = tags.get(TAG_CLUSTER), tags.get(TAG_NODE)
            if not cluster or not name:
                continue
            address = self._address_of(instance) or ""
            host = str(SSHHost(host=address, user=self.settings.user)) if address else ""
            found.setdefault(cluster, []).append(
                NodeRecord(
                    name=name,
                    address=address,
                    workdir=f"{self.settings.remote_dir}/{cluster}/{name}",
                    cores=1,
                    python=self.settings.python,
                    login=host or None,
                    data={
                        "instance_id": instance["InstanceId"],
                        "host": host,
                        "address": address,
                        "state": instance["State"]["Name"],
                    },
                )
            )
        return found


class AWSError(GlobularError):
    """An EC2 API call refused: the operation, AWS's error code and message."""

    def __init__(self, operation: str, code: str, message: str):
        self.operation, self.code = operation, code
        super().__init__(f"EC2 {operation}: {code}: {message}")
