"""Bad input: a corpus of broken config files through the real CLI, and property-based
tests that the config loader answers anything with a ConfigError, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from globular.config import Config
from globular.errors import ConfigError

CORPUS = Path(__file__).parent / "corpus"

# file -> what the one error line must say: (section or None, key or None, a fragment of the message)
EXPECTED = {
    "syntax-unclosed-header.ini": (None, None, "cannot parse line"),
    "unknown-key.ini": ("[cluster a]", "colour", "unknown setting"),
    "wrong-type-size.ini": ("[cluster a]", "cluster_size", "'three'"),
    "wrong-type-bool.ini": ("[plugin ipcluster]", "enable_notebook", "'perhaps'"),
    "extends-cycle.ini": ("[cluster", "extends", "cycle"),
    "missing-plugin-class.ini": ("[plugin mine]", "setup_class", "nosuch.module"),
    "plugin-without-setup-class.ini": ("[plugin mine]", "setup_class", "missing setup_class"),
    "empty.ini": (None, None, "empty"),
    "comments-only.ini": (None, None, "empty"),
    "binary-garbage.ini": (None, None, "not a text file"),
    "unknown-provider.ini": ("[cluster a]", "provider", "unknown provider 'cloud9'"),
    "ec2-missing-key-section.ini": ("[cluster a]", "keyname", "no [key k] section"),
    "unknown-packer.ini": ("[plugin ipcluster]", "packer", "'yaml'"),
    "duplicate-key.ini": ("[cluster a]", "cluster_size", "twice"),
    "duplicate-plugin.ini": ("[cluster a]", "plugins", "lists ipcluster twice"),
    "size-with-underscore.ini": ("[cluster a]", "cluster_size", "expected a whole number, got '1_0'"),
    "size-with-fraction.ini": ("[cluster a]", "cluster_size", "expected a whole number, got '1.0'"),
    "default-template-missing.ini": ("[global]", "default_template", "names no [cluster nowhere] section"),
    "size-beyond-the-machine.ini": ("[cluster a]", "cluster_size", "the local provider runs at most"),
    "cores-beyond-the-machine.ini": ("[cluster a]", "cores_per_node", "engines per node; at most"),
}


PYDANTIC_WORDING = ("Input should", "Value error", "validation error", "Assertion failed")


def test_the_corpus_is_all_checked():
    assert sorted(p.name for p in CORPUS.iterdir()) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_broken_file_is_one_clear_line_and_exit_code_2(cli, name):
    path = CORPUS / name
    result = cli("-c", str(path), "start", "x")
    assert result.returncode == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # one line, no traceback
    line = lines[0]
    section, key, fragment = EXPECTED[name]
    assert line.startswith("error: ") and str(path) in line, line
    if section:
        assert section in line, line
    if key:
        assert f"] {key}:" in line, line
    assert fragment in line, line
    assert "Traceback" not in result.output and "Warning" not in result.stderr


def _load_every_template(text: str) -> None:
    try:
        config = Config.from_text(text, file="fuzz.ini")
        for template in config.templates:
            spec = config.cluster_spec(template)
            assert spec.cluster_size >= 1 and spec.provider in ("local", "ssh", "ec2"), spec
    except ConfigError as exc:
        message = str(exc)
        assert message.startswith("fuzz.ini") and "\n" not in message, message  # one line, naming the file
        assert not any(w in message for w in PYDANTIC_WORDING), message  # in globular's words
        if exc.key:
            assert f"{exc.key}:" in message or f"{exc.key} " in message, message  # ... and the key


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
def test_any_bytes_give_a_config_or_a_config_error(data):
    try:
        config = Config.from_bytes(data, file="fuzz.ini")
        for template in config.templates:
            config.cluster_spec(template)
    except ConfigError as exc:
        assert str(exc).startswith("fuzz.ini")


SECTIONS = st.sampled_from(
    [
        "global",
        "cluster a",
        "cluster b",
        "plugin ipcluster",
        "plugin p",
        "aws info",
        "key k",
        "permission ssh",
        "cluster",
        "volume v",
        "plugin",
        "cluster a b",
    ]
)
KEYS = st.sampled_from(
    [
        "default_template",
        "extends",
        "cluster_size",
        "provider",
        "plugins",
        "setup_class",
        "packer",
        "node_hosts",
        "cores_per_node",
        "python",
        "keyname",
        "key_location",
        "node_image_id",
        "permission",
        "enable_notebook",
        "master_engines",
        "heartbeat_period",
        "controller_ports",
        "aws_region_name",
        "cidr_ip",
        "nonsense",
    ]
)
VALUES = st.one_of(
    st.sampled_from(
        [
            "a",
            "b",
            "ipcluster",
            "local",
            "ssh",
            "ec2",
            "0",
            "1",
            "-3",
            "true",
            "maybe",
            "json",
            "yaml",
            "a, b",
            "p",
            "host1, host1",
            "root@[::1]:22",
            "20000-20100",
            "1-2",
            "ami-1",
            "k",
            "1.5",
            "",
        ]
    ),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"), max_size=20),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(SECTIONS, st.lists(st.tuples(KEYS, VALUES), max_size=6)), max_size=6))
def test_config_shaped_text_gives_a_spec_or_a_config_error(sections):
    text = "".join(f"[{name}]\n" + "".join(f"{key} = {value}\n" for key, value in items) for name, items in sections)
    _load_every_template(text)
