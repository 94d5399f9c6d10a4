"""The ``ssh`` provider's settings: the hosts (``[user@]host[:port]``), the login, and what
every provider of nodes reached by ssh reads (``RemoteSettings``, which ec2's extend)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, Field

from globular.spec import CommaList, FileHere, Settings

MAX_ENGINES_PER_NODE = 1024
_HOST = re.compile(r"^(?:(?P<user>[^@\s:]+)@)?(?P<host>[^@\s:\[\]]+|\[[0-9a-fA-F:.]+\])(?::(?P<port>\d{1,5}))?$")


@dataclass(frozen=True)
class SSHHost:
    """One entry of ``node_hosts``: ``[user@]host[:port]``."""

    host: str
    port: int = 22
    user: str | None = None

    @classmethod
    def parse(cls, text: str) -> SSHHost:
        match = _HOST.fullmatch(text.strip())
        if not match or not 0 < int(match["port"] or 22) < 65536:
            raise ValueError(f"{text!r} is not a host (expected [user@]host[:port])")
        return cls(host=match["host"].strip("[]"), port=int(match["port"] or 22), user=match["user"])

    @property
    def key(self) -> tuple[str, int]:
        """What makes two entries the same machine (the user does not)."""
        return self.host, self.port

    def __str__(self) -> str:
        user = f"{self.user}@" if self.user else ""
        port = f":{self.port}" if self.port != 22 else ""
        return f"{user}{self.host}{port}"


def _check_hosts(hosts: list[str]) -> list[str]:
    if not hosts:
        raise ValueError("lists no host")
    seen: dict[tuple[str, int], str] = {}
    for text in hosts:
        host = SSHHost.parse(text)
        if host.key in seen:
            raise ValueError(f"{text!r} is listed twice (also as {seen[host.key]!r})")
        seen[host.key] = text
    return hosts


def _check_host(text: str | None) -> str | None:
    if text is not None:
        SSHHost.parse(text)
    return text


class RemoteSettings(Settings):
    """What every provider of nodes reached by ssh reads."""

    user: str | None = Field(default=None, description="login name; default: ~/.ssh/config's, else yours")
    python: str = Field(
        default="python3",
        description="the hosts' Python (same major.minor as here); globular makes its environment from it",
    )
    remote_dir: str = Field(default="~/.globular/nodes", description="where node folders go on the hosts")
    cores_per_node: int | None = Field(
        default=None, ge=1, le=MAX_ENGINES_PER_NODE, description="engines per node; default: the host's cores"
    )
    connect_timeout: float = Field(
        default=10.0, gt=0, le=600, description="seconds to wait for a host to answer", json_schema_extra={"unit": "s"}
    )


class SSHSettings(RemoteSettings):
    node_hosts: Annotated[CommaList, AfterValidator(_check_hosts)] = Field(
        description="[user@]host[:port], ...; the first is the master unless master_host says otherwise"
    )
    master_host: Annotated[str | None, AfterValidator(_check_host)] = None
    ssh_key: FileHere = Field(
        default=None, description="private key file; the agent and ~/.ssh/config's keys are also tried"
    )
    known_hosts: str | None = Field(default=None, description="known_hosts file; default ~/.ssh/known_hosts")
    accept_new_host_keys: bool = Field(
        default=False, description="add unknown host keys to known_hosts (never a changed one)"
    )


def hosts_in_order(settings: SSHSettings) -> list[SSHHost]:
    """Every host, the master first."""
    hosts = [SSHHost.parse(h) for h in settings.node_hosts]
    if settings.master_host:
        master = SSHHost.parse(settings.master_host)
        hosts = [master] + [h for h in hosts if h.key != master.key]
    return hosts


@dataclass(frozen=True)
class SSHOptions:
    """How ssh reaches a provider's nodes (also for the ``ssh`` command ``sshnode`` runs)."""

    key: str | None  # private key file (the agent and ~/.ssh/config's keys are tried too)
    known_hosts: Path
    accept_new_host_keys: bool
    key_setting: str  # the setting that names the key, for messages
