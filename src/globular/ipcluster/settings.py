"""IPCluster's settings (the ``[plugin ipcluster]`` section) and what follows from them alone."""

from __future__ import annotations

import ipaddress
import math
import re
from typing import Annotated, Any, Literal, NamedTuple

from pydantic import AfterValidator, BeforeValidator, ByteSize, Field, model_validator
from pydantic_core import PydanticCustomError

from globular.errors import GlobularError
from globular.ipcluster.roles import local_profile
from globular.spec import ArgList, FileHere, Settings, checked_when_read, parse_duration, shown
from globular.state import NodeRecord

DEATH_WINDOW_MS = 8000  # the controller drops an engine silent for this long
HB_CHECK_EXTRA_MS = 500  # an engine checks for the controller's pings every heartbeat + this (ipyparallel's rule)
MIN_CONTROLLER_PORTS = 20  # the controller and its schedulers listen on 18 ports


class Packer(NamedTuple):
    pack: str  # Session.packer
    unpack: str  # Session.unpacker
    module: str | None  # the module the nodes need for it (beyond ipyparallel)


PACKERS = {
    "json": Packer("json", "json", None),
    "pickle": Packer("pickle", "pickle", None),
    "msgpack": Packer("msgpack.packb", "msgpack.unpackb", "msgpack"),
}


def port_range(text: str) -> range:
    """``"10000-10030"`` -> the ports it names (ValueError if it is not FIRST-LAST)."""
    low, high = (int(part) for part in text.split("-"))
    return range(low, high + 1)


def _check_ports(text: str | None) -> str | None:
    if text is None:
        return None
    try:
        ports = port_range(text)
    except ValueError:
        raise ValueError("expected a port range FIRST-LAST, such as 10000-10030") from None
    low, high = ports.start, ports.stop - 1
    if not 1024 <= low <= high <= 65535:
        raise ValueError("ports must lie in 1024-65535, the first no higher than the last")
    if high - low + 1 < MIN_CONTROLLER_PORTS:
        raise ValueError(f"the controller needs at least {MIN_CONTROLLER_PORTS} ports")
    return f"{low}-{high}"


def _check_interface(text: str | None) -> str | None:
    if text is not None and text.strip() in ("*", "0.0.0.0", "::", ""):
        raise ValueError("that listens on every interface; name one interface (eth0) or address")
    return text


def _check_packer(name: str) -> str:
    if name not in PACKERS:
        raise ValueError(f"{shown(name)} is not a packer (one of: {', '.join(PACKERS)})")
    return name


def is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# ipengine arguments globular sets itself: an engine_args that changes them would break it
_OWN_ENGINE_ARGS = (
    "--file",
    "--url",
    "--IPEngine.id",
    "--IPEngine.timeout",
    "--IPEngine.url",
    "--IPEngine.url_file",
    "--profile",
    "--profile-dir",
    "--ipython-dir",
    "--BaseIPythonApplication.profile",
    "--BaseIPythonApplication.ipython_dir",
    "--ProfileDir.location",
)
MAX_ENV_VALUE = 32 * 1024  # bytes of one engine_env value (the kernel's limit for one is 128 KiB)


def parse_env(value: Any) -> Any:
    """``OMP_NUM_THREADS=4, MKL_NUM_THREADS=4`` -> a dict (names checked)."""
    if not isinstance(value, str):
        return value
    found = {}
    for part in (p.strip() for p in value.split(",")):
        if not part:
            continue
        name, sep, text = part.partition("=")
        if not sep or not _ENV_NAME.fullmatch(name.strip()):
            raise ValueError(f"{part[:60]!r} is not NAME=VALUE")
        if "\n" in text or "\r" in text or "\0" in text:
            raise ValueError(f"the value of {name.strip()} spans lines (separate variables with commas)")
        if len(text.encode()) > MAX_ENV_VALUE:
            raise ValueError(f"the value of {name.strip()} is {len(text.encode())} bytes: at most {MAX_ENV_VALUE}")
        found[name.strip()] = text.strip()
    return found


def _check_engine_args(args: list[str]) -> list[str]:
    for arg in args:
        if arg.split("=", 1)[0] in _OWN_ENGINE_ARGS:
            raise ValueError(f"{arg!r}: globular sets {arg.split('=', 1)[0]} itself")
    return args


def _check_profile(name: str) -> None:
    try:
        local_profile(name)
    except GlobularError as exc:
        raise ValueError(str(exc).removeprefix(f"profile = {name}: ")) from None


def _gpu_engines(value: Any) -> Any:
    text = str(value).strip().lower()
    if text in ("0", "no", "off", "false", "none"):
        return "none"
    if text == "auto":
        return text
    if text.isdigit() and int(text) <= 1024:
        return int(text)
    raise PydanticCustomError("gpu_engines", "expected auto, none, or the number of GPU engines per node (1-1024)")


