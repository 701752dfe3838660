"""A whole answer for the email-security transforms read past h11 (proxy/exchange.py
``_whole_body``: a Content-Length body read into one buffer of its length), against a
running `seg-fast serve` and a stand-in mail server that misbehaves on request:

- an answer that arrives in many pieces comes out as the pipeline called directly makes it,
  and the mail-server connection is kept and used again;
- bytes beyond the Content-Length: the answer is still right, the connection is not reused;
- the mail server closing or going silent mid-body: the device gets 503, the gateway serves on;
- an answer past ``security.max_transform_bytes``: 500, never the untransformed bytes.
"""
from __future__ import annotations

import http.client
import threading

import pytest

from thread_server import ThreadServer
from processes import start_serve, stop_process, wait_listening
from test_transform_offload import (ANSWERS, SYNC_REQUEST, _free_port, _headers, _path, _reference, _same,
                                    _store)
from seg_fast.sim.oracle import Opener
from seg_fast.testing.rawhttp import requests

BIG = ANSWERS["links-big"][1]         # links rewritten: byte for byte comparable
HALF = len(BIG) // 2


class _MailServer(ThreadServer):
    """A raw HTTP/1.1 server: each request's X-Test-Answer header picks what it does."""

    def __init__(self):
        self.served: list = []            # (connection, what it answered), in order
        self.done = threading.Event()     # set at teardown: a stalled answer's hold ends
        super().__init__()

    def _serve(self, conn, n):
        try:
            self._requests(conn)
        except ConnectionResetError:
            pass                      # the gateway dropped a connection it will not reuse

    def _requests(self, conn):
        with conn:
            for fields in requests(conn):
                how = fields[b"x-test-answer"].decode()
                self.served.append((conn.fileno(), how))
                if not self._answer(conn, how):
                    return

    def _answer(self, conn, how: str) -> bool:
        """Answer one request; False: the connection ends here."""
        declared = len(BIG) + (10 << 20 if how == "too-large" else 0)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/vnd.ms-sync.wbxml\r\n"
                     b"Content-Length: %d\r\n\r\n" % declared)
        if how == "too-large":
            return False
        if how == "pieces":
            for at in range(0, len(BIG), 7001):
                conn.sendall(BIG[at:at + 7001])
            return True
        if how == "extra":
            conn.sendall(BIG + b"HTTP/1.1 200 OK\r\n")    # an answer nobody asked for
            return True
        conn.sendall(BIG[:HALF])
        if how == "stall":
            self.done.wait(60)
        return False                  # "close": mid-body

    def close(self):
        self.done.set()
        super().close()


@pytest.fixture
def mail_server():
    server = _MailServer()
    yield server
    server.close()


def _config(tmp_path, port: int, up_port: int, max_transform_bytes: int = len(BIG) + (1 << 20)):
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(
        'workers = 1\n'
        f'[listener]\nhost = "127.0.0.1"\nport = {port}\n'
        f'[upstream]\nurl = "http://127.0.0.1:{up_port}"\n'
        "[timeouts]\nupstream_read = 2.0\n"
        "[admin]\nenabled = false\n"
        f'[policy]\nsqlite_path = "{tmp_path}/policy.db"\n'
        f'[security]\nmaster_key_file = "{tmp_path}/master.key"\nkey_state_file = "{tmp_path}/keys.json"\n'
        f"max_transform_bytes = {max_transform_bytes}\n")
    return cfg


def _sync(port: int, how: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", _path("Sync", "DEV1"), SYNC_REQUEST, _headers(how))
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def test_whole_body_past_h11_through_serve(tmp_path, mail_server):
    _store(tmp_path)
    port = _free_port()
    proc = start_serve(_config(tmp_path, port, mail_server.port), tmp_path)
    try:
        wait_listening(port, proc)
        # In pieces, twice: the same bytes, on one kept-alive mail-server connection.
        first = _sync(port, "pieces")             # (the gateway makes the master key on first need)
        opener = Opener(str(tmp_path / "master.key"), str(tmp_path / "keys.json"))
        want = _reference("links-big", str(tmp_path / "master.key"))
        for status, got in (first, _sync(port, "pieces")):
            assert status == 200
            _same("links-big", got, want, opener)
        assert mail_server.connections == 1

        # Bytes after the answer: the answer is whole and right; that connection is dropped
        # (never asked again: its next "answer" would be those bytes).
        status, got = _sync(port, "extra")
        assert status == 200
        _same("links-big", got, want, opener)
        status, got = _sync(port, "pieces")
        assert status == 200
        _same("links-big", got, want, opener)
        assert mail_server.connections == 2
        assert [how for _conn, how in mail_server.served] == ["pieces", "pieces", "extra", "pieces"]

        # Mid-body close and silence: 503 to the device, nothing of the half answer passed on.
        for how in ("close", "stall"):
            status, got = _sync(port, how)
            assert status == 503, (how, got[:200])
            assert BIG[:64] not in got

        # Larger than the transforms may buffer: refused, not passed on untransformed.
        status, got = _sync(port, "too-large")
        assert status == 500
        assert b"too large" in got

        # The worker is still there and serves as before.
        status, got = _sync(port, "pieces")
        assert status == 200
        _same("links-big", got, want, opener)
        assert proc.poll() is None
    finally:
        stop_process(proc)
