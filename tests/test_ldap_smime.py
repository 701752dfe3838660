"""S/MIME certificate lookup in LDAP, end to end: device -> `seg-fast serve` -> simulator,
with certificates from a real slapd (tests/slapd_server.py) over StartTLS and simple bind.

The simulator's directory has a certificate only for the corpus signer; everyone else is
answered Certificates/Status 7. The oracle for "what the gateway changed" is the
simulator's own answer to the same request, asked directly: every Response must be the
same except the Certificates the gateway filled from LDAP, whose bytes must be the
directory's (as slapd holds them). Hostile directories (huge BER lengths, floods,
silence) and hostile requests (10,000 recipients, filter injection) go through a
second gateway against a fake LDAP server in this process.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from xml.etree import ElementTree

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from http_client import request
from thread_server import ThreadServer
from processes import REPO, start_serve, stop_process, wait_listening
from redis_server import free_port
from seg_fast.eas.wbxml import decode
from seg_fast.ldapcerts import SmimeSettings, compile_filter, directory_from, escape_value, search_many
from seg_fast.sim.client import EasClient
from seg_fast.sim.smime import signer
from seg_fast.sim.tree import E, encode
from slapd_server import SERVICE_DN, SUFFIX, running_slapd

PASSWORD = "secret"
NS = "ResolveRecipients:"
MAX_LOOKUPS = 50


def rr_request(to: list[str], retrieval: int | None = 2, max_certs: int | None = None) -> bytes:
    opts = []
    if retrieval is not None:
        opts.append(E(NS + "CertificateRetrieval", retrieval))
    if max_certs is not None:
        opts.append(E(NS + "MaxCertificates", max_certs))
    return encode(E(NS + "ResolveRecipients", *[E(NS + "To", t) for t in to],
                    E(NS + "Options", *opts) if opts else None))


async def _ask(port: int, body: bytes, device: str = "RRDEV1"):
    c = EasClient("127.0.0.1", port, "sender", PASSWORD, device, device_type="iPhone",
                  user_agent="Apple-iPhone/1.0")
    try:
        with trio.fail_after(60):
            return await c.request("ResolveRecipients", body,
                                   headers={"content-type": "application/vnd.ms-sync.wbxml"})
    finally:
        await c.aclose()


def ask(port: int, body: bytes, device: str = "RRDEV1"):
    return trio.run(_ask, port, body, device)


def responses(body: bytes) -> dict[str, object]:
    root = decode(body)
    out = {}
    for resp in root.children:
        if resp.tag == NS + "Response":
            out[resp.find(NS + "To").text] = resp
    return out


def certs_of(resp) -> tuple[str | None, list[bytes], str | None]:
    """(Certificates/Status, Certificate DERs, CertificateCount) of a Response's recipient."""
    rcpt = resp.find(NS + "Recipient")
    certs = rcpt.find(NS + "Certificates") if rcpt is not None else None
    if certs is None:
        return None, [], None
    return (certs.findtext(NS + "Status"), [base64.b64decode(c.text) for c in certs.findall(NS + "Certificate")],
            certs.findtext(NS + "CertificateCount"))


class Serve:
    def __init__(self, proc, port):
        self.proc, self.port = proc, port
        self.stderr: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stderr:
            self.stderr.append(line.decode("utf-8", "replace"))

    def incidents(self, kind: str) -> list[dict]:
        return [json.loads(x) for x in list(self.stderr) if x.startswith("{") and f'"incident":"{kind}"' in x]

    def wait_incident(self, kind: str, bound: float = 20) -> list[dict]:
        end = time.monotonic() + bound
        while time.monotonic() < end:
            found = self.incidents(kind)
            if found:
                return found
            time.sleep(0.05)
        raise AssertionError(f"no {kind} incident; stderr: {''.join(self.stderr)[-2000:]}")


