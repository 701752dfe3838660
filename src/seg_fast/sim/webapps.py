"""The simulator's web endpoints beside ActiveSync: a minimal EWS and an OWA-like webmail.

- ``POST /EWS/Exchange.asmx`` (Basic auth, the simulator's password): SOAP 1.1 in the
  MS-EWS shapes for pull notifications, over the same mailboxes ActiveSync serves:
  ``Subscribe`` (a ``PullSubscriptionRequest``) answers a SubscriptionId and a Watermark;
  ``GetEvents`` answers a ``NewMailEvent`` per Inbox item delivered since the watermark
  (``MailboxSimulator.deliver``), else a ``StatusEvent``. An unknown subscription is
  ``ErrorSubscriptionNotFound``; any other operation a SOAP fault (500).
- ``/owa/`` and ``/ecp/``: without a session cookie, a redirect to
  ``/owa/auth/logon.aspx`` (absolute, built from the Host header, as Exchange does);
  ``POST /owa/auth.owa`` (form: username, password, destination) sets the session cookie
  (``Domain`` = the Host's name, as a server that knows its own name would) and redirects
  to the destination; with the cookie, a small page naming the user.
  ``POST /owa/echo`` answers the request body (with its SHA-256 in a header).
- ``GET /sim/web-log``: what these endpoints received (method, target, headers without
  Authorization or Cookie values, body length and SHA-256), newest last, as JSON.

Used through ``mailbox.py``'s dispatch (``handles`` / ``answer``): sans-IO like the
EAS commands.
"""
from __future__ import annotations

import base64
import binascii
import collections
import hashlib
import json
import secrets
import xml.etree.ElementTree as ET
from urllib.parse import parse_qs, quote

from seg_fast.sim.commands import Answer
from seg_fast.sim.state import INBOX

SOAP = "http://schemas.xmlsoap.org/soap/envelope/"
M = "http://schemas.microsoft.com/exchange/services/2006/messages"
T = "http://schemas.microsoft.com/exchange/services/2006/types"
EWS_PATH = "/ews/exchange.asmx"
WEB_PREFIXES = ("/owa/", "/ecp/")
LOG_PATH = "/sim/web-log"
SESSION_COOKIE = "cadata"
XML = [(b"content-type", b"text/xml; charset=utf-8")]
HTML = [(b"content-type", b"text/html; charset=utf-8")]
MAX_LOG = 1000


def handles(target: bytes) -> bool:
    """Whether a request is for these endpoints (checked before the EAS dispatch)."""
    low = target.split(b"?", 1)[0].lower().decode("latin-1")
    return low == EWS_PATH or low.startswith(WEB_PREFIXES) or low == LOG_PATH


class WebState:
    """Pull subscriptions and webmail sessions of one simulator, and what it received."""

    def __init__(self):
        self.subscriptions: dict[str, tuple[str, int]] = {}    # id -> (user, last Inbox item number seen)
        self.sessions: dict[str, str] = {}                      # cookie value -> user
        self.log: collections.deque = collections.deque(maxlen=MAX_LOG)


def state_of(sim) -> WebState:
    web = getattr(sim, "web", None)
    if web is None:
        web = sim.web = WebState()
    return web


def answer(sim, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes) -> Answer:
    """The answer to one request ``handles`` accepted; ``headers`` are (lower-case name, value)."""
    web = state_of(sim)
    path, _, query = target.decode("latin-1").partition("?")
    low = path.lower()
    if low == LOG_PATH:
        return Answer(200, [(b"content-type", b"application/json")], json.dumps(list(web.log)).encode())
    hdr = {k.decode("latin-1"): v.decode("latin-1") for k, v in headers}
    web.log.append({"method": method.decode("latin-1"), "target": target.decode("latin-1"),
                    "headers": [[k.decode("latin-1"), "(kept)" if k in (b"authorization", b"cookie")
                                 else v.decode("latin-1")] for k, v in headers],
                    "body_len": len(body), "body_sha256": hashlib.sha256(body).hexdigest()})
    if low == EWS_PATH:
        return _ews(sim, web, method, hdr, body)
    if method == b"HEAD":                   # the GET's status and headers, no body
        got = _webmail(sim, web, b"GET", low, query, hdr, body)
        return Answer(got.status, got.headers, b"")
    return _webmail(sim, web, method, low, query, hdr, body)


