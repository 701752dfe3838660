"""EWS for the notification service and webmail passthrough, end to end.

A running `seg-fast serve` (proxy/passthrough.py) in front of the mailbox simulator
(`seg-fast sim`, whose sim/webapps.py answers EWS SOAP and an OWA-like login). Every
route is also attacked: path tricks aimed at ActiveSync, a disallowed source address, a
user the user policy blocks, request smuggling, a slow body, a huge head, a device that
does not read. What reached the simulator is read back from it (GET /sim/web-log, its
EAS answer counts), so "refused" means the mail server never saw the request.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import xml.etree.ElementTree as ET

import h11
import pytest

from processes import REPO, start_serve, stop_process, wait_listening
from redis_server import free_port

PASSWORD = "pw-ews"
ADMIN_TOKEN = "adm-ews"
EXTERNAL = "https://mail.example.com"
DEADLINE = 1.5                        # timeouts.request_head / request_body / device_write here
EWS = "/EWS/Exchange.asmx"
SOAP = "http://schemas.xmlsoap.org/soap/envelope/"
M = "http://schemas.microsoft.com/exchange/services/2006/messages"
T = "http://schemas.microsoft.com/exchange/services/2006/types"
# The user policy blocks mallory; everyone else may pass. The device policy would refuse
# every device (managed devices only, none enrolled): EWS must not depend on it.
POLICIES = {"policies": {"general": {"managed_device_only": True,
                                     "user": {"enabled": True, "mode": "block", "values": ["mallory"]}}}}


def _auth(user: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{PASSWORD}".encode()).decode()


class Env:
    def __init__(self, proc, port: int, sim, sim_port: int, tx_log):
        self.proc, self.port, self.sim, self.sim_port, self.tx_log = proc, port, sim, sim_port, tx_log
        self.stderr: list[str] = []
        threading.Thread(target=self._read_stderr, daemon=True).start()

    def _read_stderr(self) -> None:
        for line in self.proc.stderr:
            self.stderr.append(line.decode("utf-8", "replace"))

    def sim_get(self, path: str):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.sim_port}{path}", timeout=20) as r:
            return json.loads(r.read())

    def sim_post(self, path: str):
        req = urllib.request.Request(f"http://127.0.0.1:{self.sim_port}{path}", data=b"", method="POST")
        with urllib.request.urlopen(req, timeout=20) as r:
            return json.loads(r.read())

    def web_log(self) -> list[dict]:
        return self.sim_get("/sim/web-log")

    def incidents(self, kind: str) -> list[dict]:
        return [json.loads(line) for line in list(self.stderr)
                if line.startswith("{") and f'"incident":"{kind}"' in line]

    def records(self) -> list[dict]:
        """The transaction log's lines (flushed by the worker once a second)."""
        try:
            return [json.loads(line) for line in self.tx_log.read_text().splitlines() if line]
        except FileNotFoundError:
            return []

    def unharmed(self) -> None:
        assert self.proc.poll() is None
        assert not any("Traceback" in line or "exited with" in line for line in self.stderr), \
            "".join(self.stderr)[-3000:]
        status, _, body = ews(self, "jdoe", subscribe_body())
        assert status == 200 and b"NoError" in body


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ews")
    pyenv = {**os.environ, "PYTHONPATH": str(REPO / "src"), "SEG_FAST_STATE_DIR": str(tmp / "state")}
    sim = subprocess.Popen([sys.executable, "-m", "seg_fast", "sim", "--port", "0", "--no-provisioning",
                            "--password", PASSWORD], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                           cwd=tmp, env=pyenv)
    try:
        sim_port = json.loads(sim.stdout.readline())["sim_port"]
        port, admin_port = free_port(), free_port()
        cfg = tmp / "gw.toml"
        tx_log = tmp / "tx.log"
        cfg.write_text(
            f'workers = 1\n'
            f'[listener]\nhost = "127.0.0.1"\nport = {port}\nexternal_url = "{EXTERNAL}"\n'
            f'[upstream]\nurl = "http://127.0.0.1:{sim_port}"\n'
            f'[admin]\nport = {admin_port}\ntoken = "{ADMIN_TOKEN}"\n'
            f'[log]\ntransactions = "{tx_log}"\n'
            f'[timeouts]\nrequest_head = {DEADLINE}\nrequest_body = {DEADLINE}\ndevice_write = {DEADLINE}\n'
            f'[ews]\nenabled = true\nallowed_sources = ["127.0.0.1/32"]\n'
            f'[webmail]\nenabled = true\n')
        policies = tmp / "policies.json"
        policies.write_text(json.dumps(POLICIES))
        subprocess.run([sys.executable, "-m", "seg_fast", "policy", "--config", str(cfg), "load", str(policies)],
                       check=True, cwd=tmp, env=pyenv, stdout=subprocess.DEVNULL)
        proc = start_serve(cfg, tmp)
        try:
            wait_listening(port, proc)
            e = Env(proc, port, sim, sim_port, tx_log)
            e.admin_port, e.cfg = admin_port, cfg
            yield e
        finally:
            stop_process(proc)
    finally:
        stop_process(sim)


