"""A cluster as data: the validated specification built from the config.

The spec is what ``start`` needs and what the state record keeps, so that later
commands (``addnode``, ``runplugin``) use the settings the cluster started with.
"""

from __future__ import annotations

import difflib
import re
import shutil
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
)

from globular.errors import ConfigError


def split_commas(value: Any) -> Any:
    """``"a, b ,c"`` -> ``["a", "b", "c"]``; lists pass through."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


CommaList = Annotated[list[str], BeforeValidator(split_commas)]


def split_args(value: Any) -> Any:
    """``--mem=8G --gres='gpu:1'`` -> a list, split as a shell would (never run by one)."""
    import shlex

    if isinstance(value, str):
        try:
            return shlex.split(value)
        except ValueError as exc:
            raise ValueError(f"cannot split {value!r} into arguments: {exc}") from None
    return value


ArgList = Annotated[list[str], BeforeValidator(split_args)]  # command-line arguments from one config value


def check_requirements(values: list[str]) -> list[str]:
    """Each value must be a pip requirement (``numpy``, ``numpy>=2``, ``scipy==1.14.1``)."""
    from packaging.requirements import InvalidRequirement, Requirement

    for value in values:
        try:
            Requirement(value)
        except InvalidRequirement as exc:
            raise ValueError(
                f"{value!r} is not a package requirement such as numpy or numpy>=2 ({str(exc).splitlines()[0]})"
            ) from None
    return values


READING_CONFIG = "reading_config"  # validation context: the settings come from the config file now


def _here(kind: Literal["file", "program"], value: str) -> str | None:
    """Why ``value`` does not name a ``kind`` on this machine (None: it does)."""
    path = Path(value).expanduser()
    if kind == "program":
        return None if shutil.which(str(path)) else f"{value} is not a program here (a path, or a name on PATH)"
    return None if path.is_file() else f"{value} is not a file here"


def checked_when_read(check: Callable[[str], None]) -> AfterValidator:
    """A check of a setting's value (``check`` raises ValueError) run when the config is read,
    where the error names file, line, section and key; not when a running cluster's record is
    read again (a file may have gone since: what uses it says so then)."""

    def run(value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and (info.context or {}).get(READING_CONFIG):
            check(value)
        return value

    return AfterValidator(run)


def path_here(kind: Literal["file", "program"]) -> AfterValidator:
    """A setting that names a file or a program on this machine (checked when read)."""

    def check(value: str) -> None:
        problem = _here(kind, value)
        if problem:
            raise ValueError(problem)

    return checked_when_read(check)


FileHere = Annotated[str | None, path_here("file")]  # a file on this machine (~ expanded)
ProgramHere = Annotated[str | None, path_here("program")]  # a program on this machine: a path, or a name on PATH


_DURATION = re.compile(r"^\s*(?:(\d+(?:\.\d+)?)\s*h)?\s*(?:(\d+(?:\.\d+)?)\s*m)?\s*(?:(\d+(?:\.\d+)?)\s*s)?\s*$")


def parse_duration(value: Any) -> Any:
    """``30m``, ``2h``, ``1h30m``, ``90s`` (a bare number is minutes) -> seconds."""
    if value is None or isinstance(value, (int, float)):
        return value
    text = str(value).strip().lower()
    if re.fullmatch(r"\d+(?:\.\d+)?", text):
        return float(text) * 60
    match = _DURATION.match(text)
    if not text or not match or not any(match.groups()):
        raise ValueError(f"{value!r} is not a duration (such as 30m, 2h, 1h30m, 90s)")
    hours, minutes, seconds = (float(g) if g else 0.0 for g in match.groups())
    return hours * 3600 + minutes * 60 + seconds


class Settings(BaseModel):
    """Base of every typed settings block: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


S = TypeVar("S", bound=Settings)


