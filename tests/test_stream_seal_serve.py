"""ItemOperations fetches sealed while they stream (proxy/sealstream.py), through a running
`seg-fast serve` and a stand-in mail server that misbehaves on request:

- an answer in many pieces reaches the device chunked, as the whole path makes it (the
  WBXML around the envelope byte for byte, the envelope opening with the gateway's keys
  to the file), and the mail-server connection is kept and used again;
- the mail server closing, falling silent or sending bytes that are not base64 after the
  device's head went out: the device's connection closes without the last chunk (an
  incomplete answer, never a complete wrong one), the gateway serves on; a file whose
  base64 broke its stream is read whole the next time (the whole path decodes leniently);
- closing before the Data string: 503, as the whole path;
- a file the policy lets through streams as it came (Content-Length);
- ``security.stream_seal = false``: every answer whole (Content-Length), the same bytes.
"""
from __future__ import annotations

import base64
import contextlib
import http.client
import json
import random
import ssl
import time

import pytest

import test_whole_body
from processes import start_serve, stop_process, wait_listening
from test_tls13_records_client import mail_context, write_pki
from test_transform_offload import FETCH_REQUEST, WB, POLICY, UA, _free_port, _headers, _path, _store
from seg_fast.content import pipeline
from seg_fast.content.keys import Keyring, load_master_key
from seg_fast.content.settings import ContentSettings
from seg_fast.eas.request import EasRequest
from seg_fast.eas.wbxml import Element as E, encode, scan
from seg_fast.sim.corpus import _make_pdf
from seg_fast.sim.oracle import Opener

PDF = _make_pdf(random.Random(5), 1536 * 1024)
PNG = b"\x89PNG\r\n\x1a\n" + random.Random(6).randbytes(400 * 1024)


def _fetch(text: bytes, ref: str = "ref:1", ctype: str = "application/pdf") -> bytes:
    marker = "\x01DATA\x01"
    doc = encode(E("ItemOperations:ItemOperations", [
        E("ItemOperations:Status", text="1"),
        E("ItemOperations:Response", [E("ItemOperations:Fetch", [
            E("ItemOperations:Status", text="1"), E("AirSyncBase:FileReference", text=ref),
            E("ItemOperations:Properties", [E("AirSyncBase:ContentType", text=ctype),
                                            E("ItemOperations:Data", text=marker)])])])]))
    return doc.replace(marker.encode(), text)


