"""The sizing fleet's answer checks: faults injected, the verdict must refuse the run.

- The email-security oracle (seg_fast.sim.oracle) accepts what the real content
  transform makes of corpus messages and rejects the same messages left unsealed,
  unrewritten or with a blocked attachment left in.
- Run level (real shard processes, the mailbox simulator over real sockets): answers
  damaged by one byte on the way, and attachments arriving unsealed where security
  is on, each make the point fail with the failure named.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import re
import tempfile
from pathlib import Path

import msgspec
import pytest
import trio
from hypothesis import example, given, settings
from hypothesis import strategies as st_

from seg_fast.content.attachments import envelope_name, extension, open_envelope, seal
from seg_fast.content.keys import Keyring
from seg_fast.content.message import ContentPlan, transform_mime
from seg_fast.content.model import EmailSecurityPolicy
from seg_fast.sim import checks, oracle, sizing
from seg_fast.sim.fleet import PooledCorpus

CLIENT = "Apple-iPhone15C2/2101.55"
RING = Keyring(b"k" * 32)


def _plan(managed: bool) -> ContentPlan:
    policy = msgspec.convert(sizing.policy_file("on", 0)["policies"]["security"], EmailSecurityPolicy)
    return ContentPlan(policy, managed=managed, device_id="DEV1", user="user1", keys=RING)


def _opener(blob: bytes) -> bytes:
    return open_envelope(RING, "DEV1", "user1", blob)[2]


@pytest.fixture(scope="module")
def pool():
    return PooledCorpus(3, pool=400)


def _pick(pool, pred):
    for i in range(pool.pool):
        m = pool.message(i)
        if pred(m):
            return m
    raise AssertionError("no such message in the pool")


def _att(ext):
    return lambda m: (not m.signed and m.attachments and extension(m.attachments[0][0]) == ext
                      and m.attachment_size <= 300 * 1024)


def test_pool_holds_the_profile_attachment_mix(pool):
    sizes = [pool.message(i).attachment_size for i in range(pool.pool)]
    assert sizes.count(None) == 300
    assert [sizes.count(s) for s in (50 * 1024, 300 * 1024, 2 * 1024**2, 10 * 1024**2)] == [60, 30, 9, 1]


def test_links_oracle():
    direct = '<a href="https://www.contoso.com/a?id=1">x</a> see http://cpandl.com/b and http://fabrikam.com/c'
    good = direct.replace("https://www.contoso", "awbs://www.contoso").replace("http://fabrikam", "awb://fabrikam")
    assert oracle.links_ok(good, direct) is None
    assert "not rewritten" in oracle.links_ok(direct, direct)                  # listed left alone
    over = good.replace("http://cpandl", "awb://cpandl")
    assert "unlisted domain rewritten" in oracle.links_ok(over, direct)
    assert "beyond link schemes" in oracle.links_ok(good.replace("x</a>", "y</a>"), direct)


# The link scanner's reference: the pattern it replaced, tried at every character.
_LINK = re.compile(r"\b(awbs|awb|https|http)://([A-Za-z0-9.-]+)")


def _pattern_links(s: str) -> list:
    return [(m.start(), *m.groups()) for m in _LINK.finditer(s)]
_PIECES = st_.sampled_from(["://", "http://", "https://", "http", "https", "awb", "awbs", "s", "x", "_", "ß", "²", " ", "/", ".",
                            "-", ":", "a.com", "contoso.com", "é", "<a href=\"", "\"", "\n"])


@given(st_.lists(_PIECES, max_size=40).map("".join))
@example("http://https://a.com and xhttp://a.com, see http://contoso.com")   # a host that is a scheme
def test_link_scanner_finds_what_the_pattern_finds(s):
    assert list(oracle.links(s)) == _pattern_links(s)


def test_link_scanner_on_corpus_bodies(pool):
    bodies = [pool.message(i).html for i in range(60)]
    assert sum(len(_LINK.findall(b)) for b in bodies) > 100      # bodies with links were tried
    for b in bodies:
        assert list(oracle.links(b)) == _pattern_links(b)
        rewritten = b.replace("https://", "awbs://")
        assert list(oracle.links(rewritten)) == _pattern_links(rewritten)


def test_body_check_by_bytes_says_what_links_ok_says(pool):
    htmls = [m.html for m in (pool.message(i) for i in range(pool.pool)) if m.body_type == 2][:40]
    for direct in htmls:
        want = oracle.expected_body(direct)
        assert want is not None and want != direct.encode()      # every body has a listed link
        assert oracle.links_ok(want.decode(), direct) is None
        assert oracle.body_ok(want, direct) is None
        # what the shortcut does not take gets the whole check and its reason
        for got in (direct.encode(), want.replace(b"awb", b"http", 1), want.replace(b"</", b"<", 1),
                    want.replace(b"https://", b"awbs://"), b"\xff" + want):
            why = oracle.body_ok(got, direct)
            assert why is not None
            try:
                assert why == oracle.links_ok(got.decode("utf-8"), direct)
            except UnicodeDecodeError:
                assert why == "HTML body is not UTF-8"
    # a direct body no answer can satisfy (it holds a rewritten scheme itself): no shortcut
    assert oracle.expected_body('<a href="awbs://contoso.com">') is None
    assert oracle.body_ok(b'<a href="awbs://contoso.com">', '<a href="awbs://contoso.com">') is not None


@pytest.mark.parametrize("managed,ext", [(True, "pdf"), (True, "zip"), (False, "png"), (False, "pdf")])
def test_mime_oracle_accepts_the_gateway_transform_and_rejects_the_untouched(pool, managed, ext):
    msg = _pick(pool, _att(ext))
    got, _ = transform_mime(msg.mime, _plan(managed), client=CLIENT)
    assert oracle.mime_cheap_ok(got, msg, managed) is None
    assert oracle.mime_full_ok(got, msg, managed, _opener) is None
    untouched = oracle.mime_full_ok(msg.mime, msg, managed, _opener)
    assert untouched is not None            # links never left alone under Include mode
    if oracle.action(ext, managed) != "keep":
        # the attachment in the clear is caught even by the every-item cheap check
        assert "in the clear" in oracle.mime_cheap_ok(msg.mime, msg, managed)


def test_fetch_oracle_opens_envelopes_and_compares_them_with_the_original(pool):
    name, ctype, data = _pick(pool, _att("pdf")).attachments[0]
    blob = seal(RING, "DEV1", "user1", name, ctype, data)
    assert oracle.fetched_ok(blob, name, data, True, _opener) is None
    assert oracle.fetched_ok(data, name, data, True, _opener) == "not sealed (no envelope)"
    for changed in (data[:-1] + bytes([data[-1] ^ 1]), bytes([data[0] ^ 0x80]) + data[1:], data[:-1], data + b"\0"):
        other = seal(RING, "DEV1", "user1", name, ctype, changed)
        assert oracle.fetched_ok(other, name, data, True, _opener) == "envelope opens to other bytes"
    wrong_device = seal(RING, "DEV2", "user1", name, ctype, data)
    assert "does not open" in oracle.fetched_ok(wrong_device, name, data, True, _opener)
    assert hashlib.sha256(_opener(blob)).digest() == hashlib.sha256(data).digest()
    # the attachment list: sealed ones renamed, blocked ones gone
    msg = _pick(pool, _att("png"))
    png = msg.attachments[0][0]
    assert oracle.attachment_list_ok([], msg, managed=False) is None
    assert "still listed" in oracle.attachment_list_ok([png], msg, managed=False)
    msg = _pick(pool, _att("docx"))
    docx = msg.attachments[0][0]
    assert oracle.attachment_list_ok([envelope_name(docx)], msg, managed=True) is None
    assert "missing" in oracle.attachment_list_ok([docx], msg, managed=True)


# -- run level: real shards over real sockets -----------------------------------------------

DEVICES = 40


def _opts(**kw) -> sizing.Options:
    return sizing.Options(devices=DEVICES, ramp=2.0, settle=1.0, hold=6.0, drain=20.0, shard_size=200,
                          rate_scale=40.0, seed=5, repeat=1, **kw)


def _path(opts: sizing.Options) -> dict:
    async def go():
        with tempfile.TemporaryDirectory(prefix="seg-sizing-test-") as d:
            return await sizing.run_path("direct", opts, Path(d), lambda _m: None)
    return trio.run(go)


@pytest.fixture(scope="module")
def clean():
    p = _path(_opts())
    assert p["failures"] == {}, p["failure_samples"]
    assert p["byte_checked"] > 100              # answers compared byte for byte
    # Sync/Fetch answers checked by the simulator's record, a sample decoded as well
    assert p["facts_checked"] > 50 and p["facts_crosschecked"] > 0
    return p


def _verdict(clean: dict, faulty: dict, security: str = "off") -> dict:
    """The faulty run judged as the proxy's run beside the clean direct one."""
    faulty = dict(faulty, path="gateway", server={"cpu_s": 1.0, "cpu_share": 0.1, "rss_kib_max": 1000,
                                                  "rss_kib_idle": 500, "runqueue_wait": 0.0, "died": False})
    point = {"devices": DEVICES, "paths": {"direct": clean, "gateway": faulty}}
    return sizing.judge(point, _opts(security=security))


