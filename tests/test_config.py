"""The config loader: StarCluster's INI format, templates, extends, typed settings, errors."""

from __future__ import annotations

import json

import pytest

from globular.config import Config
from globular.errors import ConfigError

STARCLUSTER_DOCS = """\
[global]
DEFAULT_TEMPLATE = smallcluster

[cluster smallcluster]
CLUSTER_SIZE = 2
PLUGINS = ipcluster

[plugin ipcluster]
SETUP_CLASS = starcluster.plugins.ipcluster.IPCluster
ENABLE_NOTEBOOK = True
NOTEBOOK_PASSWD = a-secret-password
NOTEBOOK_DIRECTORY = notebooks
PACKER = pickle

[plugin ipclusterstop]
SETUP_CLASS = starcluster.plugins.ipcluster.IPClusterStop

[plugin ipclusterrestart]
SETUP_CLASS = starcluster.plugins.ipcluster.IPClusterRestartEngines
"""


def load(text: str, file: str = "/cfg/config") -> Config:
    return Config.from_text(text, file=file)


def error_of(text: str, template: str | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(text).cluster_spec(template)
    return info.value


def test_builtin_default_when_no_config_file(tmp_path, monkeypatch):
    monkeypatch.setenv("GLOBULAR_HOME", str(tmp_path))
    monkeypatch.delenv("GLOBULAR_CONFIG", raising=False)
    spec = Config.load().cluster_spec()
    assert spec.provider == "local"
    assert spec.template == "local"
    assert [p.name for p in spec.plugins] == ["ipcluster"]
    assert spec.plugins[0].setup_class == "globular.ipcluster.plugin:IPCluster"
    assert spec.config_file is None


def test_starcluster_docs_block_works_as_is():
    spec = load(STARCLUSTER_DOCS).cluster_spec()
    assert spec.template == "smallcluster"
    assert spec.cluster_size == 2
    plugin = spec.plugins[0]
    assert plugin.setup_class == "globular.ipcluster.plugin:IPCluster"
    assert plugin.settings["enable_notebook"] is True
    assert plugin.settings["packer"] == "pickle"
    assert plugin.settings["notebook_directory"] == "notebooks"
    config = load(STARCLUSTER_DOCS)
    assert config.plugin_spec("ipclusterrestart").setup_class.endswith(":IPClusterRestartEngines")
    assert config.plugin_spec("ipclusterstop").setup_class.endswith(":IPClusterStop")


def test_extends_chain_overrides_parent_values():
    text = """\
[global]
default_template = big
[cluster base]
cluster_size = 2
plugins = ipcluster
cores_per_node = 3
[cluster mid]
extends = base
cluster_size = 4
[cluster big]
extends = mid
cores_per_node = 1
[plugin ipcluster]
setup_class = ipcluster
master_engines = 0
"""
    spec = load(text).cluster_spec()
    assert spec.cluster_size == 4
    assert spec.provider_settings["cores_per_node"] == 1
    assert spec.plugins[0].settings["master_engines"] == 0
    assert load(text).cluster_spec("base").cluster_size == 2
    assert load(text).cluster_spec("big", cluster_size=7).cluster_size == 7


def test_extends_cycle_is_an_error_naming_the_chain():
    exc = error_of("[cluster a]\nextends = b\n[cluster b]\nextends = c\n[cluster c]\nextends = a\n", "a")
    assert "cycle: a -> b -> c -> a" in str(exc)
    assert exc.key == "extends" and exc.section == "cluster c"
    assert exc.file == "/cfg/config" and exc.line == 6


def test_extends_missing_parent():
    exc = error_of("[cluster a]\nextends = nothere\n", "a")
    assert exc.section == "cluster a" and exc.key == "extends"
    assert "'nothere'" in str(exc)
    assert str(exc).startswith("/cfg/config:2 [cluster a] extends:")


def test_unknown_key_names_section_and_key_where_written():
    text = "[cluster base]\nclustr_size = 3\n[cluster child]\nextends = base\n"
    exc = error_of(text, "child")
    assert (exc.section, exc.key, exc.line) == ("cluster base", "clustr_size", 2)
    assert "unknown setting for provider 'local'" in str(exc)


def test_bad_value_names_key_and_value():
    exc = error_of("[cluster a]\ncluster_size = three\n", "a")
    assert exc.key == "cluster_size" and "'three'" in str(exc)
    exc = error_of("[cluster a]\ncluster_size = 0\n", "a")
    assert "must be at least 1, got '0'" in str(exc)


def test_plugin_settings_are_typed():
    base = "[cluster a]\nplugins = ipcluster\n[plugin ipcluster]\nsetup_class = ipcluster\n"
    exc = error_of(base + "packer = yaml\n", "a")
    assert (exc.section, exc.key) == ("plugin ipcluster", "packer")
    assert "one of: json, pickle, msgpack" in str(exc)
    exc = error_of(base + "enable_notebook = perhaps\n", "a")
    assert exc.key == "enable_notebook"
    exc = error_of(base + "no_such_setting = 1\n", "a")
    assert exc.key == "no_such_setting" and "plugin class IPCluster" in str(exc)


def test_missing_plugin_section():
    exc = error_of("[cluster a]\nplugins = ipcluster, extra\n[plugin ipcluster]\nsetup_class = ipcluster\n", "a")
    assert (exc.section, exc.key) == ("cluster a", "plugins")
    assert "no [plugin extra] section" in str(exc)


def test_missing_or_bad_setup_class():
    exc = error_of("[cluster a]\nplugins = p\n[plugin p]\nfoo = 1\n", "a")
    assert (exc.section, exc.key) == ("plugin p", "setup_class")
    exc = error_of("[cluster a]\nplugins = p\n[plugin p]\nsetup_class = no.such.module.Class\n", "a")
    assert "cannot import module 'no.such.module'" in str(exc)
    exc = error_of("[cluster a]\nplugins = p\n[plugin p]\nsetup_class = json.dumps\n", "a")
    assert "not a globular plugin class" in str(exc)


def test_unknown_provider():
    exc = error_of("[cluster a]\nprovider = azure\n", "a")
    assert exc.key == "provider" and "unknown provider 'azure'" in str(exc)


def test_template_selection_errors():
    text = "[cluster a]\n[cluster b]\n"
    exc = error_of(text)
    assert exc.section == "global" and exc.key == "default_template"
    assert "templates: a, b" in str(exc)
    exc = error_of(text, "zzz")
    assert "no [cluster zzz] section" in str(exc)


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("", "empty"),
        ("   \n# only a comment\n", "empty"),
        ("cluster_size = 3\n", "before the first [section] header"),
        ("[cluster a]\n[cluster a]\n", "section appears twice"),
        ("[cluster a]\ncluster_size = 1\ncluster_size = 2\n", "key appears twice"),
        ("[cluster a]\nthis line has no equals\n", "cannot parse line"),
        ("[volume data]\nvolume_id = vol-1\n", "unknown section type 'volume'"),
        ("[plugin only]\nsetup_class = ipcluster\n", "defines no [cluster NAME] template"),
        ("[global]\ndefault_templat = a\n[cluster a]\n", "unknown setting"),
    ],
)
def test_syntax_errors_are_one_line_config_errors(text, fragment):
    with pytest.raises(ConfigError) as info:
        load(text).cluster_spec("a")
    message = str(info.value)
    assert fragment in message
    assert message.startswith("/cfg/config")
    assert "\n" not in message


