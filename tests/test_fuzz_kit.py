"""The fuzzing kit's strategies, mutators and classifier (seg_fast.testing), without a server.

- every generated request and answer, per command and protocol version, encodes,
  decodes back to the same tree, has the command's root, and holds no element
  the version lacks (spec.SINCE: the checklist the version gates are held to);
- answers only carry Status values the spec defines (and the classifier agrees);
- generated MIME parses with Python's email package without defects, S/MIME
  signatures verify with openssl;
- generated HTTP requests are read back by the gateway's request parser in both
  query forms;
- mutators keep the document decodable, and each really does what it says;
- the classifier's verdicts; the package's and the CLI's message without hypothesis;
  the CLI refuses a target off this machine.
"""
from __future__ import annotations

import email
import email.policy
import shutil
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from seg_fast.eas import codepages
from seg_fast.eas.request import parse_request
from seg_fast.eas.wbxml import Element, decode, encode, token_of
from seg_fast.testing import (
    SINCE, Answer, Device, answer, build, classify, commands_for, first_version, http_requests,
    mime_messages, mutated, request, status_ok,
)
from seg_fast.testing.mutators import TREE_OPS, tree_mutation
from seg_fast.testing.spec import COMMANDS, ROOTS, STATUS, UNTIL, VERSIONS, vnum

FEW = settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
PAIRS = [(c, v) for v in VERSIONS for c in commands_for(v)]


def check_version(root: Element, version: str) -> None:
    for el in root.iter():
        assert first_version(el.tag) <= vnum(version), f"{el.tag} is not in {version}"
        assert UNTIL.get(el.tag, 999) >= vnum(version), f"{el.tag} is gone in {version}"


def test_every_command_has_strategies_for_every_version_it_exists_in():
    assert set(commands_for("16.1")) == set(COMMANDS)
    assert "Find" not in commands_for("16.0") and "Find" in commands_for("16.1")
    with pytest.raises(ValueError, match="does not exist"):
        request("Find", "14.1")
    # the table only names real tags
    assert all(t in codepages.TOKENS for t in SINCE)


@pytest.mark.parametrize("command,version", PAIRS, ids=[f"{c}-{v}" for c, v in PAIRS])
@FEW
@given(data=st.data())
def test_requests_and_answers_are_wellformed_for_their_version(command, version, data):
    body = data.draw(request(command, version))
    if isinstance(body, bytes):             # 12.1 SendMail & co.: the raw message
        assert version == "12.1" and command in ("SendMail", "SmartReply", "SmartForward")
        assert not email.message_from_bytes(body, policy=email.policy.default).defects
    else:
        assert body.tag == ROOTS[command]
        assert decode(encode(body)) == body
        check_version(body, version)
    ans = data.draw(answer(command, version))
    if ans is None:                         # SendMail & co. succeed with an empty 200
        assert command in ("SendMail", "SmartReply", "SmartForward")
        return
    assert ans.tag == ROOTS[command] and decode(encode(ans)) == ans
    check_version(ans, version)
    for el in ans.iter():
        if el.tag in STATUS:
            assert status_ok(el.tag, el.text, vnum(version)), (el.tag, el.text)
    verdict = classify(command, version, Answer(status=200, headers=[("content-type", "application/vnd.ms-sync.wbxml")],
                                                body=encode(ans)))
    assert verdict.kind == "ok", verdict


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(mime_messages())
def test_mime_messages_parse_without_defects(raw):
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg["From"] and msg["Subject"] is not None and msg["Message-ID"]
    for part in msg.walk():
        assert not part.defects, (part.get_content_type(), part.defects)
        if part.get_content_maintype() != "multipart":
            part.get_payload(decode=True)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