def _serve(tmp, sim_port: int, smime: str, admin_port: int = 0) -> Serve:
    port = free_port()
    cfg = tmp / f"gw{port}.toml"
    admin = f'port = {admin_port}' if admin_port else 'enabled = false'
    cfg.write_text(
        f'workers = 1\n[listener]\nhost = "127.0.0.1"\nport = {port}\n'
        f'[upstream]\nurl = "http://127.0.0.1:{sim_port}"\n'
        f'[admin]\n{admin}\n[log]\ntransactions = ""\n'
        f'[policy]\nallow_if_no_policies = true\n'
        f'[smime]\n{smime}')
    proc = start_serve(cfg, tmp)
    s = Serve(proc, port)
    wait_listening(port, proc)
    return s


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rr-sim")
    proc = subprocess.Popen([sys.executable, "-m", "seg_fast", "sim", "--port", "0", "--no-provisioning",
                             "--password", PASSWORD], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=tmp,
                            env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    try:
        yield json.loads(proc.stdout.readline())["sim_port"]
    finally:
        stop_process(proc)


@pytest.fixture(scope="module")
def slapd(tmp_path_factory):
    with running_slapd(tmp_path_factory.mktemp("ldap")) as s:
        yield s


@pytest.fixture(scope="module")
def gw(tmp_path_factory, sim, slapd):
    tmp = tmp_path_factory.mktemp("rr-gw")
    # The password reaches the gateway through a file; it must appear in no log line.
    s = _serve(tmp, sim, f'ldap_url = "{slapd.ldap_url}"\nldap_starttls = true\nldap_ca_file = "{slapd.ca_file}"\n'
                         f'ldap_auth = "simple"\nldap_user = "{SERVICE_DN}"\n'
                         f'ldap_password_file = "{slapd.password_file}"\nldap_base_dn = "ou=people,{SUFFIX}"\n'
                         f'max_lookups_per_request = {MAX_LOOKUPS}\n')
    try:
        yield s
    finally:
        stop_process(s.proc)


EVERYONE = ["alice@seg-fast.test", "bob@seg-fast.test", "carol@seg-fast.test", "dave@seg-fast.test",
            "erin@seg-fast.test", "signer@seg-fast.test", "unknown1@seg-fast.test", "zed@seg-fast.test"]


def test_certificates_from_ldap_fill_what_the_mail_server_lacks(gw, sim, slapd, tmp_path):
    body = rr_request(EVERYONE)
    direct = ask(sim, body)
    through = ask(gw.port, body)
    assert direct.status == through.status == 200
    want, got = responses(direct.body), responses(through.body)
    assert list(want) == list(got) == EVERYONE
    people = slapd.people
    # Filled from the directory, bytes as slapd holds them, counts per MS-ASCMD.
    for mail in ("alice@seg-fast.test", "bob@seg-fast.test"):
        assert certs_of(want[mail])[0] == "7"
        status, ders, count = certs_of(got[mail])
        assert status == "1" and ders == list(people[mail].certs) and count == str(len(ders))
        assert got[mail].find(NS + "Recipient").find(NS + "Certificates").findtext(NS + "RecipientCount") == "1"
    assert len(certs_of(got["bob@seg-fast.test"])[1]) == 2
    # Expired, naming someone else, none in the directory, unknown to LDAP: as the mail server said.
    for mail in ("carol@seg-fast.test", "dave@seg-fast.test", "erin@seg-fast.test", "zed@seg-fast.test",
                 "unknown1@seg-fast.test"):
        assert got[mail] == want[mail], mail
    # The mail server had one for the signer: kept, the directory's not added.
    signer_der = signer()[1].public_bytes(__import__("cryptography").hazmat.primitives.serialization.Encoding.DER)
    assert certs_of(got["signer@seg-fast.test"])[1] == [signer_der]
    assert certs_of(got["signer@seg-fast.test"])[1] != list(people["signer@seg-fast.test"].certs)
    # Everything else in the answer is the mail server's.
    assert decode(through.body).findtext(NS + "Status") == "1"
    # libwbxml reads the re-encoded answer the same way (an independent decoder).
    exe = shutil.which("wbxml2xml")
    if exe is None and os.environ.get("CI") == "true":
        raise AssertionError("wbxml2xml missing (scripts/test.sh installs libwbxml2-utils)")
    if exe is not None:
        src, dst = tmp_path / "rr.wbxml", tmp_path / "rr.xml"
        src.write_bytes(through.body)
        subprocess.run([exe, "-l", "ACTIVESYNC", "-o", str(dst), str(src)], check=True, capture_output=True)
        tree = ElementTree.fromstring(dst.read_bytes().split(b"?>", 1)[1].split(b">", 1)[1])
        seen = {}
        for resp in (e for e in tree.iter() if e.tag.rsplit("}", 1)[-1] == "Response"):
            kids = {c.tag.rsplit("}", 1)[-1]: c for c in resp.iter()}
            certs = [base64.b64decode("".join(c.text.split())) for c in resp.iter()
                     if c.tag.rsplit("}", 1)[-1] == "Certificate"]
            seen[kids["To"].text.strip()] = certs
        assert seen["alice@seg-fast.test"] == list(people["alice@seg-fast.test"].certs)
        assert seen["bob@seg-fast.test"] == list(people["bob@seg-fast.test"].certs)
        assert seen["carol@seg-fast.test"] == []
    assert all(not line.count(open(slapd.password_file).read().strip()) for line in gw.stderr)


def test_without_certificate_retrieval_the_answer_passes_byte_for_byte(gw, sim):
    for retrieval in (None, 1, 3):
        body = rr_request(EVERYONE[:3], retrieval=retrieval)
        assert ask(gw.port, body).body == ask(sim, body).body


def test_max_certificates_answers_status_8_with_the_count_not_returned(gw, slapd):
    got = responses(ask(gw.port, rr_request(["alice@seg-fast.test", "bob@seg-fast.test"], max_certs=2)).body)
    assert certs_of(got["alice@seg-fast.test"])[:2] == ("1", list(slapd.people["alice@seg-fast.test"].certs))
    # bob's two would pass the limit of 2: none returned, Status 8, CertificateCount 2
    assert certs_of(got["bob@seg-fast.test"]) == ("8", [], "2")


def test_filter_injection_is_escaped(gw, sim, slapd):
    # Unescaped, "*@seg-fast.test" is a substring filter matching everyone in the directory:
    d = directory_from(SmimeSettings(ldap_url=slapd.ldap_url, ldap_ca_file=slapd.ca_file, ldap_auth="simple",
                                     ldap_user=SERVICE_DN, ldap_password_file=slapd.password_file,
                                     ldap_base_dn=SUFFIX))
    raw = trio.run(search_many, d._replace(filter_template="(mail=*@seg-fast.test)"), ["x"])
    assert len(raw["x"]) >= 5                  # the oracle: the injection would have worked
    hostile = ["*@seg-fast.test", "alice@seg-fast.test)(mail=*", "*)(|(mail=*@seg-fast.test",
               "\\2a@seg-fast.test"]
    raw = trio.run(search_many, d, hostile)
    assert all(v == [] for v in raw.values()), {k: len(v) for k, v in raw.items()}
    body = rr_request(hostile)
    assert ask(gw.port, body).body == ask(sim, body).body
    assert compile_filter("(mail=a\\2a)") != compile_filter("(mail=a*)")
    assert compile_filter("(mail>=a=b)")[0] == 0xA5 and compile_filter("(mail=a>=b)")[0] == 0xA3


def test_ten_thousand_recipients_are_capped_and_the_worker_lives(gw, slapd):
    to = ["alice@seg-fast.test"] + [f"user{i}@seg-fast.test" for i in range(9_998)] + ["bob@seg-fast.test"]
    r = ask(gw.port, rr_request(to))
    assert r.status == 200
    got = responses(r.body)
    assert len(got) == 10_000
    assert certs_of(got["alice@seg-fast.test"])[0] == "1"
    assert certs_of(got["bob@seg-fast.test"])[0] == "7"       # past smime.max_lookups_per_request
    capped = gw.wait_incident("smime_lookups_capped")
    assert capped[0]["recipients"] == 10_000 - MAX_LOOKUPS
    assert gw.proc.poll() is None
    assert certs_of(responses(ask(gw.port, rr_request(["bob@seg-fast.test"]), "RRDEV2").body)
                    ["bob@seg-fast.test"])[0] == "1"


# -- a hostile directory ---------------------------------------------------------------------

def _ber(tag: int, value: bytes) -> bytes:
    n = len(value)
    head = bytes([n]) if n < 0x80 else bytes([0x84]) + n.to_bytes(4, "big")
    return bytes([tag]) + head + value


def _msg(mid: int, op: bytes) -> bytes:
    return _ber(0x30, _ber(0x02, bytes([mid])) + op)


class HostileLdap(ThreadServer):
    """Answers the bind, then searches as ``mode`` says; counts the searches it got."""

    def __init__(self):
        self.mode = "empty"
        self.searches = 0
        self.open = 0                 # connections open right now
        # Connections with a search not yet answered, and the most at once. A connection is
        # in flight only between its search arriving and its answer leaving, both inside the
        # gateway's hold on its connection slot, so this never exceeds the gateway's limit;
        # counting open sockets would (a closed one is seen here later than the gateway's next).
        self.inflight = 0
        self.most = 0
        self.lock = threading.Lock()
        super().__init__()

    def _serve(self, conn, n):
        ok = _ber(0x0A, b"\x00") + _ber(0x04, b"") + _ber(0x04, b"")
        with self.lock:
            self.open += 1
        waiting = 0                   # this connection's searches not answered yet
        try:
            conn.settimeout(30)
            if self.mode == "down":
                return
            buf = b""
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
                while len(buf) >= 2 and len(buf) >= 2 + buf[1]:          # our client's messages are short
                    msg, buf = buf[:2 + buf[1]], buf[2 + buf[1]:]
                    if len(msg) < 6:        # out of step ("silent" took a byte): hang up
                        return
                    mid, op = msg[4], msg[5]
                    if op == 0x60:
                        conn.sendall(_msg(mid, _ber(0x61, ok)))
                    elif op == 0x63:
                        with self.lock:
                            self.searches += 1
                            if not waiting:
                                self.inflight += 1
                                self.most = max(self.most, self.inflight)
                            waiting += 1
                        self._answer(conn, mid, ok)
                        with self.lock:
                            waiting -= 1
                            if not waiting:
                                self.inflight -= 1
                    else:
                        return
        except OSError:
            pass
        finally:
            with self.lock:
                self.open -= 1
                if waiting:
                    self.inflight -= 1
            conn.close()

    def _answer(self, conn, mid, ok):
        if self.mode == "empty":
            conn.sendall(_msg(mid, _ber(0x65, ok)))
        elif self.mode == "huge":
            # A 2 GiB SearchResultEntry announced, a little sent: never buffered, never waited for.
            conn.sendall(b"\x30\x84\x7f\xff\xff\xff\x02\x01" + bytes([mid]) + b"\x64\x84\x7f\xff\xff\xf0" + b"A" * 4096)
        elif self.mode == "flood":
            entry = _msg(mid, _ber(0x64, _ber(0x04, b"uid=x") + _ber(0x30, b"")))
            for _ in range(100_000):
                conn.sendall(entry * 100)
        elif self.mode == "silent":           # says nothing until the gateway hangs up
            conn.recv(1)
        elif self.mode == "malformed":        # an entry with a name and no attribute list
            conn.sendall(_msg(mid, _ber(0x64, _ber(0x04, b"uid=x"))))
        elif self.mode == "referrals":        # referrals without end (never followed)
            ref = _msg(mid, _ber(0x73, _ber(0x04, b"ldap://elsewhere.invalid/")))
            for _ in range(100_000):
                conn.sendall(ref * 100)
        elif self.mode == "hold":             # answer once a second connection is open (or 5 s passed)
            end = time.monotonic() + 1.5
            while self.most < 2 and time.monotonic() < end:
                time.sleep(0.01)
            conn.sendall(_msg(mid, _ber(0x65, ok)))
        elif self.mode == "other-id":         # an answer to a question nobody asked
            conn.sendall(_msg(mid + 1, _ber(0x65, ok)))


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, sim):
    server = HostileLdap()
    tmp = tmp_path_factory.mktemp("rr-hostile")
    admin = free_port()
    s = _serve(tmp, sim, f'ldap_url = "ldap://127.0.0.1:{server.port}"\nldap_starttls = false\n'
                         f'ldap_timeout = 2.0\nldap_retry_after = 0.1\nnegative_cache_ttl = 300\n'
                         f'ldap_max_connections = 2\n', admin)
    s.admin_port = admin
    try:
        yield s, server
    finally:
        stop_process(s.proc)
        server.sock.close()