def test_binary_garbage_and_bad_encoding(tmp_path):
    path = tmp_path / "config"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    with pytest.raises(ConfigError, match="not a text file"):
        Config.load(path)
    path.write_bytes(b"[cluster a]\x00\n")
    with pytest.raises(ConfigError, match="NUL byte"):
        Config.load(path)


def test_explicit_missing_file_is_an_error(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="config file not found"):
        Config.load(tmp_path / "nope")
    monkeypatch.setenv("GLOBULAR_CONFIG", str(tmp_path / "nope2"))
    with pytest.raises(ConfigError, match="nope2: config file not found"):
        Config.load()


def test_cli_reports_config_error_in_one_line_with_exit_code_2(cli, write_config):
    path = write_config("[global]\ndefault_template = a\n[cluster a]\ncluster_size = many\n")
    result = cli("-c", str(path), "start", "x")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"{path}:4 [cluster a] cluster_size:" in lines[0]
    assert "'many'" in lines[0]
    result = cli("start", "x", env={"GLOBULAR_CONFIG": str(path)})
    assert result.returncode == 2 and "[cluster a] cluster_size" in result.stderr


def test_cli_usage_errors(cli):
    result = cli("start")
    assert result.returncode == 2 and "Missing argument 'NAME'" in result.stderr
    result = cli("start", "-s", "0", "x")
    assert result.returncode == 2 and "-s" in result.stderr
    result = cli("start", "bad/name")
    assert result.returncode == 2 and "invalid cluster name" in result.stderr
    result = cli("nosuchcommand")
    assert result.returncode == 2


