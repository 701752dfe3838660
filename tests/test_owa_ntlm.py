"""NTLM through the EWS and webmail routes of a running `seg-fast serve`.

NTLM authenticates a connection, not a request (MS-NLMP): the type-1 and type-3 must
reach the mail server on one connection, and later requests without credentials on it
are that user's. The gateway keeps such a mail-server connection for the one device
connection that authenticated it (proxy/pinning.py). The mail server here is
the test's own, keeping NTLM state per connection as IIS does: it answers a type-1 with
a challenge, a type-3 after a challenge with the user it names (read by the gateway's
own reader, an independent parse would add nothing), and a request without credentials
with that user only on an authenticated connection. What must hold: the handshake works
through the gateway, the user policy sees the type-3's user and every later request as
that user, and no other device connection ever inherits the authenticated one.
"""
from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time

import h11
import pytest

from thread_server import ThreadServer
from processes import REPO, start_serve, stop_process, wait_listening
from redis_server import free_port
from seg_fast.eas.credentials import ntlm_user
from test_credentials import ntlm_authenticate, ntlm_negotiate

TYPE1 = "NTLM " + base64.b64encode(ntlm_negotiate()).decode()
CHALLENGE = "NTLM " + base64.b64encode(b"NTLMSSP\x00\x02\x00\x00\x00" + b"\x00" * 40).decode()


def type3(user: str) -> str:
    return "NTLM " + base64.b64encode(ntlm_authenticate(user, "CORP")).decode()


class NtlmServer(ThreadServer):
    """HTTP/1.1 with NTLM state per connection; ``log``: (connection number, target, what happened)."""

    def __init__(self):
        self.log: list[tuple[int, str, str]] = []
        self.closed: set[int] = set()        # connections the gateway closed
        super().__init__()

    def _serve(self, s: socket.socket, n: int):
        h = h11.Connection(h11.SERVER)
        challenged, user = False, None
        try:
            while True:
                req = None
                while True:
                    ev = h.next_event()
                    if ev is h11.NEED_DATA:
                        h.receive_data(s.recv(65536))
                    elif isinstance(ev, h11.Request):
                        req = ev
                    elif isinstance(ev, h11.EndOfMessage):
                        break
                    elif not isinstance(ev, h11.Data):
                        return
                auth = dict(req.headers).get(b"authorization", b"").decode()
                status, headers, body = 401, [("WWW-Authenticate", "NTLM")], b""
                if auth.startswith("NTLM "):
                    who, start = ntlm_user(base64.b64decode(auth[5:]))
                    if start:
                        challenged, user, what = True, None, "type1"
                        headers = [("WWW-Authenticate", CHALLENGE)]
                    elif challenged:
                        challenged, user, what = False, who, f"type3 {who}"
                        status, headers, body = 200, [], f"hello {who}".encode()
                    else:
                        what = "type3 without a challenge"
                elif user is not None:
                    status, headers, body, what = 200, [], f"hello {user}".encode(), f"as {user}"
                else:
                    what = "anonymous"
                self.log.append((n, req.target.decode(), what))
                s.sendall(h.send(h11.Response(status_code=status, headers=headers + [("Content-Length", str(len(body)))]))
                          + h.send(h11.Data(data=body)) + h.send(h11.EndOfMessage()))
                if h.our_state is h11.MUST_CLOSE:
                    return
                h.start_next_cycle()
        except (OSError, h11.RemoteProtocolError):
            pass
        finally:
            self.closed.add(n)
            s.close()