# -- a raw client -----------------------------------------------------------------------------

def exchange(port: int, data: bytes, bound: float = 30.0, source: str | None = None,
             rcvbuf: int | None = None) -> bytes:
    """Send ``data``, close our side, read until the gateway closes (within ``bound``)."""
    s = socket.socket()
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    if source:
        s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    s.settimeout(bound)
    try:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    out = b""
    end = time.monotonic() + bound
    try:
        while time.monotonic() < end:
            chunk = s.recv(65536)
            if not chunk:
                return out
            out += chunk
    except ConnectionResetError:
        return out
    finally:
        s.close()
    raise AssertionError(f"gateway kept the connection open past {bound} s")


def answers(raw: bytes, method: str = "POST") -> list[tuple[h11.Response, bytes]]:
    """The answers in ``raw`` as h11 (the independent reader) parses them."""
    conn = h11.Connection(h11.CLIENT)
    conn.receive_data(raw)
    conn.receive_data(b"")
    out, resp, body = [], None, bytearray()
    while True:
        if conn.our_state is h11.IDLE:
            conn.send(h11.Request(method=method, target="/", headers=[("Host", "x"), ("Content-Length", "0")]))
            conn.send(h11.EndOfMessage())
        try:
            ev = conn.next_event()
        except h11.RemoteProtocolError:
            return out
        if isinstance(ev, h11.Response):
            resp, body = ev, bytearray()
        elif isinstance(ev, h11.Data):
            body += ev.data
        elif isinstance(ev, h11.EndOfMessage):
            out.append((resp, bytes(body)))
            if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                conn.start_next_cycle()
            else:
                return out
        else:
            return out


def request(port: int, method: str, target: str, headers: dict[str, str] | None = None, body: bytes = b"",
            source: str | None = None) -> tuple[int, dict[str, list[str]], bytes]:
    head = f"{method} {target} HTTP/1.1\r\nHost: mail.example.com\r\nConnection: close\r\n"
    for k, v in (headers or {}).items():
        head += f"{k}: {v}\r\n"
    if body or method == "POST":
        head += f"Content-Length: {len(body)}\r\n"
    got = answers(exchange(port, head.encode() + b"\r\n" + body, source=source), method)
    assert len(got) == 1, got
    resp, data = got[0]
    hdrs: dict[str, list[str]] = {}
    for k, v in resp.headers:
        hdrs.setdefault(k.decode().lower(), []).append(v.decode("latin-1"))
    return resp.status_code, hdrs, data


def soap(inner: str) -> bytes:
    return (f'<?xml version="1.0" encoding="utf-8"?><soap:Envelope xmlns:soap="{SOAP}" xmlns:m="{M}" '
            f'xmlns:t="{T}"><soap:Body>{inner}</soap:Body></soap:Envelope>').encode()


def subscribe_body() -> bytes:
    return soap('<m:Subscribe><m:PullSubscriptionRequest><t:FolderIds><t:DistinguishedFolderId Id="inbox"/>'
                '</t:FolderIds><t:EventTypes><t:EventType>NewMailEvent</t:EventType></t:EventTypes>'
                '<t:Timeout>10</t:Timeout></m:PullSubscriptionRequest></m:Subscribe>')