SSH = """\
[global]
default_template = lab
[cluster lab]
provider = ssh
node_hosts = {hosts}
plugins = ipcluster
{extra}
[plugin ipcluster]
setup_class = ipcluster
{plugin}
"""


def ssh_spec(hosts: str = "alice@a, b:2222, c", extra: str = "", plugin: str = "", size: int | None = None):
    return load(SSH.format(hosts=hosts, extra=extra, plugin=plugin)).cluster_spec(None, size)


def ssh_error(**kwargs) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        ssh_spec(**kwargs)
    return info.value


def test_ssh_hosts_parse_and_size_defaults_to_every_host():
    from globular.providers.ssh_settings import SSHHost, SSHSettings, hosts_in_order

    spec = ssh_spec(extra="master_host = c")
    assert spec.cluster_size == 3
    settings = SSHSettings.model_validate(spec.provider_settings)
    assert [str(h) for h in hosts_in_order(settings)] == ["c", "alice@a", "b:2222"]
    assert SSHHost.parse("u@[fe80::1]:2200") == SSHHost(host="fe80::1", port=2200, user="u")
    assert ssh_spec(size=2).cluster_size == 2


@pytest.mark.parametrize(
    ("kwargs", "key", "fragment"),
    [
        ({"hosts": "a, b c"}, "node_hosts", "'b c' is not a host"),
        ({"hosts": "a, a:22"}, "node_hosts", "listed twice"),
        ({"hosts": "a:99999"}, "node_hosts", "is not a host"),
        ({"hosts": ""}, "node_hosts", "lists no host"),
        ({"size": 4}, "node_hosts", "4 nodes asked for, but there are only 3 hosts"),
        ({"extra": "connect_timeout = 0"}, "connect_timeout", "must be more than 0, got '0'"),
        ({"extra": "cluster_size = 5"}, "node_hosts", "5 nodes asked for"),
        ({"plugin": "controller_ports = 10000-10005"}, "controller_ports", "at least 20 ports"),
        ({"plugin": "controller_ports = 80-200"}, "controller_ports", "1024-65535"),
        ({"plugin": "controller_ports = lots"}, "controller_ports", "FIRST-LAST"),
        ({"plugin": "controller_interface = 0.0.0.0"}, "controller_interface", "every interface"),
    ],
)
def test_ssh_and_controller_settings_errors_name_the_key(kwargs, key, fragment):
    err = ssh_error(**kwargs)
    assert err.key == key, str(err)
    assert fragment in str(err)
    assert "/cfg/config:" in str(err)


def test_encryption_is_curve_where_nodes_are_other_machines_unless_set():
    from globular.ipcluster.settings import IPClusterSettings, encryption_of

    assert encryption_of(IPClusterSettings(), remote_nodes=True) == "curve"
    assert encryption_of(IPClusterSettings(), remote_nodes=False) == "none"
    assert encryption_of(IPClusterSettings(encryption="none"), remote_nodes=True) == "none"
    assert encryption_of(IPClusterSettings(encryption="curve"), remote_nodes=False) == "curve"
    text = "[cluster a]\nplugins = ipcluster\n[plugin ipcluster]\nsetup_class = ipcluster\nencryption = tls\n"
    with pytest.raises(ConfigError) as bad:
        Config.from_text(text, file="c.ini").cluster_spec("a")
    assert str(bad.value) == "c.ini:5 [plugin ipcluster] encryption: expected curve or none, got 'tls'"


