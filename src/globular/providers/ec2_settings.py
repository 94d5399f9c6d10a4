"""The ``ec2`` provider's settings: the template's keys, and StarCluster's ``[aws info]``,
``[key NAME]`` and ``[permission NAME]`` sections that feed them."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Annotated, Literal

from pydantic import AfterValidator, Field

from globular.errors import ConfigError
from globular.providers.ssh_settings import RemoteSettings
from globular.spec import did_you_mean, path_here

AWS_INFO_KEYS = (
    "aws_access_key_id",
    "aws_secret_access_key",
    "aws_session_token",
    "aws_region_name",
    "aws_endpoint_url",
    "aws_user_id",
)


def _check_cidr(text: str | None) -> str | None:
    if text is None:
        return None
    try:
        network = ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ValueError(f"{text!r} is not a CIDR (such as 203.0.113.7/32)") from None
    if network.version != 4:
        raise ValueError("only IPv4 CIDRs are supported")
    return str(network)


class EC2Settings(RemoteSettings):
    aws_access_key_id: str | None = Field(
        default=None, description="default: boto3's chain (environment, ~/.aws, role)"
    )
    aws_secret_access_key: str | None = None
    aws_session_token: str | None = None
    aws_region_name: str = Field(default="us-east-1", description="the region of the instances")
    aws_endpoint_url: str | None = Field(
        default=None, description="another EC2 endpoint (a private one, or moto for tests)"
    )
    aws_user_id: str | None = Field(default=None, description="StarCluster's; accepted and not used")
    node_image_id: str = Field(
        description="the AMI of the nodes (a Linux with python3 of the same major.minor as here)"
    )
    node_instance_type: str = "t3.micro"
    master_image_id: str | None = Field(default=None, description="default: node_image_id")
    master_instance_type: str | None = Field(default=None, description="default: node_instance_type")
    keyname: str = Field(description="the EC2 key pair; its [key NAME] section gives key_location")
    key_location: Annotated[str, path_here("file")] = Field(description="the private key of keyname (from [key NAME])")
    subnet_id: str | None = Field(default=None, description="default: the default VPC's default subnet")
    spot_bid: float | None = Field(default=None, gt=0, description="max price per hour (USD): spot instances")
    permission: Annotated[str | None, AfterValidator(_check_cidr)] = Field(
        default=None,
        description="CIDR allowed to SSH in (or a [permission NAME] with cidr_ip); default: your public address",
    )
    my_address_url: str = Field(
        default="https://checkip.amazonaws.com",
        description="where your public address is asked when permission is unset",
    )
    address: Literal["public", "private"] | None = Field(
        default=None, description="which address SSH uses; default: public if the instance has one"
    )
    user: str = Field(default="ubuntu", description="login name on the image")
    python: str = Field(
        default="python3",
        description="the image's Python (same major.minor as here); globular makes its environment from it",
    )
    remote_dir: str = Field(default="~/.globular/nodes", description="where node folders go on the instances")
    cores_per_node: int | None = Field(
        default=None, ge=1, le=1024, description="engines per node; default: the instance's cores"
    )
    max_nodes: int = Field(
        default=100, ge=1, le=1000, description="the most instances one cluster may have (start and addnode)"
    )
    connect_timeout: float = Field(
        default=10.0, gt=0, le=600, description="seconds one SSH attempt may take", json_schema_extra={"unit": "s"}
    )
    boot_timeout: float = Field(
        default=600.0, gt=0, description="seconds to wait for running and SSH", json_schema_extra={"unit": "s"}
    )
    poll_interval: float = Field(
        default=5.0, gt=0, le=60, description="seconds between state checks", json_schema_extra={"unit": "s"}
    )


def aws_config_values(values: dict[str, str], sections: dict[str, str], extra: Mapping[str, Mapping[str, str]]) -> None:
    """Take ``[aws info]``, ``[key NAME]`` and ``[permission NAME]`` into the cluster's values."""
    section_of = sections.copy()
    for key, value in (extra.get("aws info") or {}).items():
        if key not in AWS_INFO_KEYS:
            hint = did_you_mean(key, dict.fromkeys(AWS_INFO_KEYS, ""))
            raise ConfigError(
                f"unknown setting{hint} (known: {', '.join(AWS_INFO_KEYS)})", file=None, section="aws info", key=key
            )
        if key not in values:  # a template's own value wins
            values[key] = value
            sections[key] = "aws info"
    keyname = values.get("keyname", "").strip()
    if keyname and "key_location" not in values:
        key_section = extra.get(f"key {keyname}")
        if key_section is None:
            raise ConfigError(
                f"names key {keyname!r} but there is no [key {keyname}] section with key_location",
                file=None,
                section=section_of.get("keyname"),
                key="keyname",
            )
        unknown = set(key_section) - {"key_location"}
        if unknown:
            raise ConfigError(
                "unknown setting (known: key_location)", file=None, section=f"key {keyname}", key=sorted(unknown)[0]
            )
        if "key_location" not in key_section:
            raise ConfigError("missing key_location (the private key file)", file=None, section=f"key {keyname}")
        values["key_location"] = key_section["key_location"]
        sections["key_location"] = f"key {keyname}"
    permission = values.get("permission", "").strip()
    if permission and f"permission {permission}" in extra:
        named = extra[f"permission {permission}"]
        where = f"permission {permission}"
        for key, value in named.items():
            if key not in ("cidr_ip", "ip_protocol", "from_port", "to_port"):
                raise ConfigError(
                    "unknown setting (known: cidr_ip, ip_protocol, from_port, to_port)",
                    file=None,
                    section=where,
                    key=key,
                )
            if (key in ("from_port", "to_port") and value.strip() != "22") or (
                key == "ip_protocol" and value.strip() != "tcp"
            ):
                raise ConfigError(
                    "globular opens SSH only (tcp port 22); the controller and notebook go through it",
                    file=None,
                    section=where,
                    key=key,
                )
        if "cidr_ip" not in named:
            raise ConfigError("missing cidr_ip (who may SSH in)", file=None, section=where)
        values["permission"] = named["cidr_ip"]
        sections["permission"] = where