def ews(env, user: str, body: bytes, source: str | None = None, target: str = EWS):
    return request(env.port, "POST", target, {"Authorization": _auth(user), "Content-Type": "text/xml"}, body,
                   source=source)


def _message(body: bytes, op: str) -> ET.Element:
    root = ET.fromstring(body)
    msg = root.find(f"{{{SOAP}}}Body/{{{M}}}{op}Response/{{{M}}}ResponseMessages/{{{M}}}{op}ResponseMessage")
    assert msg is not None, body[:500]
    return msg


def _eas_folder_syncs(env) -> int:
    return env.sim_get("/sim/stats")["answers"].get("FolderSync", 0)


def _seen_by_sim(env, needle: str) -> bool:
    return any(needle in entry["target"] for entry in env.web_log())


def _wait_for(pred, bound: float = 20.0):
    end = time.monotonic() + bound
    while time.monotonic() < end:
        value = pred()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


# -- EWS ----------------------------------------------------------------------------------------

def test_ews_pull_notifications_reach_the_mail_server_and_come_back(env):
    status, hdrs, body = ews(env, "jdoe", subscribe_body())
    assert status == 200, body
    msg = _message(body, "Subscribe")
    assert msg.get("ResponseClass") == "Success"
    sid = msg.findtext(f"{{{M}}}SubscriptionId")
    mark = msg.findtext(f"{{{M}}}Watermark")
    assert sid and mark
    delivered = env.sim_post("/sim/deliver?user=jdoe&count=2")["delivered"]
    assert delivered == 2
    get = soap(f"<m:GetEvents><m:SubscriptionId>{sid}</m:SubscriptionId><m:Watermark>{mark}</m:Watermark>"
               "</m:GetEvents>")
    status, _, body = ews(env, "jdoe", get)
    assert status == 200
    msg = _message(body, "GetEvents")
    assert msg.findtext(f"{{{M}}}ResponseCode") == "NoError"
    events = msg.findall(f"{{{M}}}Notification/{{{T}}}NewMailEvent")
    assert len(events) == 2
    # The simulator saw the request as sent: the SOAP body byte for byte, the credential passed on.
    entry = [e for e in env.web_log() if e["target"] == EWS][-1]
    assert entry["body_sha256"] == hashlib.sha256(get).hexdigest()
    names = {k for k, _ in entry["headers"]}
    assert "authorization" in names and "x-forwarded-for" in names
    # Its own area of the transaction log: a record per EWS request, with the credential's user.
    recs = _wait_for(lambda: [r for r in env.records() if r.get("command") == "EWS" and r.get("user") == "jdoe"
                              and r.get("status") == 200])
    assert recs[-1]["decision"] == "allowed.ews"
    assert "Authorization" not in env.tx_log.read_text() and PASSWORD not in env.tx_log.read_text()


def test_ews_wrong_password_gets_the_mail_servers_401(env):
    status, hdrs, _ = request(env.port, "POST", EWS,
                              {"Authorization": "Basic " + base64.b64encode(b"jdoe:wrong").decode()},
                              subscribe_body())
    assert status == 401 and "www-authenticate" in hdrs


def test_a_user_the_user_policy_blocks_is_refused_403_before_the_mail_server(env):
    before = len(env.web_log())
    status, _, _ = ews(env, "mallory", subscribe_body())
    assert status == 403
    # DOMAIN\user and user@domain name the same person (the credential's user, not a claim).
    status, _, _ = ews(env, "CORP\\Mallory", subscribe_body())
    assert status == 403
    assert len(env.web_log()) == before
    rec = _wait_for(lambda: [r for r in env.records() if r.get("user") == "mallory" and r.get("command") == "EWS"])
    assert rec[-1]["decision"] == "blocked.user" and rec[-1]["status"] == 403


def test_ews_without_a_credential_user_is_refused_when_the_user_policy_needs_one(env):
    # policy.user_without_credential defaults to "refuse": a Kerberos/absent credential
    # names no user, and the user policy is on.
    status, _, _ = request(env.port, "POST", EWS, {"Content-Type": "text/xml"}, subscribe_body())
    assert status == 403


