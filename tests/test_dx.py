"""Targeted (Dx) logging: the `seg-fast dx` command on a real config, what a line may
show of headers and WBXML (never a password, a token or mail content)."""
from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys

from processes import REPO
from seg_fast import dx
from seg_fast.eas.wbxml import decode, from_xml
from seg_fast.sim.tree import E, encode


def run_dx(tmp_path, *args):
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), SEG_FAST_STATE_DIR=str(tmp_path / "state"))
    return subprocess.run([sys.executable, "-m", "seg_fast", "dx", "--config", str(tmp_path / "gw.toml"), *args],
                          capture_output=True, text=True, env=env, timeout=60)


def test_cli_start_list_log_stop(tmp_path):
    (tmp_path / "gw.toml").write_text(f'state_dir = "{tmp_path / "state"}"\n')
    r = run_dx(tmp_path, "start", "--user", "CORP\\Carol", "--minutes", "5")
    assert r.returncode == 0, r.stderr
    targets = dx.read_targets(tmp_path / "state" / "dx")
    assert [(t.kind, t.target) for t in targets] == [("user", "CORP\\Carol")]
    assert stat.S_IMODE(os.stat(tmp_path / "state" / "dx" / dx.TARGETS).st_mode) == 0o600
    assert "CORP\\Carol" in run_dx(tmp_path, "list").stdout
    # A worker's view writes the user's transactions, whatever form of the name they carry.
    w = dx.Dx(tmp_path / "state" / "dx")
    w.refresh()
    from seg_fast.observe import Transaction
    w.capture(Transaction(ts=0, method="POST", command="Sync", user="carol@corp.example", device_id="D1", status=200))
    out = run_dx(tmp_path, "log", "--user", "carol").stdout
    assert [json.loads(x)["device_id"] for x in out.splitlines()] == ["D1"]
    assert run_dx(tmp_path, "start", "--device", "X", "--minutes", "0").returncode == 1
    assert run_dx(tmp_path, "stop", "--user", "carol").returncode == 0
    assert dx.read_targets(tmp_path / "state" / "dx") == []
    audit = [json.loads(x) for x in (tmp_path / "state" / "seg-fast-audit.jsonl").read_text().splitlines()]
    assert [a["action"] for a in audit] == ["dx_start", "dx_stop"] and audit[0]["who"].startswith("cli:")


def test_headers_keep_scheme_and_user_only():
    secret = "hunter2-Zx"
    hdrs = [(b"Authorization", b"Basic " + base64.b64encode(f"CORP\\jdoe:{secret}".encode())),
            (b"Cookie", b"session=abcdef"), (b"User-Agent", b"Apple-iPhone/1"),
            (b"Proxy-Authorization", b"Bearer eyJhbGciOi.secret.part")]
    out = dx.safe_headers(hdrs)
    text = json.dumps(out)
    assert secret not in text and "abcdef" not in text and "eyJhbGciOi" not in text
    assert out[0] == ["Authorization", f"Basic user=CORP\\jdoe ({len(hdrs[0][1]) - 6} chars)"]
    assert out[2] == ["User-Agent", "Apple-iPhone/1"] and out[3][1].startswith("Bearer (")


def test_wbxml_outline_cuts_contents_to_sizes():
    body_text = "Quarterly numbers attached, do not forward"
    doc = E("AirSync:Sync", E("AirSync:Collections", E("AirSync:Collection",
            E("AirSync:SyncKey", "7"), E("AirSync:CollectionId", "5"), E("AirSync:Commands", E("AirSync:Add",
                E("AirSync:ServerId", "5:1"), E("AirSync:ApplicationData",
                    E("Email:Subject", "Secret merger"), E("Email:From", "ceo@corp.example"),
                    E("AirSyncBase:Body", E("AirSyncBase:Type", "1"), E("AirSyncBase:Data", body_text)),
                    E("AirSyncBase:Attachments", E("AirSyncBase:Attachment",
                        E("AirSyncBase:DisplayName", "plan.xlsx"), E("AirSyncBase:EstimatedDataSize", "123")))))))))
    xml = dx.wbxml_outline(encode(doc))
    for content in (body_text, "Secret merger", "ceo@corp.example", "plan.xlsx"):
        assert content not in xml
    assert f"({len(body_text)} bytes)" in xml and "<SyncKey>7</SyncKey>" in xml and "123" in xml
    # Still a WBXML document's XML: our own codec reads it back with the structure intact.
    back = from_xml(xml)
    assert back.tag == "AirSync:Sync" and back.find("AirSync:Collections") is not None
    opaque = E("ItemOperations:ItemOperations", E("ItemOperations:Response", E("ItemOperations:Fetch",
               E("ItemOperations:Properties", E("AirSyncBase:Data", b"%PDF-1.7 secret bytes")))))
    out = dx.wbxml_outline(encode(opaque))
    assert "secret bytes" not in out and "(21 bytes)" in out
    assert dx.wbxml_outline(b"not wbxml").startswith("(9 bytes, not WBXML")
    assert decode(encode(doc)) == doc
