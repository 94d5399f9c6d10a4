"""What the benchmarks share: the environment of the ``globular`` commands they time, and the
config of a cluster on the netns test hosts."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def command_env(**extra: str) -> dict[str, str]:
    """This process's environment with ``extra``, for a ``globular`` command, which writes its
    bytecode as a pip-installed globular has it: an environment that sets
    PYTHONDONTWRITEBYTECODE (some CI images and sandboxes do) would have every command compile
    globular's modules anew, about 0.1 s that no installed copy pays."""
    env = dict(os.environ, **extra)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


CONFIG = """\
[global]
default_template = bench
[cluster bench]
provider = ssh
node_hosts = {hosts}
ssh_key = {key}
known_hosts = {known_hosts}
python = {python}
remote_dir = {remote_dir}
cores_per_node = 1
connect_timeout = {connect_timeout}
environment = {environment}
plugins = ipcluster
[plugin ipcluster]
setup_class = ipcluster
"""


def ssh_config(
    net: Any,
    hosts: Sequence[Any],
    *,
    python: str,
    remote_dir: Path,
    environment: str = "system",
    connect_timeout: int = 10,
) -> str:
    """The config (template ``bench``) of the ssh provider on ``hosts`` of test net ``net``
    (tests/testhosts.py), one engine each, in ``python`` with ``environment``."""
    return CONFIG.format(
        hosts=", ".join(f"root@{h.address}" for h in hosts),
        key=net.key,
        known_hosts=net.known_hosts,
        python=python,
        remote_dir=remote_dir,
        environment=environment,
        connect_timeout=connect_timeout,
    )