class TypedSettings(BaseModel):
    """A spec whose settings (JSON in the record) travel with their typed form: validated once
    by the config, or on first use after the record is read, then kept."""

    _typed: dict[type[Settings], Settings] = PrivateAttr(default_factory=dict)

    def _as(self, model: type[S], values: dict[str, Any]) -> S:
        typed = self._typed.get(model)
        if not isinstance(typed, model):
            typed = self._typed[model] = model.model_validate(values)
        return typed

    def keep_typed(self, settings: Settings) -> None:
        """``settings`` is what the spec's values say, already validated (by the config)."""
        self._typed[type(settings)] = settings


class PluginSpec(TypedSettings):
    """One ``[plugin NAME]`` section, resolved."""

    name: str
    setup_class: str  # canonical "module:Class"
    settings: dict[str, Any] = Field(default_factory=dict)

    def typed_settings(self, model: type[S]) -> S:
        """``settings`` as the plugin's ``model``, validated once."""
        return self._as(model, self.settings)


class EnvironmentSpec(BaseModel):
    """The Python environment of the nodes (see :mod:`globular.environment`)."""

    mode: Literal["managed", "system"] | None = None  # None: the provider's default
    packages: list[str] = Field(default_factory=list)  # the [cluster] section's ``packages``
    requirements: str | None = None  # absolute path of a requirements file
    wheelhouse: str | None = None  # absolute path of a folder of wheels (no index)


class BalanceSpec(BaseModel):
    """The balancer's bounds and pace (``min_nodes`` in ``[cluster]`` turns it on): nodes and
    seconds, see :mod:`globular.balance`."""

    min_nodes: int = Field(ge=1)
    max_nodes: int = Field(ge=1)
    polling_interval: float = Field(default=5.0, gt=0)
    wait_time: float = Field(default=10.0, ge=0)
    add_nodes_per_iteration: int = Field(default=1, ge=1)
    kill_after: float = Field(default=60.0, gt=0)
    stabilization_time: float = Field(default=30.0, ge=0)
    replace_before: float = Field(default=300.0, ge=0)


class ClusterSpec(TypedSettings):
    """One ``[cluster NAME]`` template with ``extends`` resolved and values validated."""

    template: str
    config_file: str | None = None
    cluster_size: int = Field(ge=1)
    provider: str
    provider_settings: dict[str, Any] = Field(default_factory=dict)
    plugins: list[PluginSpec] = Field(default_factory=list)
    environment: EnvironmentSpec = Field(default_factory=EnvironmentSpec)
    max_nodes: int | None = None  # the most nodes the cluster may have: start, addnode and the balancer
    balance: BalanceSpec | None = None  # min_nodes set: the balancer's settings

    def typed_provider_settings(self, model: type[S]) -> S:
        """``provider_settings`` as the provider's ``model``, validated once."""
        return self._as(model, self.provider_settings)


def shown(value: Any, limit: int = 60) -> str:
    """``value`` for an error message: its repr, cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 16]}... ({len(str(value))} characters)"


def _wants_int(annotation: Any) -> bool:
    """``int`` or ``int | None`` (not bool, not float)."""
    if annotation is int:
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args == [int]
    return False


def number_text(value: float) -> str:
    """``10.0`` -> ``10``, ``0.5`` -> ``0.5``: a number as a person writes it in a config."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def did_you_mean(key: str, known: Mapping[str, str]) -> str:
    """`` (did you mean X?)`` for the key of ``known`` nearest to ``key`` (its value: where that
    key belongs, when not here), or nothing when none is near."""
    near = difflib.get_close_matches(key.lower(), list(known), n=1, cutoff=0.7)
    if not near:
        return ""
    where = known[near[0]]
    if near[0] == key.lower():  # the key itself, of another kind of section
        return f"; it is {where}"
    return f"; did you mean {near[0]}{f' ({where})' if where else ''}?"