def test_a_source_address_outside_the_allow_list_is_refused(env):
    before = len(env.web_log())
    status, _, _ = ews(env, "jdoe", subscribe_body(), source="127.0.0.3")
    assert status == 403
    assert len(env.web_log()) == before
    # X-Forwarded-For from an untrusted peer does not make it an allowed source either.
    status, _, _ = request(env.port, "POST", EWS, {"Authorization": _auth("jdoe"), "X-Forwarded-For": "127.0.0.1"},
                           subscribe_body(), source="127.0.0.3")
    assert status == 403
    # The allow-list is EWS's: webmail from that address is served.
    status, _, _ = request(env.port, "GET", "/owa/", source="127.0.0.3")
    assert status == 302


@pytest.mark.parametrize("target,expect", [
    ("/EWS/../Microsoft-Server-ActiveSync", {404}),
    ("/EWS/Exchange.asmx/../../Microsoft-Server-ActiveSync", {400}),
    ("/ews/exchange.asmx%2f..%2f..%2fMicrosoft-Server-ActiveSync", {400}),
    ("/ews/exchange.asmx%2f..", {400}),
    ("/EWS/Exchange.asmx/..%2f..%2fMicrosoft-Server-ActiveSync", {400}),
    ("/owa/../Microsoft-Server-ActiveSync", {400}),
    ("/owa/%2e%2e/Microsoft-Server-ActiveSync", {400}),
    ("/owa/..;/Microsoft-Server-ActiveSync", {400}),
    ("/owa/..\\Microsoft-Server-ActiveSync", {400}),
    ("/owa//../Microsoft-Server-ActiveSync", {400}),
    ("/owa/%252e%252e/Microsoft-Server-ActiveSync", {400}),
    ("/owa/%c0%ae%c0%ae/Microsoft-Server-ActiveSync", {400}),
    ("/ecp/./../Microsoft-Server-ActiveSync", {400}),
    ("/ews/exchange.asmxx", {404}),
])
def test_path_tricks_never_reach_activesync_past_its_policy(env, target, expect):
    # mallory is blocked by the user policy (and every device by the device policy):
    # a FolderSync reaching the simulator by any spelling would be a policy bypass.
    before = _eas_folder_syncs(env)
    query = "?Cmd=FolderSync&User=mallory&DeviceId=TRICK1&DeviceType=iPhone"
    status, _, _ = request(env.port, "POST", target + query,
                           {"Authorization": _auth("mallory"), "MS-ASProtocolVersion": "14.1",
                            "Content-Type": "application/vnd.ms-sync.wbxml"}, b"\x03\x01\x6a\x00")
    assert status in expect
    assert _eas_folder_syncs(env) == before
    assert not _seen_by_sim(env, "TRICK1")


def test_activesync_itself_still_applies_its_policy(env):
    # The control for the path tricks: the straight EAS path is refused for this device,
    # by the EAS policy (not forwarded).
    before = _eas_folder_syncs(env)
    status, _, _ = request(env.port, "POST",
                           "/Microsoft-Server-ActiveSync?Cmd=FolderSync&User=jdoe&DeviceId=CTRL1&DeviceType=iPhone",
                           {"Authorization": _auth("jdoe"), "MS-ASProtocolVersion": "14.1",
                            "User-Agent": "Apple-iPhone/1.0",
                            "Content-Type": "application/vnd.ms-sync.wbxml"}, b"\x03\x01\x6a\x00")
    assert status != 404
    assert _eas_folder_syncs(env) == before