def test_a_corrupted_answer_fails_the_run(clean):
    p = _path(_opts(fault="corrupt"))
    assert p["failures"].get("Sync.bytes", 0) > 0, p["failures"]
    v = _verdict(clean, p)
    assert not v["meets"]
    assert any("failed or wrong answers" in b and "Sync.bytes" in b for b in v["broke"]), v["broke"]


def test_a_record_that_disagrees_with_the_answer_fails_the_run(clean):
    # the simulator's record of some Sync answers damaged (fault "facts"): every
    # answer checked by record is decoded as well, and the disagreement is a failure
    p = _path(_opts(fault="facts"))
    assert p["failures"].get("Sync.facts", 0) > 0, p["failures"]
    assert not _verdict(clean, p)["meets"]


def test_unsealed_attachments_with_security_on_fail_the_run(clean, monkeypatch):
    # a "gateway" that passes everything untouched while the policy says seal,
    # block and rewrite: the simulator's own answers checked as security-on answers
    monkeypatch.setattr(sizing, "checks_for", lambda path, opts: "security")
    p = _path(_opts(security="on"))
    assert p["failures"].get("Sync.security", 0) > 0, p["failures"]
    assert any("not rewritten" in s or "in the clear" in s or "missing" in s for s in p["failure_samples"])
    v = _verdict(clean, p, "on")
    assert not v["meets"]
    assert any("Sync.security" in b for b in v["broke"]), v["broke"]