def error_in_words(err: Mapping[str, Any]) -> str:
    """A validation error in globular's words (pydantic's own, "Input should be ...", never reach a user)."""
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind in ("value_error", "assertion_error") and "error" in ctx:
        return str(ctx["error"])
    fixed = {
        "bool_parsing": "expected true or false (also: yes/no, on/off, 1/0)",
        "bool_type": "expected true or false",
        "int_parsing": "expected a whole number",
        "int_type": "expected a whole number",
        "int_from_float": "expected a whole number",
        "float_parsing": "expected a number",
        "float_type": "expected a number",
        "string_type": "expected text",
        "list_type": "expected a comma-separated list",
        "dict_type": "expected NAME=VALUE pairs",
        "byte_size": "expected a size such as 500 MB, 1 GB or 2 GiB",
        "byte_size_unit": "expected a size such as 500 MB, 1 GB or 2 GiB",
        "finite_number": "expected a finite number",
    }
    if kind in fixed:
        return fixed[kind]
    bounds = {
        "greater_than_equal": ("ge", "at least"),
        "greater_than": ("gt", "more than"),
        "less_than_equal": ("le", "at most"),
        "less_than": ("lt", "less than"),
    }
    if kind in bounds:
        name, words = bounds[kind]
        bound = ctx.get(name)
        return f"must be {words} {number_text(bound) if isinstance(bound, int | float) else bound}"
    if kind == "literal_error":
        return "expected " + str(ctx.get("expected", "")).replace("'", "")
    if kind in ("string_too_long", "too_long"):
        return f"too long (at most {ctx.get('max_length')})"
    if kind in ("string_too_short", "too_short"):
        return f"too short (at least {ctx.get('min_length')})"
    if str(err["msg"]).startswith(("Input should", "Value error", "Assertion failed")):  # anything not named above
        return "not a valid value for this setting"
    return str(err["msg"])  # a PydanticCustomError: globular's own words already


def validate_settings(
    model: type[Settings],
    raw: Mapping[str, Any],
    *,
    file: str | None,
    section: str,
    sections: Mapping[str, str] | None = None,
    owner: str = "",
    known: Callable[[], Mapping[str, str]] | None = None,
) -> Settings:
    """Validate ``raw`` (a section of the config file being read) against ``model``; the first
    problem becomes a ConfigError, in globular's words.

    ``sections`` maps a key to the section it was written in (for keys inherited
    through ``extends``), so the error names the right one.  ``known``: every key such a
    section may hold (key -> where it belongs, when not here), for an unknown key's
    "did you mean"; default: ``model``'s own.
    """
    for name, value in raw.items():  # INI values are text: "1_0" and "1.0" are not whole numbers to a person
        field = model.model_fields.get(name)
        wants_int = field is not None and _wants_int(field.annotation)
        if wants_int and isinstance(value, str) and not re.fullmatch(r"\s*[+-]?\d+\s*", value):
            where = (sections or {}).get(name, section)
            raise ConfigError(f"expected a whole number, got {shown(value)}", file=file, section=where, key=name)
    try:
        return model.model_validate(dict(raw), context={READING_CONFIG: True})
    except ValidationError as exc:
        err = exc.errors()[0]
        # a check of several settings (a model validator) names the one it is about in its context
        key = str(err["loc"][0]) if err["loc"] else (err.get("ctx") or {}).get("key")
        where = (sections or {}).get(key or "", section)
        if err["type"] == "extra_forbidden":
            names = known() if known else dict.fromkeys(model.model_fields, "")
            valid = ", ".join(sorted(k for k, elsewhere in names.items() if not elsewhere)) or "none"
            hint = did_you_mean(key or "", names)
            message = f"unknown setting{' for ' + owner if owner else ''}{hint} (known: {valid})"
        elif err["type"] == "missing" and key in model.model_fields:
            about = model.model_fields[key].description
            message = f"required setting is missing{f' ({about})' if about else ''}"
        else:
            value = raw.get(key) if key else None
            message = error_in_words(err)
            message = message if len(message) <= 200 else message[:150] + "..."
            if value is not None and not message.startswith((str(value), shown(value))):  # named first already
                message += f", got {shown(value)}"
            if value is not None and re.search(r"\s[#;]", str(value)):
                message += " (a comment goes on a line of its own: '# ...' after a value is part of it)"
        raise ConfigError(message, file=file, section=where, key=key) from None
