"""A cluster as data: the validated specification built from the config.

The spec is what ``start`` needs and what the state record keeps, so that later
commands (``addnode``, ``runplugin``) use the settings the cluster started with.
"""

from __future__ import annotations

import re
import types
import typing
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

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


class Settings(BaseModel):
    """Base of every typed settings block: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class PluginSpec(BaseModel):
    """One ``[plugin NAME]`` section, resolved."""

    name: str
    setup_class: str  # canonical "module:Class"
    settings: dict[str, Any] = Field(default_factory=dict)


class EnvironmentSpec(BaseModel):
    """The Python environment of the nodes (see :mod:`globular.environment`)."""

    mode: Literal["managed", "system"] | None = None  # None: the provider's default
    packages: list[str] = Field(default_factory=list)  # the [cluster] section's ``packages``
    requirements: str | None = None  # absolute path of a requirements file
    wheelhouse: str | None = None  # absolute path of a folder of wheels (no index)


class ClusterSpec(BaseModel):
    """One ``[cluster NAME]`` template with ``extends`` resolved and values validated."""

    template: str
    config_file: str | None = None
    cluster_size: int = Field(ge=1)
    provider: str
    provider_settings: dict[str, Any] = Field(default_factory=dict)
    plugins: list[PluginSpec] = Field(default_factory=list)
    environment: EnvironmentSpec = Field(default_factory=EnvironmentSpec)


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


def validate_settings(
    model: type[Settings],
    raw: Mapping[str, Any],
    *,
    file: str | None,
    section: str,
    sections: Mapping[str, str] | None = None,
    owner: str = "",
) -> Settings:
    """Validate ``raw`` against ``model``; the first problem becomes a ConfigError.

    ``sections`` maps a key to the section it was written in (for keys inherited
    through ``extends``), so the error names the right one.
    """
    for name, value in raw.items():  # INI values are text: "1_0" and "1.0" are not whole numbers to a person
        field = model.model_fields.get(name)
        wants_int = field is not None and _wants_int(field.annotation)
        if wants_int and isinstance(value, str) and not re.fullmatch(r"\s*[+-]?\d+\s*", value):
            where = (sections or {}).get(name, section)
            raise ConfigError(f"expected a whole number, got {shown(value)}", file=file, section=where, key=name)
    try:
        return model.model_validate(dict(raw))
    except ValidationError as exc:
        err = exc.errors()[0]
        # a check of several settings (a model validator) names the one it is about in its context
        key = str(err["loc"][0]) if err["loc"] else (err.get("ctx") or {}).get("key")
        where = (sections or {}).get(key or "", section)
        if err["type"] == "extra_forbidden":
            known = ", ".join(sorted(model.model_fields)) or "none"
            message = f"unknown setting{' for ' + owner if owner else ''} (known: {known})"
        elif err["type"] == "missing" and key in model.model_fields:
            about = model.model_fields[key].description
            message = f"required setting is missing{f' ({about})' if about else ''}"
        else:
            value = raw.get(key) if key else None
            message = err["msg"] if len(err["msg"]) <= 200 else err["msg"][:150] + "..."
            if value is not None:
                message += f", got {shown(value)}"
                if re.search(r"\s[#;]", str(value)):
                    message += " (a comment goes on a line of its own: '# ...' after a value is part of it)"
        raise ConfigError(message, file=file, section=where, key=key) from None
