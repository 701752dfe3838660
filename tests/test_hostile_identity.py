"""Identity and framing attacks against a running `seg-fast serve` in front of the simulator.

The policy blocks the user mallory. Each attack tries to get mallory past it (or to
make the gateway believe something about the device it did not see): by a bearer
token or an NTLM message with ``?User=alice``, Basic mallory with ``?User=alice``, a
credential naming no user, two Authorization headers, control characters in header
values, spoofed forwarding headers, a Host header that a 451 would echo back, and a
mail-server connection authenticated by NTLM that another device could inherit.
Between the gateway and the simulator sits a recorder that notes every request the
gateway forwarded, so "refused" also means "never reached the mail server".
"""
from __future__ import annotations

import base64
import json
import os

import h11
import trio

from processes import start_serve, stop_process
from proxy_helpers import MiniUpstream
from redis_server import free_port
from seg_fast.policy.model import GeneralAccess, ListPolicy, PolicyDocument
from seg_fast.policy.store import SqliteStore
from seg_fast.sim.mailbox import MailboxSimulator
from seg_fast.sim.tree import E, decode, encode, text
from test_credentials import jwt, ntlm_authenticate, ntlm_negotiate

EAS = "/Microsoft-Server-ActiveSync"
EXTERNAL = "https://eas.example.org"
ROAMER_SERVER = "https://mbx2.corp.example/Microsoft-Server-ActiveSync"
FOLDERSYNC = encode(E("FolderHierarchy:FolderSync", E("FolderHierarchy:SyncKey", "0")))
TRUSTED_PROXY = "127.0.0.2"        # the "load balancer": a second loopback address