GpuEngines = Annotated[Literal["auto", "none"] | int, BeforeValidator(_gpu_engines)]


class IPClusterSettings(Settings):
    enable_notebook: bool = Field(default=False, description="JupyterLab on the master, HTTPS and password only")
    notebook_passwd: str | None = Field(default=None, description="default: a random one, shown once by start")
    notebook_directory: str | None = Field(default=None, description="relative to home, or absolute; default: home")
    notebook_save_limit: ByteSize = Field(
        default=ByteSize(1_000_000_000),
        description="terminate copies the notebooks home first (~/.globular/notebooks/), and the files beside "
        "them, smallest first, up to this size (1 GB, 500 MB, ...); the rest is named, not copied; notebooks "
        "alone over it: terminate refuses, saying their size",
    )
    notebook_port: int = Field(default=8888, ge=1, le=65535, description="the next free one is taken if it is in use")
    notebook_certfile: FileHere = Field(
        default=None, description="your own certificate (PEM); default: a self-signed one"
    )
    notebook_keyfile: FileHere = Field(default=None, description="the key of notebook_certfile (PEM, unencrypted)")
    packer: Annotated[str, AfterValidator(_check_packer)] = Field(
        default="json", description=f"how messages are serialized: {', '.join(PACKERS)}"
    )
    master_engines: int | None = Field(
        default=None, ge=0, description="engines on the master; default cores - 1 (at least 1)"
    )
    gpu_engines: GpuEngines = Field(
        default="none",
        description="auto: one engine per GPU a node has (nvidia-smi's, within what its allocation or "
        "CUDA_VISIBLE_DEVICES leaves; a MIG device counts as one), each pinned to its GPU by UUID with "
        "CUDA_DEVICE_ORDER=PCI_BUS_ID; N: N per node (a node with fewer fails the preflight); none: one "
        "engine per core, GPUs not looked at. A node with no GPU keeps one engine per core under auto",
    )
    cpu_engines: int | None = Field(
        default=None,
        ge=0,
        description="CPU engines beside a GPU node's GPU engines (with gpu_engines; default 0: a GPU node's "
        "cores feed its GPUs, and a CPU engine would starve them), each with CUDA_VISIBLE_DEVICES empty "
        "so that it never takes a GPU by accident",
    )
    heartbeat_period: int = Field(
        default=200,
        ge=50,
        le=60_000,
        description="controller heartbeat, ms; engines register on a beat, dead ones are noticed after 8 s or 10 beats; "
        "an engine that hears no beat for a little less than that exits (it could never register again)",
        json_schema_extra={"unit": "ms"},
    )
    engine_nanny: bool = Field(
        default=True,
        description="a nanny process per engine: needed to interrupt one engine (Client.send_signal); False starts engines faster",
    )
    engine_fork: bool = Field(
        default=True,
        description="a node's engines (and their nannies) are forked from one Python that imported ipyparallel "
        "once: about a third of the CPU an engine costs to start; False: each is its own `python -m ipyparallel.engine` "
        "(always so with restart_dead_engines, whose supervisor starts each engine)",
    )
    restart_dead_engines: bool = Field(
        default=False, description="a supervisor on each node restarts engines that die (they rejoin with new ids)"
    )
    idle_shutdown: Annotated[float | None, BeforeValidator(parse_duration)] = Field(
        default=None,
        gt=0,
        description="30m, 2h: when no task ran for that long, stop engines and controller (and release rented machines)",
        json_schema_extra={"unit": "duration"},
    )
    engine_timeout: float = Field(
        default=120.0, gt=0, description="seconds to wait for engines to register", json_schema_extra={"unit": "s"}
    )
    controller_interface: Annotated[str | None, AfterValidator(_check_interface)] = Field(
        default=None,
        description="interface name (eth0) or address the controller listens on; default: the master's address",
    )
    controller_ports: Annotated[str | None, AfterValidator(_check_ports)] = Field(
        default=None, description="FIRST-LAST: the ports the controller may use; default: random free ports"
    )
    encryption: Literal["curve", "none"] | None = Field(
        default=None,
        description="curve: CurveZMQ encrypts all traffic between clients, controller and engines; "
        "default: curve where nodes are other machines (ssh, ec2, slurm), none on the local provider (loopback)",
    )

    engine_args: Annotated[ArgList, AfterValidator(_check_engine_args)] = Field(
        default_factory=list,
        description="more ipengine arguments, split like a shell would but never run by one",
        examples=["--IPEngine.startup_command='import numpy' --log-level=DEBUG"],
        json_schema_extra={"reference_type": "arguments"},
    )
    engine_env: Annotated[dict[str, str], BeforeValidator(parse_env)] = Field(
        default_factory=dict,
        description="environment of every engine: NAME=VALUE, NAME=VALUE (OMP_NUM_THREADS is 1 unless set here)",
        examples=["OMP_NUM_THREADS=4, MY_DATA=/scratch/data"],
        json_schema_extra={"reference_type": "NAME=VALUE, ..."},
    )
    engine_startup: FileHere = Field(
        default=None, description="a Python file here, copied to the nodes and run on every engine as it starts"
    )
    engine_workdir: str | None = Field(
        default=None,
        description="the engines' working folder on the nodes (made if missing; ~ is the node user's home); "
        "default: the node's folder",
    )
    profile: Annotated[str | None, checked_when_read(_check_profile)] = Field(
        default=None,
        description="an IPython profile here (NAME for ~/.ipython/profile_NAME, or a folder): its ipengine_config.py, "
        "ipcontroller_config.py and startup/ files are copied to the nodes",
    )

    @model_validator(mode="after")
    def _one_way_to_start_engines(self) -> IPClusterSettings:
        """How engines start is decided once, here: restart_dead_engines' supervisor starts each
        engine as its own Python, so engine_fork is off with it (asked for both: refused)."""
        if self.restart_dead_engines and self.engine_fork:
            if "engine_fork" in self.model_fields_set:
                raise PydanticCustomError(
                    "conflicting_settings",
                    "engine_fork = true and restart_dead_engines = true: the supervisor starts each engine "
                    "itself; set engine_fork = false, or drop restart_dead_engines",
                    {"key": "engine_fork"},  # the setting the error names (see spec.validated)
                )
            object.__setattr__(self, "engine_fork", False)  # the model is frozen: set while it is made
        if self.cpu_engines is not None and not self.wants_gpus:
            raise PydanticCustomError(
                "conflicting_settings",
                "cpu_engines counts the CPU engines beside a GPU node's GPU engines: set gpu_engines "
                "(auto or a number), or drop cpu_engines",
                {"key": "cpu_engines"},
            )
        return self

    @property
    def allowed_ports(self) -> list[int] | None:
        """The ports of ``controller_ports`` (None: any free port)."""
        return list(port_range(self.controller_ports)) if self.controller_ports else None

    @property
    def wants_gpus(self) -> bool:
        """GPU engines are asked for (``gpu_engines`` is ``auto`` or a number): nodes are asked for
        their GPUs, and engines get CUDA_VISIBLE_DEVICES."""
        return self.gpu_engines != "none"

    @property
    def packer_spec(self) -> Packer:
        return PACKERS[self.packer]


