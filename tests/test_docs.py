"""The docs never show a line that fails: the code blocks they mark to run are run, and their
worked examples (a provider, a plugin) are installed and used the way a third party would.

A block is marked by a MyST comment line just before it: ``% run`` (run it; a ``bash`` block
line by line, each a ``globular`` command, a ``python`` block as a script) or ``% output``
(the previous block's output, compared).  The blocks of one page run in order, as a reader
types them, against a fresh ``GLOBULAR_HOME``; whatever a page started is terminated after.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

DOCS = Path(__file__).parent.parent / "docs"
FENCE = re.compile(r"^% (run|output)\b[^\n]*\n```(\w*)\n(.*?)^```", re.S | re.M)


@dataclass
class Block:
    page: str
    kind: str  # run or output
    language: str
    text: str


def marked_blocks() -> dict[str, list[Block]]:
    pages: dict[str, list[Block]] = {}
    for path in sorted(DOCS.rglob("*.md")):
        if "_build" in path.parts:
            continue
        page = str(path.relative_to(DOCS))
        for kind, language, text in FENCE.findall(path.read_text()):
            pages.setdefault(page, []).append(Block(page, kind, language, text))
    return pages


def test_the_marker_finds_the_getting_started_blocks():
    blocks = marked_blocks()["getting-started.md"]
    assert [(b.kind, b.language) for b in blocks] == [
        ("run", "bash"),
        ("run", "python"),
        ("output", ""),
        ("run", "bash"),
    ]
    assert blocks[0].text.strip() == "globular start -s 3 iptest"


@pytest.mark.cluster
@pytest.mark.parametrize("page", sorted(marked_blocks()))
def test_the_docs_blocks_marked_to_run_run(page, cli, home, tmp_path):
    blocks = marked_blocks()[page]
    started: list[str] = []
    try:
        last = ""
        for block in blocks:
            if block.kind == "output":
                assert last.strip() == block.text.strip(), f"{page}: the output shown is not what the code prints"
                continue
            if block.language == "bash":
                for line in block.text.splitlines():
                    words = shlex.split(line, comments=True)
                    if not words:
                        continue
                    assert words[0] == "globular", f"{page}: {line!r} is not a globular command"
                    if words[1:2] == ["start"]:
                        started.append(words[-1])
                    result = cli(*words[1:])
                    assert result.returncode == 0, f"{page}: {line}\n{result.output}"
                    last = result.stdout
            elif block.language == "python":
                ran = subprocess.run(
                    [sys.executable, "-c", block.text], capture_output=True, text=True, timeout=120, cwd=tmp_path
                )
                assert ran.returncode == 0, f"{page}: a python block failed:\n{ran.stderr}"
                last = ran.stdout
            else:
                raise AssertionError(f"{page}: a block to run in {block.language!r}: only bash and python run")
    finally:
        for name in started:  # terminated by the page itself, or here
            cli("terminate", "-y", "--force", name)


PROVIDER_CONFIG = """
[global]
default_template = mine
[cluster mine]
provider = folders
root = {root}
cores = 2
cluster_size = 2
plugins = ipcluster
[plugin ipcluster]
setup_class = ipcluster
"""


def install(site: Path, module: Path, entry_points: str) -> dict[str, str]:
    """``module`` installed in ``site`` the way pip installs a package: a dist-info naming its
    entry points.  The environment that makes a Python see it."""
    name = module.stem
    info = site / f"{name}-0.1.dist-info"
    info.mkdir(parents=True)
    (site / module.name).write_text(module.read_text())
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(entry_points)
    return {"PYTHONPATH": str(site)}


@pytest.mark.cluster
def test_the_worked_provider_example_runs_a_cluster(cli, home, tmp_path, write_config):
    env = install(
        tmp_path / "site",
        DOCS / "examples" / "folders_provider.py",
        "[globular.providers]\nfolders = folders_provider:FoldersProvider\n",
    )
    root = tmp_path / "nodes"
    config = str(write_config(PROVIDER_CONFIG.format(root=root)))
    reference = cli("-c", config, "config", "reference", env=env)
    assert "root" in reference.stdout and "the folder that holds a folder per node" in reference.stdout
    started = cli("-c", config, "start", "mine", env=env)
    try:
        assert started.returncode == 0, started.output
        assert sorted(p.name for p in (root / "mine").iterdir()) == ["master", "node001"]
        mapped = cli("shell", "mine", "-c", "print(sorted(ipview.map_sync(lambda x: x * 2, range(6))))", env=env)
        assert mapped.returncode == 0, mapped.output
        assert mapped.stdout.strip().splitlines()[-1] == "[0, 2, 4, 6, 8, 10]"
        assert (home / "ipcluster" / "mine-folders.json").exists()  # the provider's region names the file
    finally:
        stopped = cli("terminate", "-y", "mine", env=env)
    assert stopped.returncode == 0, stopped.output
    assert not (root / "mine" / "master").exists() and not (root / "mine" / "node001").exists()


def test_the_readme_config_is_a_valid_config(tmp_path, monkeypatch):
    from globular.config import Config
    from globular.ipcluster.settings import IPClusterSettings

    readme = (DOCS.parent / "README.md").read_text()
    [ini] = re.findall(r"^```ini\n(.*?)^```", readme, re.S | re.M)
    monkeypatch.setenv("HOME", str(tmp_path))  # where the reader's ssh_key is
    make_stand_ins(read_ini(ini), tmp_path, tmp_path)
    spec = Config.from_text(ini, file="README.md").cluster_spec()
    assert spec.provider == "ssh" and len(spec.provider_settings["node_hosts"]) == 3
    settings = IPClusterSettings.model_validate(spec.plugins[0].settings)
    assert settings.enable_notebook and settings.gpu_engines == "auto"


def ini_blocks() -> list[tuple[str, str]]:
    pages = [DOCS.parent / "README.md", *(p for p in DOCS.rglob("*.md") if "_build" not in p.parts)]
    return [(p.name, b) for p in pages for b in re.findall(r"^```ini\n(.*?)^```", p.read_text(), re.S | re.M)]


def test_no_ini_block_in_the_docs_has_a_comment_inside_a_value():
    """INI (configparser, as StarCluster's) has no comments after a value: ``key = v  # note``
    makes ``v  # note`` the value.  A reader copies these blocks as they are."""
    import configparser

    assert len(ini_blocks()) > 10
    for page, block in ini_blocks():
        parser = configparser.ConfigParser(interpolation=None, strict=False, default_section="\x00none")
        parser.read_string(block if block.lstrip().startswith("[") else "[x]\n" + block)
        for section in parser.sections():
            for key, value in parser.items(section):
                assert not re.search(r"\s[#;]", value), f"{page}: [{section}] {key} = {value!r}"


def test_a_comment_after_a_value_is_named_in_the_error():
    from globular.config import Config
    from globular.errors import ConfigError

    text = "[cluster t]\nplugins = ipcluster\n[plugin ipcluster]\nsetup_class = ipcluster\npacker = pickle  # fast\n"
    with pytest.raises(ConfigError, match="a comment goes on a line of its own"):
        Config.from_text(text, file="cfg").cluster_spec("t")


# -- every config block is a config, every globular line parses ------------------------------

# ```ini blocks, with the MyST comment line above one when there is one (``% fragment``)
INI_BLOCK = re.compile(r"^(?:(%[^\n]*)\n)?```ini\n(.*?)^```", re.S | re.M)
# settings that name a reader's own file, folder or program: the test makes stand-ins for them
# in a home of its own (``~/...``) or beside the config file (a relative path)
STAND_INS = {
    "ssh_key": "file",
    "key_location": "file",
    "notebook_certfile": "file",
    "notebook_keyfile": "file",
    "engine_startup": "file",
    "requirements": "file",
    "wheelhouse": "folder",
    "python": "program",
}
EXAMPLES_ENTRY_POINTS = (
    "[globular.providers]\nfolders = folders_provider:FoldersProvider\nnetns = netns_provider:NetnsProvider\n"
    "[globular.plugins]\nhello = hello_plugin:Hello\n[globular.commands]\nhello = hello_plugin:hello\n"
)


@dataclass
class ConfigBlock:
    page: str
    line: int
    fragment: bool  # marked `% fragment`: a section for another config, checked merged onto the built-in one
    text: str


def config_blocks() -> list[ConfigBlock]:
    pages = [DOCS.parent / "README.md", *sorted(p for p in DOCS.rglob("*.md") if "_build" not in p.parts)]
    found = []
    for path in pages:
        text = path.read_text()
        for match in INI_BLOCK.finditer(text):
            marker = match.group(1) or ""
            line = text[: match.start(2)].count("\n") + 1
            page = str(path.relative_to(DOCS.parent))
            found.append(ConfigBlock(page, line, marker.startswith("% fragment"), match.group(2)))
    return found


def read_ini(text: str):
    import configparser

    parser = configparser.ConfigParser(interpolation=None, strict=False, default_section="\x00none")
    parser.read_string(text)
    return parser


def make_stand_ins(parser, home: Path, beside: Path) -> None:
    """The reader's own files that ``parser``'s config names: made, empty, where it says."""
    for section in parser.sections():
        for key, value in parser.items(section):
            if key == "profile" and "/" not in value:
                (home / ".ipython" / f"profile_{value}").mkdir(parents=True, exist_ok=True)
            kind = STAND_INS.get(key)
            local_python = key == "python" and parser.get(section, "provider", fallback="local") == "local"
            if kind is None or (key == "python" and not local_python) or value.startswith("/"):
                continue  # a program on the hosts, or a path of this machine's (it must exist here)
            path = home / value[2:] if value.startswith("~/") else beside / value
            if kind == "folder":
                path.mkdir(parents=True, exist_ok=True)
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("#!/bin/sh\n" if kind == "program" else "")
            path.chmod(0o755 if kind == "program" else 0o600)


def test_the_docs_have_config_blocks_of_both_kinds():
    blocks = config_blocks()
    assert len(blocks) >= 12
    assert {b.page for b in blocks if b.fragment} >= {"docs/notebook.md", "docs/gpus.md"}
    assert any(b.page == "README.md" and not b.fragment for b in blocks)


def test_every_config_block_of_the_docs_validates_as_written(cli, tmp_path):
    """A complete block is copied as it is into a config file and ``globular config show`` of each
    of its templates exits 0; a ``% fragment`` is merged onto the built-in config first.  The
    docs' worked provider and plugin are installed (the contributing pages' blocks use them),
    and the files the blocks name are made in a home of the test's own."""
    from globular.config import BUILTIN_CONFIG

    site = tmp_path / "site"
    env = install(site, DOCS / "examples" / "folders_provider.py", EXAMPLES_ENTRY_POINTS)
    for example in ("hello_plugin.py", "netns_provider.py"):
        (site / example).write_text((DOCS / "examples" / example).read_text())
    failures = []
    for number, block in enumerate(config_blocks()):
        folder = tmp_path / f"block{number}"
        home = folder / "home"
        home.mkdir(parents=True)
        text = block.text
        if block.fragment:
            merged = read_ini(BUILTIN_CONFIG)
            merged.read_string(block.text)
            text = "".join(
                f"[{s}]\n" + "".join(f"{k} = {v}\n" for k, v in merged.items(s)) + "\n" for s in merged.sections()
            )
        parser = read_ini(text)
        make_stand_ins(parser, home, folder)
        config = folder / "config"
        config.write_text(text)
        templates = [s.split(None, 1)[1] for s in parser.sections() if s.split(None, 1)[0] == "cluster"]
        if not templates:
            failures.append(f"{block.page}:{block.line}: no [cluster NAME]: mark it `% fragment` if it is one")
        for template in templates:
            shown = cli(
                "-c",
                str(config),
                "config",
                "show",
                template,
                env={**env, "HOME": str(home), "IPYTHONDIR": str(home / ".ipython")},
            )
            if shown.returncode != 0 or shown.stderr:
                failures.append(f"{block.page}:{block.line} [cluster {template}]: {shown.stderr.strip()}")
    assert not failures, "\n".join(failures)


def globular_lines() -> list[tuple[str, str]]:
    """Every ``globular ...`` line of the bash and console blocks of the README and the docs."""
    pages = [DOCS.parent / "README.md", *sorted(p for p in DOCS.rglob("*.md") if "_build" not in p.parts)]
    lines = []
    for path in pages:
        for block in re.findall(r"^```(?:bash|console|shell)\n(.*?)^```", path.read_text(), re.S | re.M):
            for line in block.splitlines():
                line = line.removeprefix("$ ").strip()
                if line.startswith("globular ") or line == "globular":
                    lines.append((str(path.relative_to(DOCS.parent)), line))
    return lines


def parse_command_line(words: list[str]) -> None:
    """``globular WORDS`` through click's parser, down to the command (what the shell would run,
    without running it): a usage error raises."""
    import click

    from globular.cli.main import cli as root

    ctx = root.make_context("globular", list(words))
    command: click.Command = root
    while isinstance(command, click.Group):
        rest = [*getattr(ctx, "_protected_args", []), *ctx.args]
        if not rest:
            return
        name, sub, rest = command.resolve_command(ctx, rest)
        assert sub is not None and name is not None
        ctx = sub.make_context(name, rest, parent=ctx)
        command = sub


def test_every_globular_line_of_the_docs_parses():
    import click

    lines = globular_lines()
    assert len(lines) >= 30 and any(line.startswith("globular sshnode") for _, line in lines)
    failures = []
    for page, line in lines:
        try:
            parse_command_line(shlex.split(line, comments=True)[1:])
        except click.ClickException as exc:
            failures.append(f"{page}: {line}\n    {exc.format_message()}")
    assert not failures, "\n".join(failures)


def test_the_line_parser_finds_what_the_cli_refuses():
    import click

    for bad in (["stop", "x"], ["env", "prune", "--wheel"], ["sshnode", "lab", "node002", "-u", "root"], ["start"]):
        with pytest.raises(click.ClickException):
            parse_command_line(bad)
    parse_command_line(["sshnode", "-u", "root", "lab", "node002", "ls", "-l"])


def test_what_the_docs_say_of_output_is_what_the_cli_takes():
    from globular.cli.render import OUTPUT_FORMS

    pages = [DOCS.parent / "README.md", *(p for p in DOCS.rglob("*.md") if "_build" not in p.parts)]
    said = {m for p in pages for m in re.findall(r"--output ([a-z]+(?:\|[a-z]+)+)", p.read_text())}
    assert said, "no page lists the --output forms"
    assert said == {"|".join(OUTPUT_FORMS)}, said
