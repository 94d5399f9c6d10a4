"""The config file: StarCluster's INI format.

``[global] default_template``, ``[cluster NAME]`` templates with ``extends``,
``[plugin NAME]`` sections with ``setup_class`` and typed settings.  Every error
names the file, the section and the key (and the line where it can).

(Longer than most modules: the reader of one format, read top to bottom — sections,
``extends``, the provider's and the plugins' typed settings, the environment — kept
together so that every error is found and worded the same way; the settings' reference is
:mod:`globular.reference`.)
"""

from __future__ import annotations

import configparser
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field

from globular.bounds import BoundsProblem, BoundsSettings, cluster_bounds
from globular.errors import BadInput, ConfigError, GlobularError
from globular.paths import default_config_path
from globular.registry import RegistryError, plugin_names, provider_class, provider_names, resolve_plugin
from globular.spec import (
    ClusterSpec,
    CommaList,
    EnvironmentSpec,
    PluginSpec,
    Settings,
    check_requirements,
    did_you_mean,
    validate_settings,
)

BUILTIN_CONFIG = """\
[global]
default_template = local

[cluster local]
provider = local
cluster_size = 2
plugins = ipcluster

[plugin ipcluster]
setup_class = ipcluster

[plugin ipclusterrestart]
setup_class = ipclusterrestart

[plugin ipclusterstop]
setup_class = ipclusterstop
"""

# Section kinds globular reads; "aws info", "key" and "permission" belong to the
# ec2 provider and are kept as they are for it.
KEYED_KINDS = ("cluster", "plugin", "key", "permission")
SINGLE_KINDS = ("global", "aws info")


class GlobalSettings(Settings):
    default_template: str | None = Field(default=None, description="the [cluster] template used when none is named")


class ClusterSettings(BoundsSettings):
    """Keys every ``[cluster]`` section may have, whatever its provider (with the balancer's,
    :mod:`globular.bounds`)."""

    extends: str | None = Field(
        default=None, description="another [cluster] template whose settings this one starts from"
    )
    cluster_size: int | None = Field(
        default=None, ge=1, description="default: the provider's (local: 2, ssh: every host)"
    )
    provider: str = Field(
        default="local", description="where the nodes come from: local, ssh, ec2, slurm (or an installed provider)"
    )
    plugins: CommaList = Field(default_factory=list, description="[plugin NAME] sections to run, in order")
    environment: Literal["managed", "system"] | None = Field(
        default=None,
        description="managed: globular builds each node's Python environment; system: the hosts' Python has everything",
    )
    packages: Annotated[CommaList, AfterValidator(check_requirements)] = Field(
        default_factory=list, description="requirements installed on every node: numpy>=2, scipy"
    )
    requirements: str | None = Field(
        default=None, description="a requirements file (relative to the config file) for every node"
    )
    wheelhouse: str | None = Field(
        default=None, description="a folder of wheels used instead of the package index (air-gapped)"
    )


MAX_CONFIG_BYTES = 1 << 20  # a config file is a page of text; anything bigger is a mistake


def read_config_file(path: Path) -> bytes:
    """The bytes of ``path``, which must be a regular file of at most MAX_CONFIG_BYTES (a FIFO
    would hang, ``/dev/zero`` would fill memory)."""
    import stat

    mode = path.stat().st_mode
    if stat.S_ISDIR(mode):
        raise ConfigError("is a folder, not a config file", file=str(path))
    if not stat.S_ISREG(mode):
        raise ConfigError("is not a regular file (a pipe or a device?)", file=str(path))
    with open(path, "rb") as f:
        data = f.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"is larger than {MAX_CONFIG_BYTES // 1024} KiB: not a config file", file=str(path))
    return data


_HEADER = re.compile(r"^\s*\[(?P<name>[^\]]+)\]")
_KEY = re.compile(r"^(?P<key>[^\s=:;#\[][^=:]*?)\s*[=:]")