def unavailable_count(gw) -> int:
    """smime_ldap_unavailable as /metrics counts it (the log is rate-limited; the counter is not)."""
    async def get():
        with trio.fail_after(20):
            while True:
                try:
                    return await request(gw.admin_port, "GET", "/metrics")
                except OSError:
                    await trio.sleep(0.1)

    status, _, raw = trio.run(get)
    assert status == 200
    for line in raw.decode().splitlines():
        if line.startswith("seg_fast_incidents_total{") and 'kind="smime_ldap_unavailable"' in line:
            return int(float(line.rsplit(" ", 1)[1]))
    return 0


@pytest.mark.parametrize("mode", ["huge", "flood", "silent", "down", "malformed", "referrals", "other-id"])
def test_hostile_directory_leaves_the_answer_unchanged_and_is_counted(hostile, sim, mode):
    gw, server = hostile
    server.mode = mode
    before = unavailable_count(gw)
    to = [f"{mode}{i}@seg-fast.test" for i in range(3)]
    body = rr_request(to)
    assert ask(gw.port, body).body == ask(sim, body).body
    end = time.monotonic() + 20
    while unavailable_count(gw) <= before and time.monotonic() < end:
        time.sleep(0.1)
    assert unavailable_count(gw) > before
    assert gw.proc.poll() is None
    server.mode = "empty"