def test_request_smuggling_content_length_beside_chunked_is_framed_by_chunked_and_closed(env):
    body = subscribe_body()
    smuggled = (f"POST {EWS} HTTP/1.1\r\nHost: x\r\nAuthorization: {_auth('mallory')}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    chunked = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
    head = (f"POST {EWS} HTTP/1.1\r\nHost: x\r\nAuthorization: {_auth('jdoe')}\r\n"
            f"Content-Length: {len(chunked) + len(smuggled)}\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
    raw = exchange(env.port, head + chunked + smuggled)
    got = answers(raw)
    # One answer (the chunked request's), then the connection closed: the bytes that the
    # Content-Length would have covered are never read as a request.
    assert [r.status_code for r, _ in got] == [200]
    assert (b"connection", b"close") in [(k.lower(), v.lower()) for k, v in got[0][0].headers]
    entry = [e for e in env.web_log() if e["target"] == EWS][-1]
    names = [k for k, _ in entry["headers"]]
    assert names.count("transfer-encoding") + names.count("content-length") == 1
    assert entry["body_sha256"] == hashlib.sha256(body).hexdigest()


def _trickle(port: int, head: bytes, bound: float = 20.0) -> bytes:
    s = socket.create_connection(("127.0.0.1", port))
    s.settimeout(0.2)
    out = b""
    end = time.monotonic() + bound
    try:
        s.sendall(head)
        while time.monotonic() < end:
            try:
                s.sendall(b"x")
            except OSError:
                break
            try:
                chunk = s.recv(65536)
                if not chunk:
                    break
                out += chunk
            except socket.timeout:
                continue
            except ConnectionResetError:
                break
        else:
            raise AssertionError("a slow body was not cut")
    finally:
        s.close()
    return out


@pytest.mark.parametrize("length", [1000, 200_000])    # read whole / streamed to the mail server
def test_a_slow_body_is_cut_at_the_body_deadline(env, length):
    before = len(env.web_log())
    head = (f"POST {EWS} HTTP/1.1\r\nHost: x\r\nAuthorization: {_auth('jdoe')}\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()
    raw = _trickle(env.port, head)
    assert [r.status_code for r, _ in answers(raw)] == [408]
    if length <= 64 * 1024:
        assert len(env.web_log()) == before      # read whole first: the mail server saw nothing
    env.unharmed()


def test_a_slow_head_is_cut_at_the_head_deadline(env):
    raw = _trickle(env.port, f"POST {EWS} HTTP/1.1\r\nHost: x\r\nX-Slow: ".encode())
    assert [r.status_code for r, _ in answers(raw)] == [408]


def test_a_huge_head_is_refused_431(env):
    head = (f"POST {EWS} HTTP/1.1\r\nHost: x\r\nAuthorization: {_auth('jdoe')}\r\n").encode()
    head += b"".join(b"X-Pad-%d: %s\r\n" % (i, b"p" * 1000) for i in range(80)) + b"Content-Length: 0\r\n\r\n"
    before = len(env.web_log())
    assert [r.status_code for r, _ in answers(exchange(env.port, head))] == [431]
    assert len(env.web_log()) == before


def test_a_device_that_does_not_read_is_cut_at_the_write_deadline(env):
    # 8 MB echoed by the webmail endpoint; the client reads nothing (a small receive buffer).
    payload = os.urandom(8 * 1024 * 1024)
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", env.port))
    try:
        s.sendall(f"POST /owa/echo HTTP/1.1\r\nHost: x\r\nContent-Length: {len(payload)}\r\n\r\n".encode() + payload)
        _wait_for(lambda: env.incidents("device_write_timeout") or env.incidents("device_write_evicted"), 30)
    finally:
        s.close()
    env.unharmed()


# -- webmail ------------------------------------------------------------------------------------

def test_webmail_login_redirects_and_cookies_name_the_gateway(env):
    status, hdrs, _ = request(env.port, "GET", "/owa/")
    assert status == 302
    # The simulator redirected to itself (its Host header: the mail server's name and port).
    location = hdrs["location"][0]
    assert location.startswith(EXTERNAL + "/owa/auth/logon.aspx?"), location
    status, _, page = request(env.port, "GET", location[len(EXTERNAL):])
    assert status == 200 and b"<form" in page
    form = f"username=jdoe&password={PASSWORD}&destination=http%3A%2F%2F127.0.0.1%3A{env.sim_port}%2Fowa%2F"
    status, hdrs, _ = request(env.port, "POST", "/owa/auth.owa",
                              {"Content-Type": "application/x-www-form-urlencoded"}, form.encode())
    assert status == 302
    assert hdrs["location"] == [EXTERNAL + "/owa/"]
    cookies = hdrs["set-cookie"]
    session = next(c for c in cookies if c.startswith("cadata="))
    assert "Domain=mail.example.com" in session and "path=/" in session and "HttpOnly" in session
    assert "127.0.0.1" not in session
    assert "PrivateComputer=true; path=/" in cookies          # no Domain: left as it was
    token = session.split(";", 1)[0]
    status, _, page = request(env.port, "GET", "/owa/", {"Cookie": token})
    assert status == 200 and b"owa: jdoe" in page
    status, _, page = request(env.port, "GET", "/ecp/", {"Cookie": token})
    assert status == 200 and b"ecp: jdoe" in page
    rec = _wait_for(lambda: [r for r in env.records() if r.get("command") == "webmail" and r.get("status") == 200])
    assert rec[-1]["decision"] == "allowed.webmail"
    assert token.split("=", 1)[1] not in env.tx_log.read_text()


def test_webmail_bodies_pass_untouched_both_ways(env):
    payload = os.urandom(3 * 1024 * 1024 + 17)    # past the read-whole size: streamed
    status, hdrs, body = request(env.port, "POST", "/owa/echo", {"Content-Type": "application/octet-stream"}, payload)
    assert status == 200
    assert hdrs["x-sim-body-sha256"] == [hashlib.sha256(payload).hexdigest()]
    assert body == payload


def test_paths_outside_the_prefixes_are_not_forwarded(env):
    before = len(env.web_log())
    for target in ("/owa", "/OWAx/", "/autodiscover/autodiscover.xml", "/ecp"):
        status, _, _ = request(env.port, "GET", target)
        assert status == 404, target
    assert len(env.web_log()) == before


def test_prefixes_match_case_insensitively_and_forward_the_target_as_sent(env):
    status, _, _ = request(env.port, "GET", "/OWA/Auth/Logon.aspx?x=%20y")
    assert status == 200
    assert env.web_log()[-1]["target"] == "/OWA/Auth/Logon.aspx?x=%20y"


def test_connect_and_absolute_form_targets_are_not_forwarded(env):
    before = len(env.web_log())
    raw = exchange(env.port, b"GET http://127.0.0.1/owa/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert [r.status_code for r, _ in answers(raw, "GET")] == [404]
    assert len(env.web_log()) == before


# -- the transaction log areas ---------------------------------------------------------------------

def _set_levels(env, levels: dict) -> None:
    req = urllib.request.Request(f"http://127.0.0.1:{env.admin_port}/seg/logging", method="PUT",
                                 data=json.dumps(levels).encode(),
                                 headers={"Authorization": f"Bearer {ADMIN_TOKEN}",
                                          "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=20) as r:
        assert r.status == 200
        assert json.loads(r.read())[next(iter(levels))] == next(iter(levels.values()))


def test_ews_records_have_their_own_logging_area(env):
    """transactions_ews off: no EWS records while webmail's are still written; on again: back."""
    def probe(tag: str) -> bool:
        """Whether an EWS request was written: one as user ews-<tag>, then a webmail request as
        web-<tag>; once the webmail record is in the log (flushed), so is the EWS one if written."""
        assert ews(env, f"ews-{tag}", subscribe_body())[0] == 200
        assert request(env.port, "GET", "/owa/auth/logon.aspx", {"Authorization": _auth(f"web-{tag}")})[0] == 200

        def users():
            found = {r.get("user") for r in env.records()}
            return found if f"web-{tag}" in found else None
        return f"ews-{tag}" in _wait_for(users)

    _set_levels(env, {"transactions_ews": "off"})
    try:
        # The worker follows the store within a second: probe until a probe goes unwritten.
        end, i = time.monotonic() + 20, 0
        while probe(f"a{i}"):
            assert time.monotonic() < end, "transactions_ews off did not stop the EWS records"
            i += 1
        assert not probe("b0") and not probe("b1")
    finally:
        _set_levels(env, {"transactions_ews": "info"})
    end, i = time.monotonic() + 20, 0
    while not probe(f"c{i}"):
        assert time.monotonic() < end, "transactions_ews back on did not bring the EWS records back"
        i += 1


def test_check_config_connect_reaches_the_ews_and_webmail_urls(env):
    out = subprocess.run([sys.executable, "-m", "seg_fast", "check-config", "--config", str(env.cfg), "--connect"],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(REPO / "src"),
                              "SEG_FAST_STATE_DIR": str(env.cfg.parent / "state")}).stdout
    base = f"http://127.0.0.1:{env.sim_port}"
    # The simulator's own answers: EWS asks for credentials, webmail redirects to its login page.
    assert f"ok    ews.url: {base}/EWS/Exchange.asmx: HTTP 401" in out, out
    assert f"ok    webmail.url: {base}/owa/: HTTP 302" in out, out


# -- HTTP details ---------------------------------------------------------------------------------

def test_expect_100_continue_is_answered_then_the_body_forwarded(env):
    body = subscribe_body()
    s = socket.create_connection(("127.0.0.1", env.port), timeout=20)
    try:
        s.sendall((f"POST {EWS} HTTP/1.1\r\nHost: x\r\nAuthorization: {_auth('jdoe')}\r\n"
                   f"Expect: 100-continue\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode())
        first = s.recv(65536)
        assert first.startswith(b"HTTP/1.1 100 ")        # before any body byte was sent
        s.sendall(body)
        raw = first
        while chunk := s.recv(65536):
            raw += chunk
    finally:
        s.close()
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="POST", target="/", headers=[("Host", "x"), ("Expect", "100-continue"),
                                                              ("Content-Length", str(len(body)))]))
    conn.receive_data(raw)
    events = []
    while (ev := conn.next_event()) is not h11.NEED_DATA and not isinstance(ev, h11.EndOfMessage):
        events.append(ev)
    assert [type(e) for e in events][:2] == [h11.InformationalResponse, h11.Response]
    assert events[1].status_code == 200
    entry = [e for e in env.web_log() if e["target"] == EWS][-1]
    assert "expect" not in [k for k, _ in entry["headers"]]    # the gateway answered it itself


def test_head_gets_the_mail_servers_head_and_no_body(env):
    raw = exchange(env.port, b"HEAD /owa/auth/logon.aspx HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    (resp, body), = answers(raw, "HEAD")
    assert resp.status_code == 200 and body == b""
    assert env.web_log()[-1]["method"] == "HEAD"


def test_reload_turns_a_route_off_and_on_without_a_restart(env):
    """SIGHUP with [ews] enabled = false, then back (the passthrough is rebuilt per config)."""
    import signal

    original = env.cfg.read_text()
    pid = env.proc.pid
    try:
        env.cfg.write_text(original.replace("[ews]\nenabled = true", "[ews]\nenabled = false"))
        os.kill(pid, signal.SIGHUP)
        _wait_for(lambda: ews(env, "jdoe", subscribe_body())[0] == 404)
        assert request(env.port, "GET", "/owa/")[0] == 302            # webmail's switch is its own
    finally:
        env.cfg.write_text(original)
        os.kill(pid, signal.SIGHUP)
    _wait_for(lambda: ews(env, "jdoe", subscribe_body())[0] == 200)


def test_pipelined_requests_across_routes_are_answered_in_order(env):
    body = subscribe_body()
    ews_req = (f"POST {EWS} HTTP/1.1\r\nHost: x\r\nAuthorization: {_auth('jdoe')}\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    eas_req = (f"POST /Microsoft-Server-ActiveSync?Cmd=FolderSync&User=jdoe&DeviceId=PIPE1&DeviceType=iPhone "
               f"HTTP/1.1\r\nHost: x\r\nAuthorization: {_auth('jdoe')}\r\nMS-ASProtocolVersion: 14.1\r\n"
               f"Content-Length: 4\r\n\r\n").encode() + b"\x03\x01\x6a\x00"
    web_req = b"GET /owa/auth/logon.aspx HTTP/1.1\r\nHost: x\r\n\r\n"
    last = b"GET /owa/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    got = answers(exchange(env.port, ews_req + eas_req + web_req + ews_req + last))
    statuses = [r.status_code for r, _ in got]
    assert len(statuses) == 5 and statuses[0] == 200 and statuses[2:] == [200, 200, 302], statuses
    assert b"SubscribeResponse" in got[0][1] and b"SubscribeResponse" in got[3][1] and b"<form" in got[2][1]


def test_http_1_0_is_answered_and_closed(env):
    raw = exchange(env.port, b"GET /owa/auth/logon.aspx HTTP/1.0\r\nHost: x\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 200 ") and raw.endswith(b"</form>")