def test_config_show_resolves_a_template_with_defaults_and_masks_secrets(cli, write_config):
    config = write_config(
        "[global]\ndefault_template = child\n"
        "[cluster base]\nprovider = local\ncluster_size = 3\nplugins = ipcluster\n"
        "[cluster child]\nextends = base\ncores_per_node = 1\n"
        "[plugin ipcluster]\nsetup_class = ipcluster\nenable_notebook = true\nnotebook_passwd = hunter2\n"
    )
    shown = cli("-c", str(config), "config", "show")
    assert shown.returncode == 0, shown.output
    assert "hunter2" not in shown.output and "********" in shown.stdout
    assert "cluster_size" in shown.stdout and "heartbeat_period" in shown.stdout  # a default, filled in
    data = json.loads(cli("-c", str(config), "config", "show", "--output", "json").stdout)["result"]
    assert data["template"] == "child" and data["cluster_size"] == 3  # from base, through extends
    assert data["provider_settings"]["cores_per_node"] == 1
    assert data["plugins"][0]["settings"]["notebook_passwd"] == "********"
    effective = {(s["section"], s["key"]): (s["value"], s["source"]) for s in data["settings"]}
    assert effective[("cluster", "cluster_size")] == ("3", "[cluster base] (extends)")
    assert effective[("provider local", "cores_per_node")] == ("1", "set")
    assert effective[("environment", "environment")] == ("system", "default (the local provider's)")
    assert effective[("plugin ipcluster", "encryption")] == ("none", "default")  # what a local cluster uses
    assert effective[("plugin ipcluster", "notebook_save_limit")] == ("1 GB", "default")
    assert effective[("plugin ipcluster", "heartbeat_period")] == ("200 ms", "default")
    assert effective[("plugin ipcluster", "notebook_passwd")] == ("********", "set")
    assert {"packages", "requirements", "wheelhouse"} <= {key for section, key in effective if section == "environment"}
    assert not any("None" in v or "[" in v or "{" in v for v, _ in effective.values()), effective  # no reprs
    listed = cli("config", "reference")
    assert listed.returncode == 0 and "node_hosts" in listed.stdout and "idle_shutdown" in listed.stdout


def test_config_show_says_what_an_ssh_cluster_will_use(cli, write_config, tmp_path):
    key = tmp_path / "id_lab"
    key.write_text("")
    config = write_config(
        f"[cluster lab]\nprovider = ssh\nnode_hosts = h1, h2\nssh_key = {key}\nplugins = ipcluster\n"
        "[plugin ipcluster]\nsetup_class = ipcluster\nidle_shutdown = 90m\nengine_env = A=1, B=2\n"
    )
    shown = cli("-c", str(config), "config", "show", "lab", "--output", "json")
    assert shown.returncode == 0, shown.output
    effective = {(s["section"], s["key"]): s["value"] for s in json.loads(shown.stdout)["result"]["settings"]}
    assert effective[("plugin ipcluster", "encryption")] == "curve"  # nodes on other machines
    assert effective[("environment", "environment")] == "managed"
    assert effective[("provider ssh", "cores_per_node")] == "the host's cores"
    assert effective[("provider ssh", "connect_timeout")] == "10 s"
    assert effective[("plugin ipcluster", "idle_shutdown")] == "1h30m"
    assert effective[("plugin ipcluster", "engine_env")] == "A=1, B=2"
    assert effective[("plugin ipcluster", "setup_class")].endswith(":IPCluster")
    text = cli("-c", str(config), "config", "show", "lab").stdout
    assert "curve" in text and "None" not in text


def test_a_builtin_plugin_named_without_a_section_runs_with_its_defaults():
    spec = Config.from_text("[cluster a]\nplugins = ipcluster, ipclusterrestart\n", file="c.ini").cluster_spec("a")
    assert [p.name for p in spec.plugins] == ["ipcluster", "ipclusterrestart"]
    assert spec.plugins[0].setup_class.endswith(":IPCluster") and spec.plugins[0].settings["packer"] == "json"
    exc = error_of("[cluster a]\nplugins = nosuchplugin\n", "a")
    assert (exc.section, exc.key) == ("cluster a", "plugins")
    assert "no [plugin nosuchplugin] section and no installed plugin of that name" in str(exc)