def test_large_answers_checked_in_the_oracles_thread_still_fail_the_run(clean, monkeypatch):
    # every fetched attachment and sampled MIME message checked in the shard's oracle
    # thread (sim/checks.py): what it finds wrong still fails the run
    monkeypatch.setenv("SEG_FAST_ORACLE_THREAD_BYTES", "0")
    monkeypatch.setattr(sizing, "checks_for", lambda path, opts: "security")
    p = _path(_opts(security="on"))
    assert p["checks_offloaded"] > 0
    assert p["failures"].get("ItemOperations.security", 0) > 0, p["failures"]
    assert any("ItemOperations.security" in s and ("not sealed" in s or "in the clear" in s)
               for s in p["failure_samples"]), p["failure_samples"]


def test_the_oracles_thread_counts_failures_and_is_waited_for():
    from seg_fast.sim.checks import MAX_PENDING, Checks
    from seg_fast.sim.fleet import Stats
    import threading

    st = Stats()
    checks = Checks(st)
    gate = threading.Event()
    threads = set()

    def check(i):
        threads.add(threading.get_ident())
        gate.wait(20)
        if i == 3:
            raise ValueError("broken oracle")
        return "wrong" if i % 2 else None

    for i in range(MAX_PENDING + 2):
        if i == MAX_PENDING:
            gate.set()
            checks.wait()              # drains the thread so the next ones queue again
        checks.run("ItemOperations.security", f"dev{i}", check, i)
    checks.wait()
    assert checks.offloaded == MAX_PENDING + 2
    assert threading.get_ident() not in threads
    # odd i fail, i == 3 raised: counted as a failure, never a pass
    want = sum(1 for i in range(MAX_PENDING + 2) if i % 2)
    assert st.failures["ItemOperations.security"] == want
    assert any("broken oracle" in s for s in st.failure_samples)


def test_the_oracles_thread_backlog_is_bounded():
    from seg_fast.sim.checks import MAX_PENDING, Checks
    from seg_fast.sim.fleet import Stats
    import threading

    st = Stats()
    checks = Checks(st)
    gate = threading.Event()
    ran_in = []

    def check(i):
        ran_in.append((i, threading.get_ident()))
        if i < MAX_PENDING:
            gate.wait(20)
        return None

    for i in range(MAX_PENDING + 1):
        checks.run("Sync.security", "dev", check, i)
    # the one past the bound ran here, before returning, while the others wait
    assert (MAX_PENDING, threading.get_ident()) in ran_in
    gate.set()
    checks.wait()
    assert checks.offloaded == MAX_PENDING and checks.in_loop == 1
    assert sorted(i for i, _ in ran_in) == list(range(MAX_PENDING + 1))
    assert st.failures == {}