# -- EWS --------------------------------------------------------------------------------------

def _ews(sim, web: WebState, method: bytes, hdr: dict, body: bytes) -> Answer:
    user = sim._authenticate(hdr.get("authorization"))
    if user is None:
        return Answer(401, [(b"www-authenticate", b"Negotiate" if sim.negotiate is not None
                             else b'Basic realm="seg-fast sim"')], b"")
    if method != b"POST":
        return Answer(405, [(b"allow", b"POST")], b"")
    try:
        root = ET.fromstring(body)
    except ET.ParseError:
        return _fault("request is not XML")
    op = root.find(f"{{{SOAP}}}Body/*")
    if op is None:
        return _fault("no operation in the SOAP body")
    if op.tag == f"{{{M}}}Subscribe":
        return _subscribe(sim, web, user, op)
    if op.tag == f"{{{M}}}GetEvents":
        return _get_events(sim, web, user, op)
    return _fault(f"operation {op.tag.rpartition('}')[2]} is not simulated")


def _inbox_numbers(sim, user: str) -> list[int]:
    items = sim.mailbox(user).folders.get(INBOX, {})
    return sorted(int(sid.partition(":")[2]) for sid in items)


def _watermark(user: str, n: int) -> str:
    return base64.b64encode(f"{user}:{n}".encode()).decode()


def _subscribe(sim, web: WebState, user: str, op) -> Answer:
    pull = op.find(f"{{{M}}}PullSubscriptionRequest")
    if pull is None:
        return _message("Subscribe", "Error", "ErrorInvalidSubscriptionRequest")
    numbers = _inbox_numbers(sim, user)
    last = numbers[-1] if numbers else 0
    sid = secrets.token_urlsafe(16)
    web.subscriptions[sid] = (user, last)
    return _message("Subscribe", "Success", "NoError",
                    f"<m:SubscriptionId>{sid}</m:SubscriptionId><m:Watermark>{_watermark(user, last)}</m:Watermark>")


def _get_events(sim, web: WebState, user: str, op) -> Answer:
    sid = (op.findtext(f"{{{M}}}SubscriptionId") or "").strip()
    mark = (op.findtext(f"{{{M}}}Watermark") or "").strip()
    sub = web.subscriptions.get(sid)
    if sub is None or sub[0] != user:
        return _message("GetEvents", "Error", "ErrorSubscriptionNotFound")
    try:
        owner, _, n = base64.b64decode(mark, validate=True).decode().rpartition(":")
        since = int(n)
    except (binascii.Error, ValueError):
        return _message("GetEvents", "Error", "ErrorInvalidWatermark")
    if owner != user:
        return _message("GetEvents", "Error", "ErrorInvalidWatermark")
    new = [n for n in _inbox_numbers(sim, user) if n > since]
    events = []
    for n in new:
        events.append(f"<t:NewMailEvent><t:Watermark>{_watermark(user, n)}</t:Watermark>"
                      f"<t:TimeStamp>2026-01-01T00:00:00Z</t:TimeStamp>"
                      f'<t:ItemId Id="{INBOX}:{n}" ChangeKey="CQAAAA=="/>'
                      f'<t:ParentFolderId Id="{INBOX}" ChangeKey="AQAAAA=="/></t:NewMailEvent>')
    last = new[-1] if new else since
    if not events:
        events.append(f"<t:StatusEvent><t:Watermark>{_watermark(user, last)}</t:Watermark></t:StatusEvent>")
    web.subscriptions[sid] = (user, last)
    notification = (f"<m:Notification><t:SubscriptionId>{sid}</t:SubscriptionId>"
                    f"<t:PreviousWatermark>{mark}</t:PreviousWatermark><t:MoreEvents>false</t:MoreEvents>"
                    + "".join(events) + "</m:Notification>")
    return _message("GetEvents", "Success", "NoError", notification)