def test_negative_answers_are_cached(hostile, sim):
    gw, server = hostile
    server.mode = "empty"
    body = rr_request(["cached1@seg-fast.test", "cached2@seg-fast.test"])
    end = time.monotonic() + 20
    while True:                   # past any back-off left by the hostile modes
        n = server.searches
        ask(gw.port, body)
        if server.searches == n + 2 or time.monotonic() > end:
            break
        time.sleep(0.2)
    assert server.searches == n + 2
    ask(gw.port, body)
    ask(gw.port, body)
    assert server.searches == n + 2            # answered from the cache


# -- the client and its settings against the real slapd, in process ----------------------------

def _settings(slapd, **kw) -> SmimeSettings:
    base = dict(ldap_url=slapd.ldaps_url, ldap_ca_file=slapd.ca_file, ldap_auth="simple", ldap_user=SERVICE_DN,
                ldap_password_file=slapd.password_file, ldap_base_dn=SUFFIX)
    return SmimeSettings(**{**base, **kw})


def test_ldaps_starttls_trust_and_bind_failures(slapd, tmp_path, monkeypatch):
    from seg_fast.ldapcerts import CertLookup
    from seg_fast.proxy.incidents import Incidents

    alice = "alice@seg-fast.test"
    want = slapd.people[alice].certs
    assert trio.run(CertLookup(_settings(slapd)).lookup, [alice])[alice] == want             # ldaps://
    monkeypatch.setenv("H7_LDAP_PW", open(slapd.password_file).read().strip())
    env = _settings(slapd, ldap_url=slapd.ldap_url, ldap_password_file="", ldap_password_env="H7_LDAP_PW")
    assert trio.run(CertLookup(env).lookup, [alice])[alice] == want                           # StartTLS, env
    # Anonymous: slapd lets it find people but not read their certificates.
    anon = _settings(slapd, ldap_auth="anonymous", ldap_user="", ldap_password_file="")
    assert trio.run(CertLookup(anon).lookup, [alice])[alice] == ()
    # Untrusted directory certificate, wrong password, StartTLS refused by a plain port: unavailable,
    # counted, the password in no message.
    (tmp_path / "bad.pw").write_text("wrong-password-xyz\n")
    other_ca = tmp_path / "other.pem"
    __import__("trustme").CA().cert_pem.write_to_path(str(other_ca))
    for bad, why in ((_settings(slapd, ldap_ca_file=str(other_ca)), "certificate verify failed"),
                     (_settings(slapd, ldap_password_file=str(tmp_path / "bad.pw")), "result 49"),
                     (_settings(slapd, ldap_url=slapd.ldaps_url.replace("ldaps://", "ldap://")), "")):
        out = __import__("io").StringIO()
        lookup = CertLookup(bad, Incidents(stream=out))
        assert trio.run(lookup.lookup, [alice]) is None
        line = json.loads(out.getvalue().splitlines()[0])
        assert line["incident"] == "smime_ldap_unavailable" and lookup.counts["unavailable"] == 1
        assert why in line["reason"] and line["reason"], line
        assert "wrong-password-xyz" not in out.getvalue()
        # The back-off: the next lookup does not even try.
        assert trio.run(lookup.lookup, [alice]) is None and lookup.counts["lookups"] == 1


