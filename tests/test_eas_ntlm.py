"""NTLM over ActiveSync through a running `seg-fast serve` (proxy/pinning.py).

NTLM authenticates a connection (MS-NLMP): type 1 -> 401 challenge -> type 3 -> 200 must
reach the mail server on one connection, and later requests without credentials on it
are that user's. The gateway keeps that mail-server connection for the one device
connection that authenticated it, as for EWS/webmail. The mail server is
tests/test_owa_ntlm.py's, keeping NTLM state per connection as IIS does. What must hold:
the handshake completes; later requests reach the same mail-server connection; no other
device connection inherits it; the pinned connection closes with the device connection;
the policy decides the type-1 leg on User= and the type-3 leg (and every later request)
on the type-3's user, failing closed.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from processes import REPO, start_serve, stop_process, wait_listening
from redis_server import free_port
from test_owa_ntlm import TYPE1, Device, NtlmServer, type3


def eas(user: str = "jdoe", device: str = "NTLMDEV1", cmd: str = "FolderSync") -> str:
    return f"/Microsoft-Server-ActiveSync?Cmd={cmd}&User={user}&DeviceId={device}&DeviceType=iPhone"


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("easntlm")
    up = NtlmServer()
    port = free_port()
    cfg = tmp / "gw.toml"
    cfg.write_text(
        f'workers = 1\n'
        f'[listener]\nhost = "127.0.0.1"\nport = {port}\nexternal_url = "https://mail.example.com"\n'
        f'[upstream]\nurl = "http://127.0.0.1:{up.port}"\n'
        f'[admin]\nenabled = false\n[log]\ntransactions = ""\n'
        # User= trusted without a credential: requests without one reach the mail server, the
        # harder case for pinning (with "refuse", the default, the user policy stops them first).
        f'[policy]\nuser_without_credential = "trust_query"\n')
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


def _closed(up, n: int) -> None:
    end = time.monotonic() + 20
    while n not in up.closed:
        assert time.monotonic() < end, "the pinned mail-server connection outlived its device connection"
        time.sleep(0.05)


def test_the_handshake_and_later_requests_share_one_mail_server_connection(gw):
    port, up = gw
    dev = Device(port)
    try:
        assert dev.get(eas(), TYPE1, "POST")[0] == 401
        assert dev.get(eas(), type3("jdoe"), "POST") == (200, b"hello CORP\\jdoe")
        assert dev.get(eas(), None, "POST") == (200, b"hello CORP\\jdoe")       # the connection's user
        assert dev.get(eas(cmd="Sync"), None, "POST") == (200, b"hello CORP\\jdoe")
    finally:
        dev.close()
    mine = [entry for entry in up.log if "DeviceId=NTLMDEV1" in entry[1]][-4:]
    assert [what for _, _, what in mine] == ["type1", "type3 CORP\\jdoe", "as CORP\\jdoe", "as CORP\\jdoe"]
    assert len({n for n, _, _ in mine}) == 1                                 # one mail-server connection
    _closed(up, mine[0][0])                                                   # gone with the device's


def test_no_other_device_connection_inherits_an_authenticated_one(gw):
    port, up = gw
    first, other = Device(port), Device(port)
    try:
        first.get(eas(device="NTLMDEV2"), TYPE1, "POST")
        assert first.get(eas(device="NTLMDEV2"), type3("jdoe"), "POST")[0] == 200
        n = up.log[-1][0]
        before = len(up.log)
        for _ in range(3):
            # The same user and device on another connection, no credentials (User= trusted
            # here): forwarded, but on a connection of its own, where the server knows no one.
            assert other.get(eas(device="NTLMDEV2"), None, "POST") == (401, b"")
            assert up.log[-1][0] != n and up.log[-1][2] == "anonymous"
        assert [what for _, _, what in up.log[before:]] == ["anonymous"] * 3
        assert first.get(eas(device="NTLMDEV2"), None, "POST") == (200, b"hello CORP\\jdoe")
        assert up.log[-1][0] == n
    finally:
        first.close()
        other.close()
    _closed(up, n)


def test_the_policy_decides_the_type3_user_and_fails_closed(gw):
    port, up = gw
    dev = Device(port)
    try:
        # Type 1 names no one: decided on User= (jdoe passes), answered with the challenge.
        assert dev.get(eas(device="NTLMDEV3"), TYPE1, "POST")[0] == 401
        before = len(up.log)
        # The type 3 names mallory (User= jdoe would be another user: refused as malformed);
        # with User=mallory it is the user policy's: blocked, never reaches the mail server.
        assert dev.get(eas(device="NTLMDEV3"), type3("mallory"), "POST")[0] == 400
        status, body = dev.get(eas("mallory", "NTLMDEV3"), type3("mallory"), "POST")
        assert status != 200 and b"hello" not in body
        assert len(up.log) == before
        # Nobody is authenticated on this connection: a request without credentials is anonymous.
        status, body = dev.get(eas(device="NTLMDEV3"), None, "POST")
        assert b"hello" not in body and (len(up.log) == before or up.log[-1][2] == "anonymous")
    finally:
        dev.close()


def test_a_later_request_naming_another_user_is_refused(gw):
    port, up = gw
    dev = Device(port)
    try:
        dev.get(eas(device="NTLMDEV4"), TYPE1, "POST")
        assert dev.get(eas(device="NTLMDEV4"), type3("jdoe"), "POST")[0] == 200
        before = len(up.log)
        # jdoe's connection, User= bob: the mail server would answer as jdoe: refused here.
        assert dev.get(eas("bob", "NTLMDEV4"), None, "POST")[0] == 400
        assert len(up.log) == before
        # mallory is blocked whoever's connection she claims (the user policy).
        status, body = dev.get(eas("mallory", "NTLMDEV4"), None, "POST")
        assert status != 200 and b"hello" not in body and len(up.log) == before
    finally:
        dev.close()