def heartbeat_misses(period_ms: int) -> int:
    """Missed beats before the controller drops an engine: about 8 s, and at least ipyparallel's 10."""
    return max(10, math.ceil(DEATH_WINDOW_MS / period_ms))


def engine_heartbeat_misses(period_ms: int) -> int:
    """Checks without a ping from the controller before an engine exits (``IPEngine.max_heartbeat_misses``).

    The controller drops an engine it has not heard for :func:`heartbeat_misses` beats, and then
    ignores it for good ("ignoring new heart"): an engine cut off that long (a partition, a
    controller that stalled) would live on unregistered, never given a task again.  So each
    engine gives up first, at least two checks before the controller would drop it: it exits,
    and is dead (``status``), or is started again by the supervisor (``restart_dead_engines``)
    and registers anew once the controller is back.  ipyparallel's default (50 checks, 35 s at
    200 ms) leaves half a minute in which neither side acts."""
    check = period_ms + HB_CHECK_EXTRA_MS
    return max(1, (heartbeat_misses(period_ms) * period_ms - 2 * check) // check)


def encryption_of(settings: IPClusterSettings, remote_nodes: bool) -> str:
    """``curve`` or ``none``: the setting, else curve where the nodes are other machines."""
    return settings.encryption or ("curve" if remote_nodes else "none")


def gpus_used(settings: IPClusterSettings, gpus: int) -> int:
    """How many of a node's ``gpus`` get an engine (0: none, the node runs CPU engines)."""
    if not settings.wants_gpus or not gpus:
        return 0
    return gpus if settings.gpu_engines == "auto" else min(int(settings.gpu_engines), gpus)


def engines_for(node: NodeRecord, settings: IPClusterSettings, gpus: int = 0) -> int:
    """Engines on ``node``: one per core, the master keeping a core for the controller; a node
    with ``gpus`` (under ``gpu_engines``): its GPU engines, and ``cpu_engines`` beside them."""
    if gpus_used(settings, gpus):
        return gpus_used(settings, gpus) + (settings.cpu_engines or 0)
    if node.is_master:
        if settings.master_engines is not None:
            return settings.master_engines
        return max(1, node.cores - 1)
    return node.cores
