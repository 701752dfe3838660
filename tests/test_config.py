"""Gateway config: TOML + SEG_FAST_* overrides, errors that name the file and the key."""
from __future__ import annotations

from pathlib import Path

import pytest

from seg_fast.config import Config, load_config
from seg_fast.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def test_defaults_suit_the_demo():
    cfg = load_config(None, env={})
    assert cfg.listener.port == 8443 and cfg.admin.host == "127.0.0.1" and cfg.admin.port == 44444
    assert cfg.eas.paths == ["/Microsoft-Server-ActiveSync"] and cfg.workers == 0


def _example_keys(text: str) -> dict[str, set[str]]:
    """{section: keys} written in the example, set or commented out ("# key = ...")."""
    import re

    keys: dict[str, set[str]] = {"": set()}
    section = ""
    for line in text.splitlines():
        m = re.match(r"\s*#?\s*\[([a-z_]+)\]\s*$", line)
        if m:
            section = m.group(1)
            keys.setdefault(section, set())
            continue
        m = re.match(r"\s*#?\s*([a-z0-9_]+)\s*=", line)
        if m:
            keys[section].add(m.group(1))
    return keys


def test_example_file_loads_and_holds_every_setting():
    """examples/gateway.toml shows every field of every config struct, in its own section."""
    import msgspec

    example = REPO / "examples" / "gateway.toml"
    cfg = load_config(example, env={})
    assert isinstance(cfg, Config)
    written = _example_keys(example.read_text())
    missing = []
    for field in msgspec.inspect.type_info(Config).fields:
        if isinstance(field.type, msgspec.inspect.StructType):
            for sub in field.type.fields:
                if sub.name not in written.get(field.name, set()):
                    missing.append(f"{field.name}.{sub.name}")
        elif field.name not in written[""]:
            missing.append(field.name)
    assert not missing, f"settings missing from examples/gateway.toml: {missing}"


def test_file_values(tmp_path):
    f = tmp_path / "g.toml"
    f.write_text('workers = 3\n[upstream]\nurl = "https://mail.example.com"\nverify_tls = false\n'
                 '[eas]\npaths = ["/Microsoft-Server-ActiveSync", "/servlet/traveler"]\n')
    cfg = load_config(f, env={})
    assert cfg.workers == 3 and cfg.upstream.url == "https://mail.example.com" and not cfg.upstream.verify_tls
    assert cfg.eas.paths[1] == "/servlet/traveler"


def test_env_overrides_file(tmp_path):
    f = tmp_path / "g.toml"
    f.write_text('[listener]\nport = 9000\n')
    cfg = load_config(f, env={"SEG_FAST_LISTENER_PORT": "9443", "SEG_FAST_WORKERS": "2",
                              "SEG_FAST_UPSTREAM_VERIFY_TLS": "false", "SEG_FAST_LISTENER_TLS_CERT": "c.pem",
                              "SEG_FAST_LISTENER_TLS_KEY": "k.pem",
                              "SEG_FAST_EAS_PATHS": '["/EAS"]', "SEG_FAST_UNRELATED": "x"})
    assert cfg.listener.port == 9443 and cfg.workers == 2 and cfg.upstream.verify_tls is False
    assert cfg.listener.tls_cert == "c.pem" and cfg.eas.paths == ["/EAS"]


@pytest.mark.parametrize("text,key", [
    ("[listener]\nport = \"x\"\n", "listener.port"),
    ("[listener]\nprot = 1\n", "listener.prot"),
    ("[upstream]\nurl = \"ftp://x\"\n", "upstream.url"),
    ("[upstream]\nproxy_url = \"socks5://p\"\n", "upstream.proxy_url"),
    ("[listener]\ntls_cert = \"a.pem\"\n", "listener.tls_key"),
    ("[timeouts]\nidle_keepalive = 0\n", "timeouts.idle_keepalive"),
    ("[eas]\npaths = [\"nope\"]\n", "eas.paths"),
    ("workers = -1\n", "workers"),
    ("[admin]\nhost = \"0.0.0.0\"\n", "admin.host"),
    ("[limits]\nmax_descriptors = 100\n", "limits.max_descriptors"),
    ("[limits]\nrealtime_priority = 100\n", "limits.realtime_priority"),
    ("[limits]\nrealtime_priority = -1\n", "limits.realtime_priority"),
    ("[upstream]\nsource_addresses = [\"mail.example\"]\n", "upstream.source_addresses"),
])
def test_errors_name_file_and_key(tmp_path, text, key):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(f, env={})
    assert str(f) in str(err.value) and f"key {key}" in str(err.value)


def test_env_errors_name_the_variable():
    with pytest.raises(ConfigError, match="SEG_FAST_LISTENER_PORT.*listener.port"):
        load_config(None, env={"SEG_FAST_LISTENER_PORT": "eighty"})


def test_unreadable_and_invalid_toml(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml", env={})
    f = tmp_path / "x.toml"
    f.write_text("[listener\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(f, env={})


def test_misspelt_environment_variables_are_found():
    from seg_fast.config import unknown_env_vars

    env = {"SEG_FAST_LISTENER_PORT": "1", "SEG_FAST_LISTNER_PORT": "2", "SEG_FAST_HYPOTHESIS": "long",
           "SEG_FAST_WORKERS": "2", "SEG_FAST_POLICY_STOER": "redis", "OTHER": "x"}
    assert unknown_env_vars(env) == ["SEG_FAST_LISTNER_PORT", "SEG_FAST_POLICY_STOER"]