@dataclass
class Config:
    """A parsed config file (or the built-in default when there is none)."""

    file: str | None
    text: str
    global_settings: GlobalSettings
    clusters: dict[str, dict[str, str]] = field(default_factory=dict)
    plugins: dict[str, dict[str, str]] = field(default_factory=dict)
    extra_sections: dict[str, dict[str, str]] = field(default_factory=dict)

    # -- loading -------------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None) -> Config:
        """Read ``path``, else ``$GLOBULAR_CONFIG``, else ``~/.globular/config``.

        With no file at the default place, the built-in default is used; a file
        named explicitly (argument or environment) must exist.
        """
        explicit = path is not None or "GLOBULAR_CONFIG" in os.environ
        target = Path(path).expanduser() if path is not None else default_config_path()
        if not target.exists():
            if explicit:
                raise ConfigError("config file not found", file=str(target))
            return cls.builtin()
        try:
            data = read_config_file(target)
        except OSError as exc:
            raise ConfigError(f"cannot read config file: {exc.strerror}", file=str(target)) from None
        return cls.from_bytes(data, file=str(target))

    @classmethod
    def builtin(cls) -> Config:
        return cls.from_text(BUILTIN_CONFIG, file=None)

    @classmethod
    def from_bytes(cls, data: bytes, *, file: str | None) -> Config:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(
                f"not a text file: byte 0x{data[exc.start]:02x} at offset {exc.start} is not UTF-8", file=file
            ) from None
        if "\x00" in text:
            raise ConfigError(f"not a text file: NUL byte at offset {text.index(chr(0))}", file=file)
        return cls.from_text(text, file=file)

    @classmethod
    def from_text(cls, text: str, *, file: str | None) -> Config:
        parser = configparser.ConfigParser(interpolation=None, strict=True, default_section="\x00none")
        try:
            parser.read_string(text, source=file or "<built-in>")
        except configparser.Error as exc:
            raise _syntax_error(exc, file) from None
        if not parser.sections():
            raise ConfigError("the file is empty: it defines no [cluster NAME] template", file=file)

        config = cls(file=file, text=text, global_settings=GlobalSettings())
        for section in parser.sections():
            values = dict(parser.items(section))
            kind, name = _split_header(section)
            if kind == "global":
                config.global_settings = config._validate(  # type: ignore[assignment]
                    GlobalSettings, values, section=section, owner="[global]"
                )
            elif kind == "cluster":
                config.clusters[name] = values
            elif kind == "plugin":
                config.plugins[name] = values
            elif kind in KEYED_KINDS or kind in SINGLE_KINDS:
                config.extra_sections[section] = values
            else:
                hint = did_you_mean(kind, dict.fromkeys((*SINGLE_KINDS, *KEYED_KINDS), ""))
                raise ConfigError(
                    f"unknown section type {kind!r}{hint} (known: global, cluster NAME, plugin NAME, "
                    "aws info, key NAME, permission NAME)",
                    file=file,
                    section=section,
                    line=config.line_of(section),
                )
            if kind in KEYED_KINDS and not name:
                raise ConfigError(f"section needs a name: [{kind} NAME]", file=file, section=section)
        if not config.clusters:
            raise ConfigError("defines no [cluster NAME] template", file=file)
        return config

    # -- queries -------------------------------------------------------------

    @property
    def templates(self) -> list[str]:
        return sorted(self.clusters)

    def line_of(self, section: str, key: str | None = None) -> int | None:
        """The line number where ``[section]`` (or its ``key``) is written."""
        current = None
        for number, line in enumerate(self.text.splitlines(), start=1):
            header = _HEADER.match(line)
            if header:
                current = header.group("name").strip()
                if key is None and current == section:
                    return number
                continue
            if key is not None and current == section:
                match = _KEY.match(line)
                if match and match.group("key").strip().lower() == key:
                    return number
        return None

    def error(self, message: str, section: str | None = None, key: str | None = None) -> ConfigError:
        line = self.line_of(section, key) if section else None
        return ConfigError(message, file=self.file or "<built-in config>", section=section, key=key, line=line)

    def _validate(self, model: type[Settings], raw: dict[str, str], **kwargs: Any) -> Settings:
        try:
            return validate_settings(model, raw, file=self.file or "<built-in config>", **kwargs)
        except ConfigError as exc:
            if exc.section:
                exc.line = self.line_of(exc.section, exc.key)
            raise

    def _default_template(self) -> str:
        name = self.global_settings.default_template
        if name:
            return name
        raise ConfigError(
            f"no cluster template chosen: pass `-c TEMPLATE` or set default_template in [global] "
            f"(templates: {', '.join(self.templates)})",
            file=self.file,
            section="global",
            key="default_template",
        )

    def _merged(self, template: str) -> tuple[dict[str, str], dict[str, str]]:
        """Settings of ``template`` with its ``extends`` chain applied.

        Returns (values, key -> section that set it).
        """
        chain: list[str] = []
        name = template
        while True:
            if name in chain:
                cycle = " -> ".join([*chain, name])
                raise self.error(f"extends forms a cycle: {cycle}", f"cluster {chain[-1]}", "extends")
            chain.append(name)
            parent = self.clusters[name].get("extends")
            if not parent:
                break
            parent = parent.strip()
            if parent not in self.clusters:
                raise self.error(
                    f"extends unknown template {parent!r} (templates: {', '.join(self.templates)})",
                    f"cluster {name}",
                    "extends",
                )
            name = parent
        values: dict[str, str] = {}
        sections: dict[str, str] = {}
        for name in reversed(chain):  # root first, the template itself last
            for key, value in self.clusters[name].items():
                if key == "extends":
                    continue
                values[key] = value
                sections[key] = f"cluster {name}"
        return values, sections

    def sources(self, template: str) -> dict[str, str]:
        """Where each value of ``template`` (resolved: a valid one) is written: key -> section
        (``cluster base`` for a key inherited through ``extends``, ``aws info``, ``key NAME``)."""
        values, sections = self._merged(template)
        provider = values.get("provider", ClusterSettings.model_fields["provider"].default).strip()
        own = {k: v for k, v in values.items() if k not in ClusterSettings.model_fields}
        return provider_class(provider).config_values(own, sections, self.extra_sections)[1]

    def loadable_specs(self) -> list[ClusterSpec]:
        """The spec of every template that loads (a broken one is reported by the commands that use it)."""
        specs = []
        for template in self.templates:
            try:
                specs.append(self.cluster_spec(template))
            except GlobularError:
                continue
        return specs

    def cluster_spec(self, template: str | None = None, cluster_size: int | None = None) -> ClusterSpec:
        """The validated spec of ``template`` (default: ``default_template``)."""
        chosen = template is None
        if template is None:
            template = self._default_template()
        if template not in self.clusters:
            known = f"templates: {', '.join(self.templates)}" if self.templates else "there is none"
            if chosen:  # it came from [global] default_template: point there
                raise self.error(f"names no [cluster {template}] section ({known})", "global", "default_template")
            raise ConfigError(f"no [cluster {template}] section ({known})", file=self.file)
        values, sections = self._merged(template)
        section = f"cluster {template}"

        common_keys = set(ClusterSettings.model_fields)
        common = self._validate(
            ClusterSettings,
            {k: v for k, v in values.items() if k in common_keys},
            section=section,
            sections=sections,
        )
        assert isinstance(common, ClusterSettings)
        try:
            provider_cls = provider_class(common.provider)
        except RegistryError as exc:
            where = sections.get("provider", section)
            raise self.error(str(exc), where, "provider") from None
        own = {k: v for k, v in values.items() if k not in common_keys}
        if "max_nodes" in values and "max_nodes" in provider_cls.Settings.model_fields:
            own["max_nodes"] = values["max_nodes"]  # one meaning: ec2's cap is the cluster's
        try:  # values the provider takes from sections of its own ([aws info], [key NAME])
            own, sections = provider_cls.config_values(own, sections, self.extra_sections)
        except ConfigError as exc:
            raise self.error(exc.message, exc.section or section, exc.key) from None
        provider_settings = self._validate(
            provider_cls.Settings,
            own,
            section=section,
            sections=sections,
            owner=f"provider {common.provider!r}",
            known=lambda: cluster_keys(common.provider),
        )
        twice = sorted({name for name in common.plugins if common.plugins.count(name) > 1})
        if twice:
            raise self.error(
                f"lists {', '.join(twice)} twice: each plugin runs once", sections.get("plugins", section), "plugins"
            )
        plugins = [self.plugin_spec(name, referenced_from=sections.get("plugins", section)) for name in common.plugins]
        environment = self._environment(common, sections, section, provider_cls.default_environment, plugins)
        try:
            config_size, max_nodes, balance = cluster_bounds(
                common, cluster_size or common.cluster_size, provider_cls.max_nodes(provider_settings), common.provider
            )
        except BoundsProblem as exc:
            if cluster_size and exc.key == "cluster_size":  # it came from the command line
                raise BadInput(f"-s {cluster_size}: {exc.message}") from None
            raise self.error(exc.message, sections.get(exc.key, section), exc.key) from None
        size = config_size or provider_cls.default_cluster_size(provider_settings)
        if max_nodes is not None and size > max_nodes:  # the provider's default, above the cap
            size = max_nodes
        problem = provider_cls.size_problem(provider_settings, size)
        if problem:
            key, message = problem
            if cluster_size and key == "cluster_size":  # it came from the command line
                raise BadInput(f"-s {cluster_size}: {message}")
            raise self.error(message, sections.get(key, section), key)
        spec = ClusterSpec(
            template=template,
            config_file=self.file,
            cluster_size=size,
            provider=common.provider,
            provider_settings=provider_settings.model_dump(mode="json"),
            plugins=plugins,
            environment=environment,
            max_nodes=max_nodes,
            balance=balance,
        )
        spec.keep_typed(provider_settings)
        return spec

    def _environment(
        self, common: ClusterSettings, sections: dict[str, str], section: str, default: str, plugins: list[PluginSpec]
    ) -> EnvironmentSpec:
        """The ``[cluster]`` section's environment keys, with paths made absolute and checked."""
        base = Path(self.file).parent if self.file else Path.cwd()

        def path(key: str, value: str | None, want_dir: bool) -> str | None:
            if value is None:
                return None
            found = (base / Path(value).expanduser()).resolve()
            if not (found.is_dir() if want_dir else found.is_file()):
                what = "folder" if want_dir else "file"
                raise self.error(f"{what} {str(found)!r} does not exist", sections.get(key, section), key)
            return str(found)

        mode = common.environment or default
        if mode == "system":
            for key in ("packages", "requirements", "wheelhouse"):
                if getattr(common, key):
                    raise self.error(
                        f"{key} go into the node environment globular makes, but this template has environment = system"
                        f"{'' if common.environment else f' (the default of provider {common.provider!r})'}: "
                        "set environment = managed, or install them on the hosts yourself",
                        sections.get(key, section),
                        key,
                    )
            for plugin in plugins:
                _, cls = resolve_plugin(plugin.setup_class)
                if cls.needs_managed_environment:
                    raise self.error(
                        f"plugin {plugin.name!r} installs packages into the node environment globular makes, but this "
                        f"template has environment = system: set environment = managed in [{section}]",
                        f"plugin {plugin.name}",
                        "setup_class",
                    )
        return EnvironmentSpec(
            mode=common.environment,
            packages=list(common.packages),
            requirements=path("requirements", common.requirements, want_dir=False),
            wheelhouse=path("wheelhouse", common.wheelhouse, want_dir=True),
        )

    def plugin_spec(self, name: str, *, referenced_from: str | None = None) -> PluginSpec:
        """The ``[plugin NAME]`` section, resolved and validated.

        An installed plugin's name (``ipcluster``, ``ipclusterrestart``) works without a section
        of its own: its settings are then its defaults.
        """
        section = f"plugin {name}"
        if name in self.plugins:
            raw = dict(self.plugins[name])
            setup_class = raw.pop("setup_class", None)
            if not setup_class:
                raise self.error("missing setup_class (the plugin's class)", section, "setup_class")
        elif name in plugin_names():
            raw, setup_class = {}, name
        else:
            raise self.error(
                f"names plugin {name!r}, but there is no [plugin {name}] section and no installed plugin of "
                f"that name (installed: {', '.join(plugin_names())})",
                referenced_from,
                "plugins",
            )
        try:
            canonical, cls = resolve_plugin(setup_class.strip())
        except RegistryError as exc:
            raise self.error(str(exc), section, "setup_class") from None
        settings = self._validate(
            cls.Settings,
            raw,
            section=section,
            owner=f"plugin class {cls.__name__}",
        )
        spec = PluginSpec(name=name, setup_class=canonical, settings=settings.model_dump(mode="json"))
        spec.keep_typed(settings)
        return spec


