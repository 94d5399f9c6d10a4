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


def test_the_readme_config_is_a_valid_config():
    from globular.config import Config
    from globular.plugins.ipcluster.settings import IPClusterSettings

    readme = (DOCS.parent / "README.md").read_text()
    [ini] = re.findall(r"^```ini\n(.*?)^```", readme, re.S | re.M)
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