def _message(op: str, klass: str, code: str, inner: str = "") -> Answer:
    body = (f'<?xml version="1.0" encoding="utf-8"?>'
            f'<s:Envelope xmlns:s="{SOAP}"><s:Header>'
            f'<h:ServerVersionInfo xmlns:h="{T}" MajorVersion="15" MinorVersion="2" MajorBuildNumber="1118" '
            f'MinorBuildNumber="7" Version="V2017_07_11"/></s:Header><s:Body>'
            f'<m:{op}Response xmlns:m="{M}" xmlns:t="{T}"><m:ResponseMessages>'
            f'<m:{op}ResponseMessage ResponseClass="{klass}"><m:ResponseCode>{code}</m:ResponseCode>{inner}'
            f'</m:{op}ResponseMessage></m:ResponseMessages></m:{op}Response></s:Body></s:Envelope>')
    return Answer(200, XML, body.encode())


def _fault(text: str) -> Answer:
    body = (f'<?xml version="1.0" encoding="utf-8"?><s:Envelope xmlns:s="{SOAP}"><s:Body><s:Fault>'
            f'<faultcode>s:Client</faultcode><faultstring>{text}</faultstring></s:Fault></s:Body></s:Envelope>')
    return Answer(500, XML, body.encode())


# -- webmail ----------------------------------------------------------------------------------

def _host(hdr: dict) -> str:
    return hdr.get("host", "localhost")


def _session_user(web: WebState, hdr: dict) -> str | None:
    for part in hdr.get("cookie", "").split(";"):
        name, _, value = part.strip().partition("=")
        if name == SESSION_COOKIE and value in web.sessions:
            return web.sessions[value]
    return None


def _webmail(sim, web: WebState, method: bytes, low: str, query: str, hdr: dict, body: bytes) -> Answer:
    base = f"http://{_host(hdr)}"
    if low == "/owa/echo" and method == b"POST":
        return Answer(200, [(b"content-type", b"application/octet-stream"),
                            (b"x-sim-body-sha256", hashlib.sha256(body).hexdigest().encode())], body)
    if low == "/owa/auth/logon.aspx":
        return Answer(200, HTML, b'<form method="post" action="/owa/auth.owa">'
                                 b'<input name="username"><input name="password" type="password">'
                                 b'<input type="hidden" name="destination"></form>')
    if low == "/owa/auth.owa" and method == b"POST":
        form = {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}
        user, password = form.get("username", ""), form.get("password", "")
        if not user or password != sim.password:
            return Answer(302, [(b"location", f"{base}/owa/auth/logon.aspx?reason=2".encode())], b"")
        token = secrets.token_urlsafe(24)
        web.sessions[token] = user
        domain = _host(hdr).rpartition(":")[0] if _host(hdr).count(":") == 1 else _host(hdr)
        destination = form.get("destination") or f"{base}/owa/"
        return Answer(302, [(b"location", destination.encode()),
                            (b"set-cookie", f"{SESSION_COOKIE}={token}; Domain={domain}; path=/; HttpOnly".encode()),
                            (b"set-cookie", b"PrivateComputer=true; path=/")], b"")
    user = _session_user(web, hdr)
    if user is None:
        back = quote(f"{base}{low}", safe="")
        return Answer(302, [(b"location", f"{base}/owa/auth/logon.aspx?url={back}&reason=0".encode())], b"")
    items = len(sim.mailbox(user).folders.get(INBOX, {}))
    app = "ecp" if low.startswith("/ecp/") else "owa"
    page = f"<html><body><h1>{app}: {user}</h1><p>Inbox: {items} items</p></body></html>"
    return Answer(200, HTML, page.encode())