def test_smime_settings_are_checked_with_the_key_named(slapd, tmp_path):
    from seg_fast.config import load_config
    from seg_fast.errors import ConfigError

    def load(smime: str):
        cfg = tmp_path / "c.toml"
        cfg.write_text(f"[smime]\n{smime}")
        return load_config(cfg, env={})

    cases = [('ldap_url = "http://dir"\n', "smime.ldap_url"),
             ('ldap_url = "ldaps://dir"\nldap_auth = "simple"\nldap_password_file = "/nonexistent"\n'
              'ldap_user = "cn=x"\n', "smime.ldap_password_file"),
             ('ldap_url = "ldaps://dir"\nldap_auth = "simple"\nldap_password_env = "H7_NOT_SET_EVER"\n'
              'ldap_user = "cn=x"\n', "smime.ldap_password_env"),
             (f'ldap_url = "ldaps://dir"\nldap_auth = "simple"\nldap_password_file = "{slapd.password_file}"\n',
              "smime.ldap_user"),
             (f'ldap_url = "ldap://dir.example.com"\nldap_starttls = false\nldap_auth = "simple"\n'
              f'ldap_user = "cn=x"\nldap_password_file = "{slapd.password_file}"\n', "smime.ldap_starttls"),
             ('ldap_url = "ldaps://dir"\nldap_filter = "(mail=x)"\n', "smime.ldap_filter"),
             ('ldap_url = "ldaps://dir"\nldap_filter = "(&(mail={email})"\n', "smime.ldap_filter"),
             ('ldap_url = "ldaps://dir"\nmax_lookups_per_request = 0\n', "smime.max_lookups_per_request"),
             ('ldap_url = "ldaps://dir"\nldap_ca_file = "/nonexistent/ca.pem"\n', "smime.ldap_ca_file"),
             (f'ldap_url = "ldaps://dir"\nldap_ca_file = "{slapd.password_file}"\n', "smime.ldap_ca_file")]
    for text, key in cases:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load(text)
    assert load('ldap_url = "ldaps://dir/ou=people,dc=x"\n').smime.ldap_url
    assert not load("").smime.ldap_url