@given(data=st_.binary(max_size=3000), width=st_.sampled_from([0, 60, 64, 75, 76]),
       crlf=st_.booleans(), as_text=st_.booleans())
@settings(max_examples=150)
def test_sliced_base64_decodes_as_one_call(data, width, crlf, as_text):
    """checks.b64decode gives what one lenient binascii call gives, for unbroken base64
    and for lines of any width (a width that is not whole quanta is decoded whole)."""
    s = binascii.b2a_base64(data, newline=False)
    if width:
        nl = b"\r\n" if crlf else b"\n"
        s = nl.join(s[i:i + width] for i in range(0, len(s), width)) + nl
    s = s.decode() if as_text else s
    assert checks.b64decode(s, 64) == binascii.a2b_base64(s) == data


@given(data=st_.binary(min_size=1, max_size=600), at=st_.integers(min_value=0), junk=st_.sampled_from(
    ["=", " ", "*", "\n", "==", "\u00e9", "A", "AB"]))
@settings(max_examples=150)
def test_base64_the_strict_decoder_refuses_goes_the_lenient_way(data, at, junk):
    """One line of base64 with a character put in or cut out is not what the strict
    (pybase64) decoder takes: the answer is still what one lenient binascii call gives,
    or the same error."""
    s = binascii.b2a_base64(data, newline=False).decode()
    at %= len(s) + 1
    for bad in (s[:at] + junk + s[at:], s[:at] + s[at + 1:]):
        try:
            want = binascii.a2b_base64(bad)
        except (binascii.Error, ValueError) as exc:
            with pytest.raises(type(exc)):
                checks.b64decode(bad, 64)
        else:
            assert checks.b64decode(bad, 64) == want


def test_sliced_base64_keeps_every_call_short(monkeypatch):
    """The oracle's thread never hands binascii more than a slice (and a line) at once:
    one call holds the GIL, and the shard's loop waits for it. One canonical line (a
    fetched attachment's Data) does not go to binascii at all: pybase64 decodes it
    (~1 ms for 13 MB)."""
    calls = []
    real = binascii.a2b_base64
    monkeypatch.setattr(checks.binascii, "a2b_base64", lambda s: calls.append(len(s)) or real(s))
    data = bytes(range(256)) * 8000                  # 2 MB
    line = binascii.b2a_base64(data, newline=False).decode()
    assert checks.b64decode(line) == data and calls == []
    for s in (line[:-4] + "*" + line[-4:], base64.encodebytes(data)):
        calls.clear()
        assert checks.b64decode(s) == data
        assert len(calls) >= len(s) // checks.SLICE
        assert max(calls) <= checks.SLICE + 80


def test_mime_oracle_decodes_parts_in_slices(pool, monkeypatch):
    """A sealed attachment's envelope decoded slice by slice still opens to the original,
    and a damaged one is still refused."""
    monkeypatch.setattr(checks, "SLICE", 4096)
    calls = []
    real = binascii.a2b_base64
    monkeypatch.setattr(checks.binascii, "a2b_base64", lambda s: calls.append(len(s)) or real(s))
    msg = _pick(pool, _att("pdf"))
    got, _ = transform_mime(msg.mime, _plan(True), client=CLIENT)
    assert oracle.mime_full_ok(got, msg, True, _opener) is None
    assert len(calls) > len(msg.attachments[0][2]) // 4096 and max(calls) <= 4096 + 80
    name = envelope_name(msg.attachments[0][0])
    other = seal(RING, "DEV2", "user1", name, "application/pdf", msg.attachments[0][2])
    # an envelope sealed for another device, put in the sealed one's place
    head, sep, rest = got.partition(b'filename="' + name.encode() + b'"')
    assert sep
    body_at = rest.index(b"\r\n\r\n") + 4
    end = rest.index(b"\r\n--", body_at)
    swapped = head + sep + rest[:body_at] + base64.encodebytes(other).replace(b"\n", b"\r\n").rstrip() + rest[end:]
    assert "does not open" in oracle.mime_full_ok(swapped, msg, True, _opener)