def cluster_keys(provider: str) -> dict[str, str]:
    """Every key a ``[cluster]`` section may hold: those of every template and of ``provider``
    (-> ""), and those of the other installed providers and of the plugins (-> whose they are)."""
    keys = dict.fromkeys(ClusterSettings.model_fields, "")
    for name in provider_names():
        try:
            fields = provider_class(name).Settings.model_fields
        except RegistryError:  # a broken third-party provider says so when it is used
            continue
        for key in fields:
            if name == provider:
                keys[key] = ""
            else:
                keys.setdefault(key, f"a setting of provider {name}")
    for name in plugin_names():
        try:
            _, plugin = resolve_plugin(name)
        except RegistryError:
            continue
        for key in plugin.Settings.model_fields:
            keys.setdefault(key, f"a setting of [plugin {name}]")
    return keys


def _split_header(section: str) -> tuple[str, str]:
    text = " ".join(section.split())
    lowered = text.lower()
    for kind in SINGLE_KINDS:
        if lowered == kind:
            return kind, ""
    kind, _, name = text.partition(" ")
    return kind.lower(), name


def _syntax_error(exc: configparser.Error, file: str | None) -> ConfigError:
    if isinstance(exc, configparser.MissingSectionHeaderError):
        return ConfigError(f"text before the first [section] header: {exc.line.strip()!r}", file=file, line=exc.lineno)
    if isinstance(exc, configparser.DuplicateSectionError):
        return ConfigError("section appears twice", file=file, section=exc.section, line=exc.lineno)
    if isinstance(exc, configparser.DuplicateOptionError):
        return ConfigError(
            "key appears twice in the section", file=file, section=exc.section, key=exc.option, line=exc.lineno
        )
    if isinstance(exc, configparser.ParsingError):
        lineno, line = exc.errors[0] if exc.errors else (None, "")
        return ConfigError(f"cannot parse line {line.strip()!r} (expected `key = value`)", file=file, line=lineno)
    return ConfigError(f"syntax error: {exc}", file=file)