def test_check_config_connect_binds_and_searches(slapd, tmp_path):
    from seg_fast.checkconfig import check_connect
    from seg_fast.config import load_config

    for pw, ok in ((slapd.password_file, True), (str(tmp_path / "bad.pw"), False)):
        (tmp_path / "bad.pw").write_text("nope\n")
        cfg = tmp_path / "c.toml"
        cfg.write_text(f'[smime]\nldap_url = "{slapd.ldap_url}"\nldap_ca_file = "{slapd.ca_file}"\n'
                       f'ldap_auth = "simple"\nldap_user = "{SERVICE_DN}"\nldap_password_file = "{pw}"\n'
                       f'ldap_base_dn = "{SUFFIX}"\n[timeouts]\nupstream_connect = 0.5\n'
                       f'[upstream]\nurl = "http://127.0.0.1:{free_port()}"\n')
        found = [f for f in trio.run(check_connect, load_config(cfg, env={})) if f.what == "smime.ldap_url"]
        assert len(found) == 1 and found[0].ok is ok, found
        assert ("starttls" in found[0].text) if ok else ("result 49" in found[0].text)


@settings(max_examples=200)
@given(st.lists(st.characters(blacklist_categories=("Cs",)) | st.sampled_from(list("*()\\\x00<>=~&|!@")),
                max_size=60).map("".join))
