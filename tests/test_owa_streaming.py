"""EWS and webmail stream both ways through a running `seg-fast serve` (EWS request bodies
excepted: read whole, up to 1 MB, for their impersonation header; tests/test_ews_impersonation.py).

The mail server here is the test's own (an h11 server in a thread) so that each side can
wait on the other: the client sends the second half of a request body only after the
mail server has received the first half, and the mail server sends the second half of
its answer only after the client has read the first. A gateway that buffered a whole
body or a whole answer would deadlock both (the test fails at its bound).
"""
from __future__ import annotations

import base64
import hashlib
import os
import socket
import threading
import time

import h11
import pytest

from thread_server import ThreadServer
from processes import start_serve, stop_process, wait_listening
from redis_server import free_port


HALF = 300_000                       # each half of the request body and of the answer (past 64 KB)
BOUND = 20.0


class GatedUpstream(ThreadServer):
    """An HTTP/1.1 server: records each request's body progress; answers in two chunked halves,
    the second once ``go`` is set."""

    def __init__(self):
        self.received = 0                   # body bytes of the request in progress
        self.requests: list[tuple[h11.Request, str]] = []   # (head, body sha256)
        self.go = threading.Event()
        self.answer = (os.urandom(HALF), os.urandom(HALF))
        super().__init__()

    def _serve(self, s: socket.socket, n: int):
        h = h11.Connection(h11.SERVER)
        try:
            while True:
                req, digest = None, hashlib.sha256()
                self.received = 0
                while True:
                    ev = h.next_event()
                    if ev is h11.NEED_DATA:
                        data = s.recv(65536)
                        h.receive_data(data)
                        continue
                    if isinstance(ev, h11.Request):
                        req = ev
                    elif isinstance(ev, h11.Data):
                        self.received += len(ev.data)
                        digest.update(ev.data)
                    elif isinstance(ev, h11.EndOfMessage):
                        break
                    else:
                        return
                self.requests.append((req, digest.hexdigest()))
                if req.target.startswith(b"/owa/once"):
                    # Answer as if keeping the connection, then close it (a restart, a crash).
                    s.sendall(h.send(h11.Response(status_code=200, headers=[("Content-Length", "2")]))
                              + h.send(h11.Data(data=b"ok")) + h.send(h11.EndOfMessage()))
                    return
                s.sendall(h.send(h11.Response(status_code=200, headers=[("Content-Type", "application/octet-stream"),
                                                                         ("Transfer-Encoding", "chunked")])))
                s.sendall(h.send(h11.Data(data=self.answer[0])))
                if not self.go.wait(BOUND):
                    return
                self.go.clear()
                s.sendall(h.send(h11.Data(data=self.answer[1])) + h.send(h11.EndOfMessage()))
                if h.our_state is h11.MUST_CLOSE:
                    return
                h.start_next_cycle()
        except (OSError, h11.RemoteProtocolError):
            pass
        finally:
            s.close()


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("owa-stream")
    up = GatedUpstream()
    port = free_port()
    cfg = tmp / "gw.toml"
    cfg.write_text(
        f'workers = 1\n'
        f'[listener]\nhost = "127.0.0.1"\nport = {port}\nexternal_url = "https://mail.example.com"\n'
        f'[upstream]\nurl = "http://127.0.0.1:{up.port}"\n'
        f'[admin]\nenabled = false\n[log]\ntransactions = ""\n'
        f'[policy]\nallow_if_no_policies = true\n'
        f'[ews]\nenabled = true\nallowed_sources = ["127.0.0.0/8"]\n'
        f'[webmail]\nenabled = true\n')
    proc = start_serve(cfg, tmp)
    try:
        wait_listening(port, proc)
        yield port, up
    finally:
        stop_process(proc)
        up.sock.close()


def _wait(pred, what: str):
    end = time.monotonic() + BOUND
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.02)
    raise AssertionError(f"{what} within {BOUND} s: the gateway buffered instead of streaming")


@pytest.mark.parametrize("target,chunked", [("/EWS/Exchange.asmx", False), ("/owa/upload", False),
                                            ("/ecp/x", True)])
def test_bodies_stream_both_ways(gw, target, chunked):
    port, up = gw
    first, second = os.urandom(HALF), os.urandom(HALF)
    if target.startswith("/EWS/"):           # an EWS body must be XML (it is parsed, see below)
        first, second = b"<a>" + first.hex()[:HALF - 3].encode(), second.hex()[:HALF - 4].encode() + b"</a>"
    head = (f"POST {target} HTTP/1.1\r\nHost: mail.example.com\r\n"
            f"Authorization: Basic {base64.b64encode(b'jdoe:pw').decode()}\r\n").encode()
    if chunked:
        head += b"Transfer-Encoding: chunked\r\n\r\n"
        wire = (b"%x\r\n" % len(first) + first + b"\r\n", b"%x\r\n" % len(second) + second + b"\r\n0\r\n\r\n")
    else:
        head += f"Content-Length: {2 * HALF}\r\n\r\n".encode()
        wire = (first, second)
    before = len(up.requests)
    s = socket.create_connection(("127.0.0.1", port))
    s.settimeout(BOUND)
    try:
        if target.startswith("/EWS/"):
            # An EWS request body is read whole first (at most 1 MB: its ExchangeImpersonation
            # header is checked before anything is forwarded, passthrough.py); the answer streams.
            s.sendall(head + wire[0] + wire[1])
        else:
            s.sendall(head + wire[0])
            _wait(lambda: up.received >= HALF, "the mail server got the first half of the body")
            s.sendall(wire[1])
        client = h11.Connection(h11.CLIENT)
        client.send(h11.Request(method="POST", target=target, headers=[("Host", "x"), ("Transfer-Encoding", "chunked")]))
        got, done = bytearray(), False
        status = None
        while not done:
            ev = client.next_event()
            if ev is h11.NEED_DATA:
                client.receive_data(s.recv(65536))
            elif isinstance(ev, h11.Response):
                status = ev.status_code
            elif isinstance(ev, h11.Data):
                got += ev.data
                if len(got) >= HALF:
                    up.go.set()            # the client has the first half: release the second
            elif isinstance(ev, h11.EndOfMessage):
                done = True
            else:
                raise AssertionError(ev)
    finally:
        s.close()
    assert status == 200
    assert bytes(got) == up.answer[0] + up.answer[1]
    req, digest = up.requests[before]
    assert digest == hashlib.sha256(first + second).hexdigest()
    assert req.target.decode() == target
    names = [k for k, _ in req.headers]
    assert (b"transfer-encoding" in names) != (b"content-length" in names)   # one framing, never both
    assert dict(req.headers)[b"host"] == f"127.0.0.1:{up.port}".encode()


def test_a_kept_alive_connection_the_mail_server_closed_is_resent_on_a_fresh_one(gw):
    port, up = gw
    before = len(up.requests)
    for i in range(6):               # each answer's connection is closed right after it
        s = socket.create_connection(("127.0.0.1", port))
        s.settimeout(BOUND)
        try:
            s.sendall(b"POST /owa/once HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello")
            raw = b""
            while chunk := s.recv(65536):
                raw += chunk
        finally:
            s.close()
        assert raw.startswith(b"HTTP/1.1 200 ") and raw.endswith(b"ok"), raw
    assert len(up.requests) >= before + 6