GOOD = _fetch(base64.b64encode(PDF))
_b64 = base64.b64encode(PDF)
# A stray byte mid-way: lenient decoders skip it, strict ones refuse.
BAD = _fetch(_b64[:len(_b64) // 2] + b"!" + _b64[len(_b64) // 2:], ref="ref:bad")
ALLOWED = _fetch(base64.b64encode(PNG), ref="ref:png", ctype="image/png")


class _FetchServer(test_whole_body._MailServer):
    """test_whole_body's stand-in mail server, answering fetches: X-Test-Answer "pieces" (in
    7 KB pieces), "close" and "stall" (half the answer, then closed or silent), "early" (40
    bytes, closed), "bad" and "png" (another file, in pieces); "get-..." the same with the
    PDF itself (a GetAttachment answer)."""

    def _answer(self, conn, how: str) -> bool:
        body = {"bad": BAD, "png": ALLOWED}.get(how, GOOD)
        ctype = b"application/vnd.ms-sync.wbxml"
        if how.startswith("get-"):
            body, ctype, how = PDF, b"application/pdf", how[4:]
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nContent-Disposition: attachment; "
                     b'filename="report.pdf"\r\nContent-Length: %d\r\n\r\n' % (ctype, len(body)))
        if how in ("pieces", "bad", "png"):
            for at in range(0, len(body), 7001):
                conn.sendall(body[at:at + 7001])
            return True
        if how == "early":
            conn.sendall(body[:40])
            return False
        conn.sendall(body[:len(body) // 2])
        if how == "stall":
            self.done.wait(60)
        return False                  # "close": mid-Data


class _TLSFetchServer(_FetchServer):
    """The same at https:// (TLS 1.3, its session tickets after the handshake): ``ca`` the
    file of the CA its certificate for "localhost" chains to."""

    def __init__(self, tmp_path):
        d = write_pki(tmp_path)
        self.ca, self.ctx = d / "ca.pem", mail_context(d)
        super().__init__()

    def _serve(self, conn, n):
        try:
            conn = self.ctx.wrap_socket(conn, server_side=True)
        except (ssl.SSLError, OSError):
            return
        super()._serve(conn, n)


@pytest.fixture
def mail_server():
    server = _FetchServer()
    yield server
    server.close()


@contextlib.contextmanager
def _gateway(tmp_path, mail_server, stream_seal: bool = True):
    """A running `seg-fast serve` in front of ``mail_server``: (its port, an Opener of its envelopes)."""
    _store(tmp_path)
    port = _free_port()
    cfg = test_whole_body._config(tmp_path, port, mail_server.port, 64 << 20)
    text = cfg.read_text()
    if isinstance(mail_server, _TLSFetchServer):
        text = text.replace(f'url = "http://127.0.0.1:{mail_server.port}"',
                            f'url = "https://localhost:{mail_server.port}"\nca_file = "{mail_server.ca}"')
    cfg.write_text(text + f"stream_seal = {'true' if stream_seal else 'false'}\n"
                   f'[log]\ntransactions = "{tmp_path}/tx.log"\n')
    proc = start_serve(cfg, tmp_path)
    try:
        wait_listening(port, proc)
        yield port, Opener(str(tmp_path / "master.key"), str(tmp_path / "keys.json"))
        assert proc.poll() is None    # served on, whatever it was sent
    finally:
        stop_process(proc)


def _ask(port: int, command: str, how: str, query: str = "", body: bytes = FETCH_REQUEST, version="14.1"):
    """(status, headers, body) or (status, headers, IncompleteRead) for a cut-off answer."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", _path(command, "DEV1") + query, body,
                     dict(_headers(how), **{"MS-ASProtocolVersion": version}))
        r = conn.getresponse()
        try:
            got = r.read()
        except http.client.IncompleteRead as exc:
            got = exc
        return r.status, {k.lower(): v for k, v in r.getheaders()}, got
    finally:
        conn.close()


def _fetch_from(port: int, how: str):
    return _ask(port, "ItemOperations", how)


def _get_from(port: int, how: str):
    return _ask(port, "GetAttachment", how, "&AttachmentName=ref%3A9", b"", "12.1")


def _whole_path(tmp_path, body: bytes) -> bytes:
    pipeline.configure(ContentSettings(), keys=Keyring(load_master_key(str(tmp_path / "master.key"))))
    try:
        (t,) = pipeline.transforms_for(POLICY, managed=True, device_id="DEV1", user="jdoe")
        req = EasRequest(method="POST", path="/Microsoft-Server-ActiveSync", command="ItemOperations",
                         user="jdoe", device_id="DEV1", user_agent=UA, params={})
        return t.transform_answer(req, 200, WB, body)
    finally:
        pipeline.configure(ContentSettings())


def _data(answer: bytes) -> tuple[int, int]:
    (sp,) = scan(answer, ["ItemOperations:Data"])
    return sp.offset, sp.offset + sp.length


def _errors(tmp_path, n: int) -> list[str]:
    """The last ``n`` transaction records' errors, once the log holds them (a bound, not a timing)."""
    end = time.monotonic() + 20
    while True:
        lines = [json.loads(x) for x in (tmp_path / "tx.log").read_text().splitlines() if x.strip()] \
            if (tmp_path / "tx.log").exists() else []
        errors = [x.get("error", "") for x in lines if x.get("command") == "ItemOperations"]
        if len(errors) >= n and all(errors[-n:]) or time.monotonic() > end:
            return errors[-n:]
        time.sleep(0.1)


def _same(got: bytes, want: bytes, opener, original: bytes) -> None:
    """The whole path's bytes but for the envelope's nonce; both envelopes open to the file."""
    (a, b), (c, d) = _data(got), _data(want)
    assert (a, b) == (c, d)
    assert got[:a] == want[:a] and got[b:] == want[b:]
    for text in (got[a:b], want[a:b]):
        assert opener("DEV1", "jdoe", base64.b64decode(text, validate=True)) == original


def test_fetch_sealed_as_it_streams_through_serve(tmp_path, mail_server):
    with _gateway(tmp_path, mail_server) as (port, opener):
        for _ in range(2):            # twice, on one kept-alive mail-server connection
            status, headers, got = _fetch_from(port, "pieces")
            assert status == 200 and headers.get("transfer-encoding") == "chunked"
            assert "content-length" not in headers
            _same(got, _whole_path(tmp_path, GOOD), opener, PDF)
        assert mail_server.connections == 1

        # Broken after the head went out: an incomplete answer, never a complete one.
        for how in ("close", "stall", "bad"):
            status, headers, got = _fetch_from(port, how)
            assert status == 200 and headers.get("transfer-encoding") == "chunked", how
            assert isinstance(got, http.client.IncompleteRead), how
        # Each one's reason in the transaction log (what broke, never content).
        errors = _errors(tmp_path, 3)
        assert "mail server closed the connection mid-answer; the device's answer was cut off" in errors[0]
        assert "did not answer within 2 s; the device's answer was cut off" in errors[1]
        assert "could not be sealed as it streamed: not strict base64 text" in errors[2]
        # The file whose base64 broke its stream: whole the next time, decoded leniently.
        status, headers, got = _fetch_from(port, "bad")
        assert status == 200 and int(headers["content-length"]) == len(got)
        _same(got, _whole_path(tmp_path, BAD), opener, PDF)

        # Closed before the Data string: 503, as the whole path answers.
        status, _, _ = _fetch_from(port, "early")
        assert status == 503

        # A file the policy lets through (a PNG): as it came, with its Content-Length.
        status, headers, got = _fetch_from(port, "png")
        assert status == 200 and int(headers["content-length"]) == len(got)
        assert got == _whole_path(tmp_path, ALLOWED) == ALLOWED

        # Served on as before.
        status, headers, got = _fetch_from(port, "pieces")
        assert status == 200
        _same(got, _whole_path(tmp_path, GOOD), opener, PDF)


def test_fetch_sealed_as_it_streams_from_an_https_mail_server(tmp_path):
    """The mail server at https://: its answer's records read as they come (several per pass
    where they are whole), sealed and streamed as from a plain one."""
    (tmp_path / "pki").mkdir()
    server = _TLSFetchServer(tmp_path / "pki")
    try:
        with _gateway(tmp_path, server) as (port, opener):
            for _ in range(2):        # twice, on one kept-alive mail-server connection
                status, headers, got = _fetch_from(port, "pieces")
                assert status == 200 and headers.get("transfer-encoding") == "chunked"
                _same(got, _whole_path(tmp_path, GOOD), opener, PDF)
            assert server.connections == 1
            status, headers, got = _fetch_from(port, "close")
            assert status == 200 and isinstance(got, http.client.IncompleteRead)
            assert "mail server closed the connection mid-answer" in _errors(tmp_path, 1)[0]
    finally:
        server.close()


def test_stream_seal_off_in_the_config(tmp_path, mail_server):
    with _gateway(tmp_path, mail_server, stream_seal=False) as (port, opener):
        status, headers, got = _fetch_from(port, "pieces")
        assert status == 200 and int(headers["content-length"]) == len(got)
        _same(got, _whole_path(tmp_path, GOOD), opener, PDF)
        status, headers, got = _fetch_from(port, "close")      # the whole path: 503, nothing passed
        assert status == 503


def test_get_attachment_sealed_as_it_streams_through_serve(tmp_path, mail_server):
    with _gateway(tmp_path, mail_server) as (port, opener):
        status, headers, got = _get_from(port, "get-pieces")
        assert status == 200 and int(headers["content-length"]) == len(got)
        assert headers["content-type"] == "application/vnd.seg-fast.envelope"
        assert headers["content-disposition"] == 'attachment; filename="report.pdf.segenc"'
        assert opener("DEV1", "jdoe", got) == PDF
        for how in ("get-close", "get-stall"):  # cut off: short of its Content-Length
            status, headers, got = _get_from(port, how)
            assert status == 200 and isinstance(got, http.client.IncompleteRead), how
            assert len(got.partial) < int(headers["content-length"])
        status, headers, got = _get_from(port, "get-pieces")
        assert status == 200 and opener("DEV1", "jdoe", got) == PDF