def test_any_recipient_becomes_one_equality_assertion(value):
    """Whatever the device puts in To, the filter holds it as one literal value (RFC 4515 escaping)."""
    ber = compile_filter(f"(&(objectClass=person)(mail={escape_value(value)}))")
    raw = value.encode("utf-8")

    def tlv(tag, body):
        n = len(body)
        head = bytes([n]) if n < 0x80 else bytes([0x80 | ((n.bit_length() + 7) // 8)]) + n.to_bytes(
            (n.bit_length() + 7) // 8, "big")
        return bytes([tag]) + head + body

    want = tlv(0xA0, tlv(0xA3, tlv(0x04, b"objectClass") + tlv(0x04, b"person"))
               + tlv(0xA3, tlv(0x04, b"mail") + tlv(0x04, raw)))
    assert ber == want


def test_directory_connections_are_bounded_per_worker(hostile, sim):
    """Ten devices at once, each with recipients of its own: at most smime.ldap_max_connections (2)
    connections reach the directory at a time, and every device gets its answer."""
    gw, server = hostile
    end = time.monotonic() + 20
    while server.open and time.monotonic() < end:     # earlier tests' connections wound down
        time.sleep(0.05)
    assert server.open == 0
    server.mode = "hold"
    server.most = 0

    results = []

    async def one(i):
        results.append(await _ask(gw.port, rr_request([f"hold{i}-{k}@seg-fast.test" for k in range(3)]), f"HOLD{i}"))

    async def all_of_them():
        async with trio.open_nursery() as n:
            for i in range(10):
                n.start_soon(one, i)

    trio.run(all_of_them)
    assert len(results) == 10 and all(r.status == 200 for r in results)
    assert server.most == 2, server.most
    server.mode = "empty"


def test_cache_ttl_and_bound(slapd):
    from seg_fast.ldapcerts import CertLookup

    alice = "alice@seg-fast.test"
    lookup = CertLookup(_settings(slapd, cache_ttl=0.3, cache_entries=3))
    assert trio.run(lookup.lookup, [alice])[alice] == slapd.people[alice].certs
    assert trio.run(lookup.lookup, [alice.upper()])[alice] == slapd.people[alice].certs     # same address
    assert lookup.counts["lookups"] == 1 and lookup.counts["cache_hits"] == 1
    end = time.monotonic() + 10
    while lookup.counts["lookups"] == 1 and time.monotonic() < end:                    # past the TTL: asked again
        trio.run(lookup.lookup, [alice])
        time.sleep(0.05)
    assert lookup.counts["lookups"] == 2
    trio.run(lookup.lookup, [f"n{i}@seg-fast.test" for i in range(8)])
    assert len(lookup.cache) <= 3


def test_an_answer_too_big_to_read_passes_untouched_and_nothing_is_looked_up():
    from seg_fast.eas.resolverecipients import MAX_ANSWER_ELEMENTS, CertificateFill
    from seg_fast.proxy.incidents import Incidents

    class Lookup:
        settings = SmimeSettings(ldap_url="ldaps://x", max_lookups_per_request=100)
        calls = 0

        async def lookup(self, emails):
            Lookup.calls += 1
            return {e: () for e in emails}

    def answer(n: int) -> bytes:
        # n copies of one Response, spliced as bytes (building n trees would cost seconds)
        resp = E(NS + "Response", E(NS + "To", "u@x.test"), E(NS + "Status", 1),
                 E(NS + "Recipient", E(NS + "Type", 1), E(NS + "EmailAddress", "u@x.test")))
        one, two = (encode(E(NS + "ResolveRecipients", E(NS + "Status", 1), *[resp] * k)) for k in (1, 2))
        chunk = two[len(one) - 1:-1]
        assert two == one[:-1] + chunk + one[-1:]
        return one[:-1] + chunk * (n - 1) + one[-1:]

    incidents = Incidents(stream=__import__("io").StringIO())
    for n, calls in ((10, 1), (MAX_ANSWER_ELEMENTS // 7 + 1, 1)):   # 10 elements and strings per Response
        fill = CertificateFill(Lookup(), incidents)
        fill.transform_request(None, rr_request(["a@x.test"]))
        body = answer(n)
        assert trio.run(fill.transform_answer_async, None, 200, [], body) == body
        assert Lookup.calls == calls
    assert incidents.counts == {"smime_answer_not_read": 1}


class _Feed:
    """A stream that hands out ``data`` in ``step``-sized reads, then EOF."""

    def __init__(self, data: bytes, step: int):
        self.data, self.step = data, max(1, step)

    async def receive_some(self, n):
        out, self.data = self.data[:self.step], self.data[self.step:]
        return out


def _read_all(data: bytes, step: int) -> None:
    from seg_fast.ldapcerts import LdapError, _Conn, _op_start, _result_code, _values

    d = directory_from(SmimeSettings(ldap_url="ldap://127.0.0.1", ldap_starttls=False))

    async def main():
        conn = _Conn(_Feed(data, step), 4096)
        for _ in range(50):
            mid, op, msg = await conn.receive()
            if op == 0x64:
                _values(msg, d)
            else:
                _result_code(msg, _op_start(msg))

    coro = main()                     # nothing in it really waits: run it without an event loop
    try:
        coro.send(None)
    except StopIteration:
        pass
    except LdapError:
        pass                          # the only way a directory's bytes may fail a lookup
    finally:
        coro.close()


ENTRY = _msg(2, _ber(0x64, _ber(0x04, b"uid=a") + _ber(0x30, _ber(0x30, _ber(0x04, b"userCertificate;binary")
                                                                  + _ber(0x31, _ber(0x04, b"\x30\x03\x02\x01\x01"))))))
DONE = _msg(2, _ber(0x65, _ber(0x0A, b"\x00") + _ber(0x04, b"") + _ber(0x04, b"")))


@settings(max_examples=150)
@given(st.binary(max_size=300), st.integers(1, 64))
def test_any_directory_bytes_fail_only_as_ldap_errors(data, step):
    _read_all(data, step)


@settings(max_examples=150)
@given(st.lists(st.tuples(st.integers(0, len(ENTRY + DONE) - 1), st.integers(0, 255)), min_size=1, max_size=4),
       st.integers(1, 64))
def test_mutated_directory_answers_fail_only_as_ldap_errors(flips, step):
    data = bytearray(ENTRY + DONE)
    for at, value in flips:
        data[at] = value
    _read_all(bytes(data), step)
