"""`seg-fast policy load | dump | import-csv` on a real SQLite store, and the example files."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from seg_fast.cli import main
from seg_fast.policy.model import decode_policy_file

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "policies"


@pytest.fixture
def cfg(tmp_path):
    path = tmp_path / "gw.toml"
    path.write_text(f'[policy]\nsqlite_path = "{tmp_path / "p.db"}"\n')
    return str(path)


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.json")))
def test_examples_are_valid(name):
    decode_policy_file((EXAMPLES / name).read_bytes())


def test_load_dump_round_trip(cfg, capsys):
    assert main(["policy", "--config", cfg, "load", str(EXAMPLES / "baseline.json")]) == 0
    assert "1 device record" in capsys.readouterr().out
    assert main(["policy", "dump", "--config", cfg]) == 0
    dumped = json.loads(capsys.readouterr().out)
    original = json.loads((EXAMPLES / "baseline.json").read_text())
    assert dumped["devices"][0]["device_id"] == original["devices"][0]["device_id"]
    assert dumped["policies"]["managed"]["os"] == original["policies"]["managed"]["os"]
    # dump output loads back to the same snapshot
    assert decode_policy_file(json.dumps(dumped).encode()) == decode_policy_file(json.dumps(original).encode())


def test_bad_file_rejected_and_previous_kept(cfg, tmp_path, capsys):
    main(["policy", "--config", cfg, "load", str(EXAMPLES / "baseline.json")])
    bad = tmp_path / "bad.json"
    bad.write_text('{"policies": {"managed": {"inactivity": {"enabled": true, "days": 99999}}}}')
    assert main(["policy", "--config", cfg, "load", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "bad.json" in err and "days" in err
    main(["policy", "--config", cfg, "dump"])
    assert json.loads(capsys.readouterr().out)["policies"]["managed"]["inactivity"]["days"] == 30
    assert main(["policy", "--config", cfg, "load", str(tmp_path / "missing.json")]) == 1


def test_import_csv(cfg, capsys):
    assert main(["policy", "--config", cfg, "import-csv", "users", str(EXAMPLES / "users-blocklist.csv"),
                 "--mode", "block"]) == 0
    assert main(["policy", "--config", cfg, "import-csv", "devices", str(EXAMPLES / "devices.csv")]) == 0
    capsys.readouterr()
    main(["policy", "--config", cfg, "dump"])
    snap = json.loads(capsys.readouterr().out)
    assert snap["policies"]["general"]["user"] == {"enabled": True, "mode": "block",
                                                   "values": ["contractor1", "CORP\\contractor2", "temp@corp.example"]}
    devs = {d["device_id"]: d for d in snap["devices"]}
    assert devs["DEV-0002"]["compromised"] is True and devs["DEV-0003"]["override"] == "blacklist"
    assert devs["DEV-0003"]["compromised"] is None        # empty cell: not reported


def test_import_csv_errors(cfg, tmp_path, capsys):
    bad = tmp_path / "d.csv"
    bad.write_text("device_id,managed\nA,perhaps\n")
    assert main(["policy", "--config", cfg, "import-csv", "devices", str(bad)]) == 1
    assert "line 2" in capsys.readouterr().err
    bad.write_text("id,managed\nA,true\n")
    assert main(["policy", "--config", cfg, "import-csv", "devices", str(bad)]) == 1
    assert "device_id" in capsys.readouterr().err
    empty = tmp_path / "e.csv"
    empty.write_text("user\n\n")
    assert main(["policy", "--config", cfg, "import-csv", "users", str(empty)]) == 1


def test_openapi_command(capsys):
    assert main(["policy", "openapi"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["openapi"] == "3.1.0" and "/seg/policy/device/{id}" in doc["paths"]


def test_published_openapi_document_is_current(capsys):
    """docs/admin-openapi.json is what `seg-fast policy openapi` prints (regenerate it with
    `python -m seg_fast policy openapi > docs/admin-openapi.json`)."""
    main(["policy", "openapi"])
    published = json.loads((EXAMPLES.parent.parent / "docs" / "admin-openapi.json").read_text())
    current = json.loads(capsys.readouterr().out)

    def operations(doc):
        return {(path, method) for path, ops in doc["paths"].items() for method in ops}
    # The operations must match; schemas of other packages' documents may evolve on their own.
    assert operations(current) == operations(published)


def test_import_domains_and_clients(cfg, tmp_path, capsys):
    domains = tmp_path / "d.csv"
    domains.write_text("domain\ncorp.example\nintra.example\n")
    clients = tmp_path / "c.csv"
    clients.write_text("Apple-iPhone*\nOutlook-iOS/2.0\n")
    assert main(["policy", "--config", cfg, "import-csv", "domains", str(domains)]) == 0
    assert main(["policy", "--config", cfg, "import-csv", "mail-clients", str(clients)]) == 0
    capsys.readouterr()
    main(["policy", "--config", cfg, "dump"])
    snap = json.loads(capsys.readouterr().out)
    assert snap["policies"]["security"]["hyperlinks"]["domains"] == ["corp.example", "intra.example"]
    assert snap["policies"]["general"]["mail_client"]["values"] == ["Apple-iPhone*", "Outlook-iOS/2.0"]
    bad = tmp_path / "bad.csv"
    bad.write_text("not a domain/x\n")
    assert main(["policy", "--config", cfg, "import-csv", "domains", str(bad)]) == 1
    assert "domain" in capsys.readouterr().err


@pytest.mark.parametrize("body,word", [
    ('api_url = "ftp://x"', "api_url"),
    ('store = "memcached"', "store"),
    ('store = "redis"\nredis_url = "http://x"', "redis_url"),
    ("push_port = 70000", "push_port"),
    ("delta_interval = 0", "delta_interval"),
])
def test_bad_policy_settings_name_the_key(tmp_path, body, word):
    from seg_fast.config import load_config
    from seg_fast.errors import ConfigError
    path = tmp_path / "gw.toml"
    path.write_text(f"[policy]\n{body}\n")
    with pytest.raises(ConfigError) as ei:
        load_config(path)
    assert word in str(ei.value) and "gw.toml" in str(ei.value)


def test_import_csv_refuses_the_wrong_file_and_names_the_row(cfg, tmp_path, capsys):
    # The devices CSV given as a domains list: its header and device IDs are not domains.
    assert main(["policy", "--config", cfg, "import-csv", "domains", str(EXAMPLES / "devices.csv")]) == 1
    err = capsys.readouterr().err
    assert "devices.csv line 1" in err and "import-csv devices" in err
    # A users file given as domains: the header says what it is.
    assert main(["policy", "--config", cfg, "import-csv", "domains", str(EXAMPLES / "users-blocklist.csv")]) == 1
    assert "line 1: header 'user' is not a domains list" in capsys.readouterr().err
    bad = tmp_path / "u.csv"
    bad.write_text("user\nalice\nbob smith\ncarol\n")
    assert main(["policy", "--config", cfg, "import-csv", "users", str(bad)]) == 1
    assert "u.csv line 3: 'bob smith' contains white space" in capsys.readouterr().err
    bad.write_text("domain\ncontoso.com\nhttps://fabrikam.com/x\n")
    assert main(["policy", "--config", cfg, "import-csv", "domains", str(bad)]) == 1
    assert "line 3" in capsys.readouterr().err
    # Nothing was written by the refused imports.
    capsys.readouterr()
    main(["policy", "--config", cfg, "dump"])
    assert json.loads(capsys.readouterr().out)["policies"]["security"] is None


def test_policy_commands_say_which_store_they_wrote(cfg, tmp_path, capsys):
    assert main(["policy", "--config", cfg, "load", str(EXAMPLES / "baseline.json")]) == 0
    assert f"(SQLite {tmp_path / 'p.db'})" in capsys.readouterr().out