def basic(user: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:secret".encode()).decode()


def target(user: str | None, device: str = "PHONE1") -> str:
    return f"{EAS}?Cmd=FolderSync" + (f"&User={user}" if user else "") + f"&DeviceId={device}&DeviceType=iPhone"


class Recorder:
    """The mail-server side: the simulator, with every forwarded request noted first."""

    def __init__(self):
        self.sim = MailboxSimulator(password="secret", seed=9, initial_messages=1)
        self.up = MiniUpstream(self.answer)
        self.connection_of: dict = {}          # connection task -> its number (tasks kept alive here)
        self.on_connection: list[tuple[bytes, int]] = []   # (target, connection number) per request

    def answer(self, req: h11.Request, body: bytes):
        task = trio.lowlevel.current_task()     # MiniUpstream serves each connection in its own task
        self.on_connection.append((req.target, self.connection_of.setdefault(task, len(self.connection_of))))
        if b"Roamer" in req.target:       # this user's mailbox moved: the server names another
            return 451, [(b"X-MS-Location", ROAMER_SERVER.encode()), (b"Content-Length", b"0")], b""
        got = self.sim._handle(req, body)
        return got.status, list(got.headers), got.body

    def connection(self, marker: str) -> int:
        (number,) = [n for t, n in self.on_connection if marker.encode() in t]
        return number

    def seen(self, marker: str) -> list[dict[bytes, bytes]]:
        """Headers of forwarded requests whose target holds ``marker``."""
        return [{k.lower(): v for k, v in r.headers.raw_items()} for r, _ in self.up.requests
                if marker.encode() in r.target]


async def exchange(port: int, raw: bytes, source: str = "127.0.0.1") -> tuple[int, dict, bytes]:
    """One request written byte for byte (so nothing client-side cleans it up); the answer."""
    stream = await trio.open_tcp_stream("127.0.0.1", port, local_address=source)
    try:
        await stream.send_all(raw)
        conn = h11.Connection(h11.CLIENT)
        conn.send(h11.Request(method=b"POST", target=b"/", headers=[(b"Host", b"x")]))   # client state only
        status, headers, body = 0, {}, bytearray()
        while True:
            ev = conn.next_event()
            if ev is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(ev, h11.Response):
                status, headers = ev.status_code, {k.lower(): v for k, v in ev.headers.raw_items()}
            elif isinstance(ev, h11.Data):
                body += ev.data
            else:
                return status, headers, bytes(body)
    finally:
        await trio.aclose_forcefully(stream)


def request(path: str, headers: list[tuple[str, str]], *, host: str = "gw.example") -> bytes:
    head = [f"POST {path} HTTP/1.1", f"Host: {host}", "MS-ASProtocolVersion: 14.1",
            "Content-Type: application/vnd.ms-sync.wbxml", f"Content-Length: {len(FOLDERSYNC)}"]
    head += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + FOLDERSYNC


def blocked_129(status: int, body: bytes) -> bool:
    return status == 200 and text(decode(body), "FolderHierarchy:Status") == "129"


async def tx_records(log, marker: str, n: int = 1) -> list[dict]:
    """The transaction records for ``marker`` requests, once the worker has flushed them (1 s)."""
    with trio.fail_after(20):
        while True:
            lines = log.read_text().splitlines() if log.exists() else []
            found = [r for r in map(json.loads, lines) if marker in (r.get("device_id") or "")]
            if len(found) >= n:
                return found
            await trio.sleep(0.1)


async def test_identity_and_framing_attacks_against_serve(tmp_path):
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    store = SqliteStore(state / "seg-fast-policy.db")
    await store.open()
    await store.replace_all(PolicyDocument(general=GeneralAccess(
        user=ListPolicy(enabled=True, mode="block", values=["mallory"]))), [])
    await store.aclose()
    os.chmod(state / "seg-fast-policy.db", 0o600)
    rec = Recorder()
    log = tmp_path / "tx.jsonl"
    port = free_port()
    async with trio.open_nursery() as nursery:
        await nursery.start(rec.up.serve)
        cfg = tmp_path / "gw.toml"
        cfg.write_text(
            f'workers = 1\n'
            f'[listener]\nhost = "127.0.0.1"\nport = {port}\n'
            f'trusted_proxies = ["{TRUSTED_PROXY}/32"]\nexternal_url = "{EXTERNAL}"\n'
            f'[upstream]\nurl = "http://127.0.0.1:{rec.up.port}"\n'
            f'[admin]\nenabled = false\n'
            f'[log]\ntransactions = "{log}"\n')
        proc = start_serve(cfg, tmp_path)
        try:
            # Ready when alice's request reaches the mail server (before the policy loads,
            # the gateway fails closed and forwards nothing).
            with trio.fail_after(30):
                while not rec.seen("READY"):
                    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
                    try:
                        await exchange(port, request(target("alice", "READY"), [("Authorization", basic("alice"))]))
                    except OSError:
                        pass
                    await trio.sleep(0.2)

            # 1. A bearer JWT for mallory: User=alice is refused, User=mallory or none is blocked.
            token = "Bearer " + jwt({"upn": "mallory@corp.example", "name": "Mallory"})
            status, _, _ = await exchange(port, request(target("alice", "JWT1"), [("Authorization", token)]))
            assert status == 400
            for user, dev in (("mallory", "JWT2"), (None, "JWT3")):
                status, _, body = await exchange(port, request(target(user, dev), [("Authorization", token)]))
                assert blocked_129(status, body)
            assert not rec.seen("JWT")
            assert {r["decision"] for r in await tx_records(log, "JWT", 2)} >= {"blocked.user"}
            # ...while alice's own token reaches the mail server (the simulator then says 401).
            alice = "Bearer " + jwt({"upn": "alice@corp.example"})
            status, _, _ = await exchange(port, request(target("alice", "JWTOK"), [("Authorization", alice)]))
            assert status == 401 and len(rec.seen("JWTOK")) == 1

            # 2. Basic mallory with User=alice: refused; Basic mallory alone: blocked.
            status, _, _ = await exchange(port, request(target("alice", "BAS1"), [("Authorization", basic("mallory"))]))
            assert status == 400
            status, _, body = await exchange(port, request(target(None, "BAS2"), [("Authorization", basic("CORP\\Mallory"))]))
            assert blocked_129(status, body) and not rec.seen("BAS")

            # 3. NTLM: a type-3 for CORP\mallory is refused with User=alice and blocked without;
            #    a type-1 (no user yet) goes on to fetch the mail server's challenge.
            type3 = "NTLM " + base64.b64encode(ntlm_authenticate("mallory", "CORP")).decode()
            status, _, _ = await exchange(port, request(target("alice", "NTLM1"), [("Authorization", type3)]))
            assert status == 400
            status, _, body = await exchange(port, request(target(None, "NTLM2"), [("Authorization", type3)]))
            assert blocked_129(status, body) and not rec.seen("NTLM")
            type1 = "NTLM " + base64.b64encode(ntlm_negotiate()).decode()
            status, _, _ = await exchange(port, request(target("alice", "NTLMT1"), [("Authorization", type1)]))
            assert status == 401 and len(rec.seen("NTLMT1")) == 1

            # 4. No user in the credential (Kerberos) or no credential: refused while the user policy is on.
            kerberos = "Negotiate " + base64.b64encode(b"\x60\x82\x01\x00\x06\x06\x2b\x06\x01\x05\x05\x02" + b"\0" * 32).decode()
            for headers, dev in (([("Authorization", kerberos)], "KRB1"), ([], "NONE1")):
                status, _, body = await exchange(port, request(target("alice", dev), headers))
                assert blocked_129(status, body)
            assert not rec.seen("KRB1") and not rec.seen("NONE1")
            assert {r["decision"] for r in await tx_records(log, "KRB1")} == {"blocked.user_unverified"}

            # 5. Two Authorization headers: 400, never forwarded.
            status, _, _ = await exchange(port, request(target("alice", "TWO1"), [
                ("Authorization", basic("alice")), ("Authorization", basic("mallory"))]))
            assert status == 400 and not rec.seen("TWO1")

            # 6. Control characters h11 lets through (0x01, 0x1b, 0x7f): 400; a tab is fine.
            for i, char in enumerate(("\x01", "\x1b", "\x7f")):
                status, _, _ = await exchange(port, request(target("alice", f"CTL{i}"), [
                    ("Authorization", basic("alice")), ("X-Note", f"a{char}b")]))
                assert status == 400
            assert not rec.seen("CTL")
            status, _, _ = await exchange(port, request(target("alice", "TAB1"), [
                ("Authorization", basic("alice")), ("X-Note", "a\tb")]))
            assert status != 400 and rec.seen("TAB1")[0][b"x-note"] == b"a\tb"

            # 7. Forwarding headers from an untrusted address are dropped and rebuilt...
            spoof = [("Authorization", basic("alice")), ("X-Forwarded-For", "203.0.113.66"),
                     ("X-Forwarded-Proto", "https"), ("Forwarded", "for=203.0.113.66;proto=https"),
                     ("X-Real-IP", "203.0.113.66"), ("X-Forwarded-Host", "evil.example")]
            await exchange(port, request(target("alice", "XFF1"), spoof))
            got = rec.seen("XFF1")[0]
            assert got[b"x-forwarded-for"] == b"127.0.0.1" and got[b"x-forwarded-proto"] == b"http"
            assert not {b"forwarded", b"x-real-ip", b"x-forwarded-host"} & set(got)
            assert (await tx_records(log, "XFF1"))[0]["client_ip"] == "127.0.0.1"
            # ...and believed from the configured load balancer: the device's address is the one it names.
            await exchange(port, request(target("alice", "XFF2"), spoof), source=TRUSTED_PROXY)
            got = rec.seen("XFF2")[0]
            assert got[b"x-forwarded-for"] == b"203.0.113.66, 127.0.0.2" and got[b"x-forwarded-proto"] == b"https"
            assert got[b"x-real-ip"] == b"203.0.113.66"
            assert (await tx_records(log, "XFF2"))[0]["client_ip"] == "203.0.113.66"

            # 8. A 451 sends the device to the configured external name, never to its own Host header.
            status, headers, _ = await exchange(port, request(target("Roamer", "R451"), [
                ("Authorization", basic("Roamer"))], host="evil.example"))
            assert status == 451 and headers[b"x-ms-location"] == f"{EXTERNAL}{EAS}".encode()

            # 9. NTLM authenticates the mail-server connection: one that carried it is never
            #    handed to another device (the server could serve that device as this user)...
            for dev in ("PIN1", "PIN2", "SHARE1", "SHARE2"):
                auth = type1 if dev.startswith("PIN") else basic("alice")
                await exchange(port, request(target("alice", dev), [("Authorization", auth)]))
            later = [rec.connection(d) for d in ("PIN2", "SHARE1", "SHARE2")]
            assert rec.connection("PIN1") not in later and rec.connection("PIN2") not in later[1:]
            # ...while Basic requests share kept-alive connections as before.
            assert rec.connection("SHARE1") == rec.connection("SHARE2")
            assert proc.poll() is None
        finally:
            stop_process(proc)
            nursery.cancel_scope.cancel()