@settings(max_examples=4, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(mime_messages(shapes=("signed", "p7m")))
def test_smime_messages_verify_with_openssl(tmp_path_factory, raw):
    path = tmp_path_factory.mktemp("smime") / "m.eml"
    path.write_bytes(raw)
    run = subprocess.run(["openssl", "smime", "-verify", "-noverify", "-in", str(path), "-out", "/dev/null"],
                         capture_output=True, text=True, timeout=30)
    assert run.returncode == 0 and "Verification successful" in run.stderr, run.stderr


@pytest.mark.parametrize("version", VERSIONS)
@FEW
@given(data=st.data())
def test_http_requests_parse_in_both_query_forms(version, data):
    dev = Device(user="jdoe", device_id="ABC123", policy_key="1234567")
    req = data.draw(http_requests(version, device=dev))
    parsed = parse_request(req.method, req.target, req.headers)
    assert parsed.command == req.command and parsed.protocol_version == version
    b64 = "Cmd=" not in req.target
    assert parsed.base64_query == b64
    # the gateway names a base64-form DeviceId (raw bytes on the wire) by its hex
    assert parsed.device_id == (b"ABC123".hex() if b64 else "ABC123")
    assert parsed.policy_key == "1234567" and parsed.user == "jdoe"
    assert dict(req.headers)["content-length"] == str(len(req.body))


def test_base64_form_carries_saveinsent_and_item_for_12_1_smartreply():
    req = build("SmartReply", b"From: a@b\r\n\r\nhi\r\n", version="12.1", base64_query=True,
                params={"SaveInSent": "T", "ItemId": "1:2", "CollectionId": "1"})
    parsed = parse_request("POST", req.target, req.headers)
    assert parsed.command == "SmartReply" and parsed.params.get("ItemId") == "1:2"
    assert parsed.params.get("CollectionId") == "1"


@pytest.mark.parametrize("op", TREE_OPS)
@settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_each_tree_mutation_stays_decodable_and_breaks_something(op, data):
    version = data.draw(st.sampled_from(["12.1", "14.1", "16.1"]))
    command = data.draw(st.sampled_from([c for c in commands_for(version) if c != "SendMail" or version != "12.1"]))
    original = data.draw(request(command, version).filter(lambda b: isinstance(b, Element)))
    doc, ops = data.draw(tree_mutation(original, vnum(version), op))
    assert ops[0].startswith(op + ":")
    assert decode(encode(doc)) == doc        # still a well-formed document
    tags = [e.tag for e in doc.iter()]
    before = [e.tag for e in original.iter()]
    if op == "unknown":
        assert any("Unknown0x" in t for t in tags)
    elif op == "page":
        assert sorted(token_of(t)[1] for t in tags) == sorted(token_of(t)[1] for t in before) and tags != before
    elif op == "oversize":
        assert max(len(e.text or "") for e in doc.iter()) >= 4096
    elif op == "newer" and version != "16.1":
        assert any(first_version(t) > vnum(version) for t in tags)
    elif op == "range":
        assert doc != original or any(e.text in ("", "0") for e in original.iter())
    elif op in ("nest", "drop", "dup", "text-opaque"):
        assert doc != original


@settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(mutated(request("Sync", "14.1"), "14.1"))
def test_mutated_documents_record_their_operations(m):
    assert 1 <= len(m.ops) <= 4
    if isinstance(m.doc, Element):
        assert decode(encode(m.doc)) == m.doc
    else:
        assert m.doc[:4] == b"\x03\x01\x6a\x00"


def wb(doc: Element, status: int = 200, **headers) -> Answer:
    hdrs = [("content-type", "application/vnd.ms-sync.wbxml"), *headers.items()]
    return Answer(status=status, headers=hdrs, body=encode(doc))


def test_classifier_verdicts():
    ok_sync = Element("AirSync:Sync", [Element("AirSync:Status", text="4")])
    assert classify("Sync", "14.1", wb(ok_sync)).kind == "ok"
    assert classify("Sync", "14.1", Answer(status=500, headers=[], body=b"")).kind == "http-5xx"
    assert classify("Find", "16.1", Answer(status=501, headers=[], body=b"")).kind == "ok"
    assert classify("Sync", "14.1", Answer(status=503, headers=[("Retry-After", "30")], body=b"")).kind == "ok"
    assert classify("Sync", "14.1", Answer(status=503, headers=[], body=b"")).kind == "http-5xx"
    assert classify("Sync", "14.1", Answer(status=400, headers=[], body=b"")).kind == "ok"
    broken = Answer(status=200, headers=[("content-type", "application/vnd.ms-sync.wbxml")], body=b"\x03\x01\x6a\x00\x45")
    assert classify("Sync", "14.1", broken).kind == "malformed-wbxml"
    assert classify("Ping", "14.1", wb(ok_sync)).kind == "wrong-root"
    bad = Element("AirSync:Sync", [Element("AirSync:Status", text="2")])   # 2 is not a Sync status
    assert classify("Sync", "14.1", wb(bad)).kind == "status-out-of-range"
    blocked = Element("AirSync:Sync", [Element("AirSync:Status", text="129")])
    assert classify("Sync", "14.1", wb(blocked)).kind == "ok"          # a common status, 14.0+
    assert classify("Sync", "12.1", wb(blocked)).kind == "status-out-of-range"
    assert classify("Sync", "14.1", Answer(status=200, headers=[], body=b"")).kind == "ok"


def run_py(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_without_hypothesis_the_kit_names_the_extra_and_the_gateway_does_not_care():
    block = "import sys; sys.modules['hypothesis'] = None; "
    r = run_py(block + "import seg_fast.testing")
    assert r.returncode != 0 and "ImportError" in r.stderr and "seg-fast[fuzz]" in r.stderr
    r = run_py(block + "import seg_fast.proxy.server, seg_fast.sim.mailbox, seg_fast.cli; print('ok')")
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
    r = run_py(block + "from seg_fast.cli import main; "
               "sys.exit(main(['fuzz', '--target', 'http://127.0.0.1:9/']))")
    assert r.returncode == 2 and "pip install 'seg-fast[fuzz]'" in r.stderr


def test_cli_refuses_a_target_off_this_machine():
    r = subprocess.run([sys.executable, "-m", "seg_fast", "fuzz", "--target", "http://192.0.2.10:8080/",
                        "--max-examples", "1"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--i-own-this-server" in r.stderr and "not a loopback" in r.stderr