@pytest.mark.parametrize(
    ("body", "key", "said"),
    [
        ("provider = ssh\nnode_hosts = h\nssh_key = {tmp}/nope", "ssh_key", "{tmp}/nope is not a file here"),
        ("provider = local\npython = {tmp}/nope/python", "python", "{tmp}/nope/python is not a program here"),
        ("plugins = ipcluster\n[plugin ipcluster]\nsetup_class = ipcluster\nnotebook_certfile = {tmp}/c.pem",
         "notebook_certfile", "{tmp}/c.pem is not a file here"),
        ("plugins = ipcluster\n[plugin ipcluster]\nsetup_class = ipcluster\nprofile = {tmp}/noprofile",
         "profile", "no such folder"),
        ("provider = ec2\nkeyname = k\nnode_image_id = ami-1\n[key k]\nkey_location = {tmp}/k.pem",
         "key_location", "{tmp}/k.pem is not a file here"),
    ],
)  # fmt: skip
def test_every_setting_that_names_a_file_is_checked_when_the_config_is_read(tmp_path, body, key, said):
    text = "[cluster a]\n" + body.format(tmp=tmp_path) + "\n"
    with pytest.raises(ConfigError) as bad:
        Config.from_text(text, file="c.ini").cluster_spec("a")
    assert bad.value.key == key and bad.value.line is not None, str(bad.value)
    assert said.format(tmp=tmp_path) in str(bad.value)


def test_a_running_clusters_settings_are_not_checked_again_for_files(tmp_path):
    """A record read again (terminate, addnode) never fails because a file the config named is gone."""
    from globular.ipcluster.settings import IPClusterSettings

    startup = tmp_path / "startup.py"
    startup.write_text("")
    text = (
        f"[cluster a]\nplugins = ipcluster\n[plugin ipcluster]\nsetup_class = ipcluster\nengine_startup = {startup}\n"
    )
    spec = Config.from_text(text, file="c.ini").cluster_spec("a")
    startup.unlink()
    assert IPClusterSettings.model_validate(spec.plugins[0].settings).engine_startup == str(startup)


def test_an_unknown_key_gets_the_nearest_known_one_of_any_section_of_its_kind():
    exc = error_of("[cluster a]\nprovider = ssh\nnode_hosts = h\nssh_kye = x\n", "a")
    assert "did you mean ssh_key?" in str(exc)
    exc = error_of("[cluster a]\nprovider = ssh\nnode_hosts = h\nkeyname = k\n", "a")
    assert "it is a setting of provider ec2" in str(exc)
    exc = error_of("[cluster a]\nenable_notebok = true\n", "a")
    assert "did you mean enable_notebook (a setting of [plugin ipcluster])?" in str(exc)
    exc = error_of("[cluster a]\nplugins = ipcluster\n[plugin ipcluster]\nsetup_class = ipcluster\npaker = json\n", "a")
    assert "did you mean packer?" in str(exc)
    exc = error_of("[cluster a]\nzzzzzz = 1\n", "a")
    assert "did you mean" not in str(exc) and "unknown setting" in str(exc)


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("[cluster a]\ncluster_size = three\n", "expected a whole number, got 'three'"),
        ("[cluster a]\nenvironment = maybe\n", "expected managed or system, got 'maybe'"),
        ("[cluster a]\nplugins = ipcluster\n[plugin ipcluster]\nsetup_class = ipcluster\nenable_notebook = perhaps\n",
         "expected true or false (also: yes/no, on/off, 1/0), got 'perhaps'"),
        ("[cluster a]\nplugins = ipcluster\n[plugin ipcluster]\nsetup_class = ipcluster\nnotebook_save_limit = lots\n",
         "expected a size such as 500 MB, 1 GB or 2 GiB, got 'lots'"),
        ("[cluster a]\nplugins = ipcluster\n[plugin ipcluster]\nsetup_class = ipcluster\nheartbeat_period = 10\n",
         "must be at least 50, got '10'"),
        ("[cluster a]\nprovider = ssh\nnode_hosts = h\nconnect_timeout = soon\n", "expected a number, got 'soon'"),
    ],
)  # fmt: skip
def test_errors_are_in_globulars_words_not_pydantics(text, said):
    exc = error_of(text, "a")
    assert said in str(exc)
    assert not any(w in str(exc) for w in ("Input should", "Value error", "validation error", "pydantic"))