class Device:
    """One keep-alive device connection to the gateway."""

    def __init__(self, port: int):
        self.s = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.h = h11.Connection(h11.CLIENT)

    def get(self, target: str, auth: str | None = None, method: str = "GET") -> tuple[int, bytes]:
        headers = [("Host", "mail.example.com"), ("Content-Length", "0")]
        if auth:
            headers.append(("Authorization", auth))
        self.s.sendall(self.h.send(h11.Request(method=method, target=target, headers=headers))
                       + self.h.send(h11.EndOfMessage()))
        status, body = None, b""
        while True:
            ev = self.h.next_event()
            if ev is h11.NEED_DATA:
                self.h.receive_data(self.s.recv(65536))
            elif isinstance(ev, h11.Response):
                status = ev.status_code
            elif isinstance(ev, h11.Data):
                body += ev.data
            elif isinstance(ev, h11.EndOfMessage):
                self.h.start_next_cycle()
                return status, body
            else:
                raise AssertionError(ev)

    def close(self):
        self.s.close()


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ntlm")
    up = NtlmServer()
    port = free_port()
    cfg = tmp / "gw.toml"
    cfg.write_text(
        f'workers = 1\n'
        f'[listener]\nhost = "127.0.0.1"\nport = {port}\nexternal_url = "https://mail.example.com"\n'
        f'[upstream]\nurl = "http://127.0.0.1:{up.port}"\n'
        f'[admin]\nenabled = false\n[log]\ntransactions = ""\n'
        f'[ews]\nenabled = true\nallowed_sources = ["127.0.0.1"]\n[webmail]\nenabled = true\n')
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "SEG_FAST_STATE_DIR": str(tmp / "state")}
    policies = tmp / "policies.json"
    policies.write_text(json.dumps({"policies": {"general": {
        "user": {"enabled": True, "mode": "block", "values": ["mallory"]}}}}))
    subprocess.run([sys.executable, "-m", "seg_fast", "policy", "--config", str(cfg), "load", str(policies)],
                   check=True, cwd=tmp, env=env, stdout=subprocess.DEVNULL)
    proc = start_serve(cfg, tmp)
    try:
        wait_listening(port, proc)
        yield port, up
    finally:
        stop_process(proc)
        up.sock.close()


@pytest.mark.parametrize("target", ["/owa/", "/EWS/Exchange.asmx"])
def test_the_handshake_and_later_requests_share_one_mail_server_connection(gw, target):
    port, up = gw
    dev = Device(port)
    try:
        assert dev.get(target, TYPE1)[0] == 401
        assert dev.get(target, type3("jdoe")) == (200, b"hello CORP\\jdoe")
        assert dev.get(target) == (200, b"hello CORP\\jdoe")           # no credentials: the connection's user
        assert dev.get(target + "?again=1") == (200, b"hello CORP\\jdoe")
    finally:
        dev.close()
    mine = [entry for entry in up.log if entry[1].startswith(target)][-4:]
    assert [what for _, _, what in mine] == ["type1", "type3 CORP\\jdoe", "as CORP\\jdoe", "as CORP\\jdoe"]
    assert len({n for n, _, _ in mine}) == 1                             # one mail-server connection
    # The device connection gone, the gateway closes the mail-server connection it held for it.
    end = time.monotonic() + 20
    while mine[0][0] not in up.closed:
        assert time.monotonic() < end, "the pinned mail-server connection outlived its device connection"
        time.sleep(0.05)


def test_no_other_device_connection_inherits_an_authenticated_one(gw):
    port, up = gw
    first, other = Device(port), Device(port)
    try:
        first.get("/owa/", TYPE1)
        assert first.get("/owa/", type3("jdoe"))[0] == 200
        for _ in range(3):
            assert other.get("/owa/") == (401, b"")                      # anonymous, on a connection of its own
        assert first.get("/owa/") == (200, b"hello CORP\\jdoe")
    finally:
        first.close()
        other.close()
    assert "anonymous" in [what for _, _, what in up.log[-4:]]


def test_the_user_policy_sees_the_type3_user_and_every_later_request_as_that_user(gw):
    port, up = gw
    dev = Device(port)
    try:
        assert dev.get("/EWS/Exchange.asmx", TYPE1)[0] == 401               # the handshake's start passes
        before = len(up.log)
        assert dev.get("/EWS/Exchange.asmx", type3("mallory"))[0] == 403   # blocked: never reaches the server
        assert dev.get("/EWS/Exchange.asmx")[0] == 403                     # and no one yet on this connection
        assert len(up.log) == before
    finally:
        dev.close()


def test_basic_credentials_on_a_pinned_connection_let_it_go(gw):
    port, up = gw
    dev = Device(port)
    try:
        dev.get("/owa/", TYPE1)
        assert dev.get("/owa/", type3("jdoe"))[0] == 200
        n = up.log[-1][0]
        basic = "Basic " + base64.b64encode(b"bob:pw").decode()
        assert dev.get("/owa/", basic)[0] == 401                          # not on jdoe's connection
        assert up.log[-1][0] != n
        assert dev.get("/owa/")[0] == 401                                 # and jdoe's is gone
    finally:
        dev.close()
