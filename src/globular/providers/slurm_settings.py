"""The ``slurm`` provider's settings: what each node's job asks Slurm for, and where it runs."""

from __future__ import annotations

import re

from pydantic import Field, field_validator

from globular.providers.ssh_settings import MAX_ENGINES_PER_NODE
from globular.spec import ArgList, Settings

# Slurm's --time formats: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS, or UNLIMITED
# sbatch options globular sets itself: the mark that finds a cluster's jobs, their names, output
_OWN_SBATCH_ARGS = ("--comment", "--job-name", "--output", "--error", "--wrap", "--parsable", "--chdir")
_OWN_SHORT_ARGS = ("-J", "-o", "-e", "-D")


def _time_fields_in_range(text: str) -> bool:
    """Slurm's minutes, seconds (and hours, after days) stay below 60 (24)."""
    if text.upper() in ("UNLIMITED", "INFINITE") or text.isdigit():
        return True
    days, _, clock = text.rpartition("-")
    fields = [int(f) for f in clock.split(":")]
    if days:  # D-HH[:MM[:SS]]
        return fields[0] < 24 and all(f < 60 for f in fields[1:])
    return all(f < 60 for f in fields[1:])  # MM:SS or HH:MM:SS: the first field may be large


_TIME = re.compile(r"^(?:\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d{1,2}(?::\d{1,2}){0,2}|UNLIMITED|INFINITE)$", re.I)
# a Slurm name (partition, account, qos): no spaces, no shell or option syntax
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.,+-]*$")


class SlurmSettings(Settings):
    partition: str | None = Field(default=None, description="Slurm partition (sbatch --partition); default: Slurm's")
    account: str | None = Field(default=None, description="account to charge (sbatch --account)")
    qos: str | None = Field(default=None, description="quality of service (sbatch --qos)")
    time_limit: str | None = Field(
        default=None,
        description="walltime of each node's job (sbatch --time: minutes, HH:MM:SS, D-HH:MM:SS); default: the partition's",
        examples=["2:00:00"],
    )
    constraint: str | None = Field(default=None, description="node features the jobs need (sbatch --constraint)")
    cores_per_node: int | None = Field(
        default=None,
        ge=1,
        le=MAX_ENGINES_PER_NODE,
        description="cores each node's job asks for (sbatch --cpus-per-task), one engine each; "
        "default: what the allocation gives (SLURM_CPUS_ON_NODE)",
    )
    gpus_per_node: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description="GPUs each node's job asks for (sbatch --gpus-per-node); with ipcluster's gpu_engines, "
        "its engines are pinned within what the job is given (Slurm's CUDA_VISIBLE_DEVICES)",
    )
    sbatch_args: ArgList = Field(
        default_factory=list,
        description="more sbatch arguments, split like a shell would but never run by one",
        examples=["--mem=8G --gres=gpu:1"],
        json_schema_extra={"reference_type": "arguments"},
    )
    python: str = Field(default="python3", description="the compute nodes' Python (same major.minor as here)")
    remote_dir: str = Field(
        default="~/.globular/nodes",
        description="node folders, on the file system the login and compute nodes share (the home, as HPC sites have)",
    )
    queue_timeout: float = Field(
        default=600.0,
        gt=0,
        le=7 * 86400,
        description="seconds start waits for PENDING jobs; then it cancels them and fails with Slurm's reason",
        json_schema_extra={"unit": "s"},
    )

    @field_validator("time_limit")
    @classmethod
    def _time(cls, value: str | None) -> str | None:
        if value is not None and not (_TIME.fullmatch(value.strip()) and _time_fields_in_range(value.strip())):
            raise ValueError(f"{value!r} is not a Slurm time (minutes, HH:MM:SS, D-HH:MM:SS or UNLIMITED)")
        return value.strip() if value else value

    @field_validator("sbatch_args")
    @classmethod
    def _sbatch_args(cls, args: list[str]) -> list[str]:
        previous = ""
        for arg in args:
            name = arg.split("=", 1)[0]
            if name in _OWN_SBATCH_ARGS or any(arg.startswith(short) and arg != "-" for short in _OWN_SHORT_ARGS):
                raise ValueError(f"{arg!r}: globular sets {name} itself (it finds and names the jobs by it)")
            # a word that no option before it takes is sbatch's script file: never ours to give
            takes_value = (previous.startswith("--") and "=" not in previous) or (
                len(previous) == 2 and previous.startswith("-") and previous != "--"
            )
            if not arg.startswith("-") and not takes_value:
                raise ValueError(f"{arg!r} is not an sbatch option (sbatch would take it as the job's script)")
            previous = arg
        return args

    @field_validator("partition", "account", "qos")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        if value is not None and not _NAME.fullmatch(value):
            raise ValueError(f"{value!r} is not a Slurm name")
        return value
