"""`seg-fast bench sizing --upstream sogo`: a small correctness run against a real SOGo.

A handful of devices (4-20) over a list of SOGo accounts run a device session twice at
once: straight to SOGo and through the gateway. The oracle is SOGo's own answer to the
direct device, not the simulator's corpus: every gateway answer must have the same HTTP
status and content type and the same body bytes, but for what SOGo mints afresh for every
request (the FolderSync key; tests/data/sogo/README.md lists SOGo's quirks). The direct
answers are also held to what a working server says (FolderSync Status 1, a Sync key, Ping
Status 2 after a delivery...), so a SOGo that refuses everyone does not pass by agreeing
with itself.

The session: OPTIONS, Provision (SOGo answers policy Status 2 with no key; a server that
hands out a key gets the acknowledgement), FolderSync, Sync with Body Types 1, 2 and 4
(+ MIMESupport), ItemOperations by ServerId (MIME) and by FileReference (inline and
multipart), Search. With ``--imap`` the run can deliver (IMAP APPEND with the account's
password): it puts one message with an attachment into each account's Inbox first, then
parks Pings for each account's devices (direct and gateway; at most ``--max-parked`` at
once, since every parked Ping holds one sogod worker), delivers a message to wake them
and compares the Pings and the Syncs that follow.

This is not a capacity figure: SOGo's prefork workers, not the gateway, bound the
device count. The gateway is started here (`seg-fast serve`, pass-through: no policy,
attachments not blocked) unless ``--gateway URL`` names one already running.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import imaplib
import secrets
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from email.message import EmailMessage
from email.policy import SMTP
from pathlib import Path
from urllib.parse import urlsplit

import msgspec
import trio

from seg_fast.sim.client import EasClient, Response
from seg_fast.sim.tree import E, decode, encode, find, kids, text

MAX_DEVICES = 20
EAS_PATH = "/Microsoft-Server-ActiveSync"
ATTACHMENT = b"%PDF-1.4\n% seg-fast sogo fleet\n" + bytes(range(256)) * 4 + b"\n%%EOF\n"
SEARCH_WORD = "fleet"


def wanted(argv: list[str]) -> bool:
    """Does this `bench sizing` command line ask for ``--upstream sogo``?"""
    for k, arg in enumerate(argv):
        if arg == "--upstream" and argv[k + 1:k + 2] == ["sogo"]:
            return True
        if arg == "--upstream=sogo":
            return True
    return False


# -- accounts and mail ---------------------------------------------------------------

def read_users(path: Path) -> list[tuple[str, str]]:
    """``user:password`` (or ``user password``) per line; # comments and blank lines skipped."""
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, password = line.partition(":") if ":" in line else line.partition(" ")
        if not sep or not user.strip() or not password.strip():
            raise ValueError(f"{path}:{n}: expected user:password")
        out.append((user.strip(), password.strip()))
    return out


def message(user: str, subject: str, *, attach: bool) -> bytes:
    m = EmailMessage()
    m["From"] = "seg-fast fleet <fleet@example.org>"
    m["To"] = user
    m["Subject"] = subject
    m["Date"] = "Mon, 02 Nov 2026 08:00:00 +0000"
    m["Message-ID"] = f"<{secrets.token_hex(8)}@seg-fast.example.org>"
    m.set_content(f"{subject}: see https://example.net/fleet\n")
    if attach:
        m.add_attachment(ATTACHMENT, maintype="application", subtype="pdf", filename="fleet.pdf")
    return m.as_bytes(policy=SMTP)


def imap_deliver(host: str, port: int, user: str, password: str, mime: bytes) -> None:
    """Append to the account's Inbox, as an MTA's delivery would (blocking: run in a thread)."""
    conn = imaplib.IMAP4(host, port, timeout=20)
    try:
        conn.login(user, password)
        typ, data = conn.append("INBOX", None, None, mime)
        if typ != "OK":
            raise RuntimeError(f"IMAP APPEND for {user} failed: {data!r}")
    finally:
        with contextlib.suppress(Exception):
            conn.logout()


# -- requests ------------------------------------------------------------------------

def folder_sync():
    return E("FolderHierarchy:FolderSync", E("FolderHierarchy:SyncKey", "0"))


def sync(collection: str, key: str, body_type: int | None = None):
    opts = None
    if body_type is not None:
        opts = E("AirSync:Options", E("AirSync:FilterType", 0),
                 E("AirSync:MIMESupport", 2) if body_type == 4 else None,
                 E("AirSyncBase:BodyPreference", E("AirSyncBase:Type", body_type)))
    return E("AirSync:Sync", E("AirSync:Collections", E(
        "AirSync:Collection", E("AirSync:SyncKey", key), E("AirSync:CollectionId", collection),
        E("AirSync:GetChanges") if key != "0" else None, E("AirSync:WindowSize", 50) if key != "0" else None,
        opts)))


def sync_key(r: Response, old: str) -> str:
    """The Sync key an answer hands out (SOGo's unchanged Sync is an empty 200: key unchanged)."""
    if not r.body:
        return old
    return text(_doc(r), "AirSync:Collections", "AirSync:Collection", "AirSync:SyncKey") or old


def _doc(r: Response):
    try:
        return r.doc
    except Exception:
        return None


def _status(r: Response, *path: str) -> str | None:
    return text(_doc(r), *path)


def sync_adds(r: Response) -> list:
    cmds = find(_doc(r), "AirSync:Collections", "AirSync:Collection", "AirSync:Commands")
    return list(kids(cmds, "AirSync:Add"))


# -- the run -------------------------------------------------------------------------

class Tally:
    """Per command: answers compared, equal, mismatched; errors (exceptions, or an answer
    no working server gives)."""

    def __init__(self):
        self.commands: dict[str, dict[str, int]] = {}
        self.mismatches: list[dict] = []
        self.errors: list[dict] = []

    def _c(self, cmd: str) -> dict[str, int]:
        return self.commands.setdefault(cmd, {"compared": 0, "equal": 0, "mismatch": 0, "errors": 0})

    def compared(self, cmd: str, equal: bool) -> None:
        c = self._c(cmd)
        c["compared"] += 1
        c["equal" if equal else "mismatch"] += 1

    def error(self, cmd: str, device: str, step: str, path: str, what: str) -> None:
        self._c(cmd)["errors"] += 1
        self.errors.append({"device": device, "step": step, "path": path, "error": what})


def _mask_foldersync(body: bytes) -> bytes:
    """FolderSync's key is minted anew per request (host_pid_time_n): set it aside."""
    try:
        key = text(decode(body), "FolderHierarchy:SyncKey")
    except Exception:
        return body
    return body.replace(key.encode(), b"<volatile>") if key else body


def _ctype(r: Response) -> str:
    return r.headers.get("content-type", "").split(";")[0].strip().lower()


def _digest(r: Response) -> dict:
    # lengths and digests only: mail bodies stay out of the report
    return {"status": r.status, "content_type": _ctype(r), "bytes": len(r.body),
            "sha256": hashlib.sha256(r.body).hexdigest()[:16]}


class Pair:
    """One device, twice: the same requests straight to SOGo and through the gateway."""

    def __init__(self, n: int, user: str, password: str, tag: str, run: "Run"):
        self.n, self.user, self.password, self.run = n, user, password, run
        self.name = f"dev{n:02d}"
        self.direct = run.client(run.sogo, user, password, f"SF{tag}{n:02d}D")
        self.gateway = run.client(run.gw, user, password, f"SF{tag}{n:02d}G")
        self.inbox = ""
        self.keys = ["0", "0"]         # the Inbox's Sync key, direct and gateway

    async def aclose(self) -> None:
        await self.direct.aclose()
        await self.gateway.aclose()

    async def step(self, name: str, command: str, bodies, *, expect=None, **kw):
        """Send ``bodies`` (one for both paths, or a (direct, gateway) pair) both ways at
        once; compare the answers; check the direct one with ``expect``. Returns the two
        answers (None where a request failed)."""
        if not isinstance(bodies, tuple):
            bodies = (bodies, bodies)
        got: list[Response | None] = [None, None]
        cmd = command or kw.get("method", "POST")
        tally = self.run.tally

        async def one(k: int, client: EasClient):
            try:
                with trio.fail_after(self.run.timeout):
                    got[k] = await client.request(command, bodies[k], **kw)
            except (OSError, ConnectionError, trio.TooSlowError) as exc:
                await client.aclose()          # a half-read answer leaves the connection unusable
                tally.error(cmd, self.name, name, ("direct", "gateway")[k], f"{type(exc).__name__}: {exc}")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(one, 0, self.direct)
            nursery.start_soon(one, 1, self.gateway)
        d, g = got
        if d is None or g is None:
            return d, g
        da, ga = d.body, g.body
        if command == "FolderSync":
            da, ga = _mask_foldersync(da), _mask_foldersync(ga)
        what = [k for k, same in (("status", d.status == g.status), ("content-type", _ctype(d) == _ctype(g)),
                                  ("body", da == ga)) if not same]
        tally.compared(cmd, not what)
        if what:
            first = next((i for i, (a, b) in enumerate(zip(da, ga)) if a != b), min(len(da), len(ga)))
            tally.mismatches.append({"device": self.name, "user": self.user, "step": name, "command": cmd,
                                     "differs_in": what, "first_different_byte": first,
                                     "direct": _digest(d), "gateway": _digest(g)})
        if expect is not None:
            problem = expect(d)
            if problem:
                tally.error(cmd, self.name, name, "direct", problem)
        return d, g


def _want_status(*path: str, want: str = "1", status: int = 200):
    def check(r: Response) -> str | None:
        if r.status != status:
            return f"HTTP {r.status}, expected {status}"
        got = _status(r, *path)
        return None if got == want else f"Status {got!r}, expected {want}"
    return check


def _sync_ok(r: Response) -> str | None:
    if r.status != 200:
        return f"HTTP {r.status}"
    if not r.body:
        return None                                 # no changes: an empty 200
    got = _status(r, "AirSync:Collections", "AirSync:Collection", "AirSync:Status")
    return None if got == "1" else f"Sync Status {got!r}"


class Run:
    def __init__(self, a: argparse.Namespace, gw_url: str, say):
        self.a, self.say = a, say
        self.sogo = urlsplit(a.sogo_url)
        self.gw = urlsplit(gw_url)
        self.timeout = a.timeout
        self.tally = Tally()
        self.pings = {"parked_at_delivery": 0, "woken": 0, "deliveries": 0, "rounds": 0}
        self.seeded: list[str] = []

    def client(self, url, user: str, password: str, device_id: str) -> EasClient:
        ctx = ssl.create_default_context() if url.scheme == "https" else None
        port = url.port or (443 if url.scheme == "https" else 80)
        return EasClient(url.hostname, port, user, password, device_id, device_type="iPhone", version="14.1",
                         ssl_context=ctx, path=self.a.path, user_agent="Apple-iPhone15C2/2104.100")

    async def deliver(self, user: str, password: str, mime: bytes) -> None:
        host, _, port = self.a.imap.rpartition(":")
        await trio.to_thread.run_sync(imap_deliver, host or "127.0.0.1", int(port), user, password, mime)

    # -- the read-only session (the mailbox does not change meanwhile)
    async def read_session(self, p: Pair) -> None:
        await p.step("options", "", None, method="OPTIONS",
                     expect=lambda r: None if r.status == 200 else f"HTTP {r.status}")
        prov = E("Provision:Provision", E("Provision:Policies", E(
            "Provision:Policy", E("Provision:PolicyType", "MS-EAS-Provisioning-WBXML"))))
        d, g = await p.step("provision", "Provision", prov, expect=_want_status("Provision:Status"))
        keys = [text(_doc(r), "Provision:Policies", "Provision:Policy", "Provision:PolicyKey") if r else None
                for r in (d, g)]
        if all(keys):           # a server that hands out policies: acknowledge, as a device does
            acks = tuple(E("Provision:Provision", E("Provision:Policies", E(
                "Provision:Policy", E("Provision:PolicyType", "MS-EAS-Provisioning-WBXML"),
                E("Provision:PolicyKey", k), E("Provision:Status", 1)))) for k in keys)
            d, g = await p.step("provision-ack", "Provision", acks, expect=_want_status("Provision:Status"))
            for r, c in ((d, p.direct), (g, p.gateway)):
                c.policy_key = text(_doc(r), "Provision:Policies", "Provision:Policy", "Provision:PolicyKey") \
                    if r else None
        d, g = await p.step("foldersync", "FolderSync", folder_sync(),
                            expect=_want_status("FolderHierarchy:Status"))
        adds = list(kids(find(_doc(d), "FolderHierarchy:Changes"), "FolderHierarchy:Add")) if d else []
        inbox = next((text(a, "FolderHierarchy:ServerId") for a in adds
                      if text(a, "FolderHierarchy:Type") == "2"), None)
        if not inbox:
            self.tally.error("FolderSync", p.name, "foldersync", "direct", "no Inbox (folder type 2)")
            return
        p.inbox = inbox
        items = []
        for body_type in (1, 2, 4):
            d, g = await p.step(f"sync0-type{body_type}", "Sync", sync(inbox, "0"),
                                expect=lambda r: _sync_ok(r) or (None if sync_key(r, "") else "no SyncKey"))
            if d is None or g is None:
                return
            k0 = (sync_key(d, "0"), sync_key(g, "0"))
            d, g = await p.step(f"sync-type{body_type}", "Sync",
                                (sync(inbox, k0[0], body_type), sync(inbox, k0[1], body_type)), expect=_sync_ok)
            if d is None or g is None:
                return
            p.keys = [sync_key(d, k0[0]), sync_key(g, k0[1])]
            if body_type == 2:
                items = sync_adds(d)
        # fetch this run's seeded message when it is there (its attachment is known), else the first
        seeded = f"{SEARCH_WORD} check {self.tag}"
        items.sort(key=lambda a: seeded not in (text(a, "AirSync:ApplicationData", "Email:Subject") or ""))
        if items:
            server_id = text(items[0], "AirSync:ServerId")
            await p.step("itemops-mime", "ItemOperations", E("ItemOperations:ItemOperations", E(
                "ItemOperations:Fetch", E("ItemOperations:Store", "Mailbox"), E("AirSync:CollectionId", inbox),
                E("AirSync:ServerId", server_id), E("ItemOperations:Options", E("AirSync:MIMESupport", 2),
                                                    E("AirSyncBase:BodyPreference", E("AirSyncBase:Type", 4))))),
                expect=_want_status("ItemOperations:Status"))
        refs = [text(a, "AirSync:ApplicationData", "AirSyncBase:Attachments", "AirSyncBase:Attachment",
                     "AirSyncBase:FileReference") for a in items]
        ref = next((r for r in refs if r), None)
        if ref:
            fetch = E("ItemOperations:ItemOperations", E("ItemOperations:Fetch", E("ItemOperations:Store", "Mailbox"),
                                                         E("AirSyncBase:FileReference", ref)))
            await p.step("itemops-inline", "ItemOperations", fetch, expect=_want_status("ItemOperations:Status"))
            await p.step("itemops-multipart", "ItemOperations", fetch, headers={"MS-ASAcceptMultiPart": "T"},
                         expect=lambda r: None if r.status == 200 else f"HTTP {r.status}")
        await p.step("search", "Search", E("Search:Search", E("Search:Store", E("Search:Name", "Mailbox"), E(
            "Search:Query", E("Search:And", E("AirSync:Class", "Email"), E("AirSync:CollectionId", inbox),
                              E("Search:FreeText", SEARCH_WORD))), E("Search:Options", E("Search:Range", "0-9")))),
            expect=_want_status("Search:Response", "Search:Store", "Search:Status"))

    # -- Pings woken by a delivery, one account at a time
    async def ping_round(self, pairs: list[Pair], round_no: int) -> None:
        user, password = pairs[0].user, pairs[0].password
        self.pings["rounds"] += 1

        async def catch_up(p: Pair):
            # Every device at the mailbox's current state first: Sync until nothing is new.
            # SOGo (as EAS servers do) keeps a device's state at the last key the device
            # *used*, so a Ping after a Sync that handed out a new key finds "changes" at once.
            for _ in range(3):
                d, g = await p.step("sync-catch-up", "Sync", (sync(p.inbox, p.keys[0], 2),
                                                              sync(p.inbox, p.keys[1], 2)), expect=_sync_ok)
                if d is None or g is None or not d.body:
                    return
                p.keys = [sync_key(d, p.keys[0]), sync_key(g, p.keys[1])]

        async with trio.open_nursery() as nursery:
            for p in pairs:
                nursery.start_soon(catch_up, p)
        outstanding = [0]
        subject = f"seg-fast sogo fleet wake {self.tag} {round_no}"

        async def park(p: Pair):
            ping = E("Ping:Ping", E("Ping:HeartbeatInterval", str(self.a.heartbeat)),
                     E("Ping:Folders", E("Ping:Folder", E("Ping:Id", p.inbox), E("Ping:Class", "Email"))))
            outstanding[0] += 2
            d, g = await p.step("ping", "Ping", ping, expect=_want_status("Ping:Status", want="2"))
            outstanding[0] -= 2
            self.pings["woken"] += sum(1 for r in (d, g) if r is not None and _status(r, "Ping:Status") == "2")

        async with trio.open_nursery() as nursery:
            for p in pairs:
                nursery.start_soon(park, p)
            # SOGo looks for changes every SOGoInternalSyncInterval: give the Pings time to
            # park first; one that arrives late is still answered Status 2 (its device's
            # state is behind), it just does not count as parked.
            await trio.sleep(self.a.park_wait)
            self.pings["parked_at_delivery"] += outstanding[0]
            await self.deliver(user, password, message(user, subject, attach=False))
            self.pings["deliveries"] += 1

        async def after(p: Pair):
            d, g = await p.step("sync-after-ping", "Sync", (sync(p.inbox, p.keys[0], 2), sync(p.inbox, p.keys[1], 2)),
                                expect=lambda r: _sync_ok(r) or (None if subject.encode() in r.body
                                                                 else "the delivered message is not in the Sync"))
            if d is not None and g is not None:
                p.keys = [sync_key(d, p.keys[0]), sync_key(g, p.keys[1])]

        async with trio.open_nursery() as nursery:
            for p in pairs:
                nursery.start_soon(after, p)

    async def main(self, accounts: list[tuple[str, str]]) -> dict:
        a = self.a
        self.tag = secrets.token_hex(3).upper()
        t0 = time.monotonic()
        if a.imap:              # something to Sync, fetch and search in every account
            for user, password in accounts:
                await self.deliver(user, password, message(user, f"seg-fast sogo {SEARCH_WORD} check {self.tag}",
                                                           attach=True))
                self.seeded.append(user)
        # An account's first FolderSync ever is where SOGo creates its personal calendar,
        # tasks and contacts folders; a concurrent one may answer without them. One
        # FolderSync per account first (straight to SOGo, not compared) settles that.
        for k, (user, password) in enumerate(accounts):
            warm = self.client(self.sogo, user, password, f"SF{self.tag}W{k:02d}")
            try:
                with trio.fail_after(self.timeout):
                    r = await warm.request("FolderSync", folder_sync())
                if r.status != 200 or _status(r, "FolderHierarchy:Status") != "1":
                    self.tally.error("FolderSync", f"warm-up-{k:02d}", "warm-up", "direct",
                                     f"HTTP {r.status}, Status {_status(r, 'FolderHierarchy:Status')!r}")
            except (OSError, ConnectionError, trio.TooSlowError) as exc:
                self.tally.error("FolderSync", f"warm-up-{k:02d}", "warm-up", "direct", f"{type(exc).__name__}: {exc}")
            finally:
                await warm.aclose()
        pairs = [Pair(n, *accounts[n % len(accounts)], self.tag, self) for n in range(a.devices)]
        limit = trio.Semaphore(a.concurrency)

        async def session(p: Pair):
            async with limit:
                await self.read_session(p)

        try:
            async with trio.open_nursery() as nursery:
                for p in pairs:
                    nursery.start_soon(session, p)
            self.say(f"read sessions done: {sum(c['compared'] for c in self.tally.commands.values())} answers "
                     f"compared")
            if a.imap and a.pings:
                per_round = max(1, a.max_parked // 2)
                round_no = 0
                for user, _ in accounts:
                    mine = [p for p in pairs if p.user == user and p.inbox]
                    for k in range(0, len(mine), per_round):
                        round_no += 1
                        await self.ping_round(mine[k:k + per_round], round_no)
                self.say(f"ping rounds done: {self.pings}")
        finally:
            for p in pairs:
                await p.aclose()
        return self.report(accounts, time.monotonic() - t0)

    def report(self, accounts, seconds: float) -> dict:
        t = self.tally
        compared = sum(c["compared"] for c in t.commands.values())
        expected_pings = 2 * self.a.devices if (self.a.imap and self.a.pings) else 0
        problems = []
        if t.mismatches:
            problems.append(f"{len(t.mismatches)} answers differ from SOGo's direct answer")
        if t.errors:
            problems.append(f"{len(t.errors)} errors")
        if not compared:
            problems.append("nothing compared")
        if self.pings["woken"] < expected_pings:
            problems.append(f"{self.pings['woken']} of {expected_pings} Pings woken")
        if self.pings["parked_at_delivery"] < expected_pings:
            # every device was at the mailbox's state: a Ping answered before the delivery
            # had nothing to report (or the account got other mail meanwhile)
            problems.append(f"{expected_pings - self.pings['parked_at_delivery']} Pings answered before the "
                            "delivery (try a larger --park-wait)")
        passed = not problems
        pings = (f", {self.pings['woken']} Pings woken by {self.pings['deliveries']} deliveries "
                 f"({self.pings['parked_at_delivery']} parked when the mail came)" if expected_pings
                 else ", no Pings (" + ("--no-pings" if self.a.imap else "no --imap to deliver with") + ")")
        verdict = (f"sogo correctness: {'PASS' if passed else 'FAIL'}: {self.a.devices} devices over "
                   f"{len(accounts)} accounts, {compared} answers through the gateway compared with SOGo's "
                   f"direct answers, {len(t.mismatches)} mismatches, {len(t.errors)} errors{pings}"
                   + ("" if passed else " (" + "; ".join(problems) + ")"))
        return {"upstream": "sogo", "verdict": verdict, "pass": passed, "claims": "correctness only, not capacity",
                "sogo_url": self.a.sogo_url, "gateway": self.gw.geturl(),
                "gateway_started": not self.a.gateway, "devices": self.a.devices,
                "accounts": [u for u, _ in accounts], "seeded": self.seeded, "seconds": round(seconds, 2),
                "compared": compared, "commands": dict(sorted(t.commands.items())), "pings": self.pings,
                "mismatches": t.mismatches, "errors": t.errors,
                "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


# -- the gateway this run starts ---------------------------------------------------------

@contextlib.contextmanager
def started_gateway(upstream: str, workdir: Path):
    """`seg-fast serve` on a loopback port, pass-through (no policy loaded, every device
    allowed, attachments not blocked): yields its URL."""
    from seg_fast.sim.sizing import child_env, free_port
    port = free_port("127.0.0.1")
    cfg = workdir / "gateway.toml"
    cfg.write_text(
        'workers = 1\n[admin]\nenabled = false\n[timeouts]\nshutdown_grace = 2\n'
        f'[listener]\nhost = "127.0.0.1"\nport = {port}\n'
        f'[upstream]\nurl = "{upstream}"\n'
        f'[log]\ntransactions = "{workdir / "transactions.jsonl"}"\nlevel = "warn"\n'
        f'[policy]\nallow_if_no_policies = true\nsqlite_path = "{workdir / "policy.db"}"\n'
        '[security]\nblock_attachments_without_policy = false\n'
        f'master_key_file = "{workdir / "master.key"}"\nkey_state_file = "{workdir / "keys.json"}"\n')
    env = child_env() | {"SEG_FAST_STATE_DIR": str(workdir / "state")}
    err = open(workdir / "gateway.err", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "seg_fast", "serve", "--config", str(cfg)], cwd=workdir,
                            env=env, stdout=subprocess.DEVNULL, stderr=err)
    err.close()
    try:
        yield proc, f"http://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def _wait_up(url, proc, workdir: Path, timeout: float = 30.0) -> None:
    with trio.fail_after(timeout):
        while True:
            try:
                s = await trio.open_tcp_stream(url.hostname, url.port or (443 if url.scheme == "https" else 80))
                await s.aclose()
                return
            except OSError:
                if proc is not None and proc.poll() is not None:
                    raise RuntimeError("seg-fast serve exited: "
                                       + (workdir / "gateway.err").read_text(errors="replace")[-1500:])
                await trio.sleep(0.1)


# -- command line ------------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="seg-fast bench sizing",
        description="a small correctness run against a real SOGo: each device's session straight to SOGo and "
                    "through the gateway, every gateway answer compared with SOGo's direct answer "
                    "(not a capacity figure)")
    ap.add_argument("--upstream", choices=("sogo",), required=True)
    ap.add_argument("--sogo-url", required=True, help="where SOGo's ActiveSync answers, e.g. http://sogo:80 "
                                                      f"(requests go to URL{EAS_PATH})")
    ap.add_argument("--path", default=EAS_PATH, help="the ActiveSync path (default %(default)s)")
    ap.add_argument("--users", type=Path, help="file: one user:password per line")
    ap.add_argument("--user", action="append", default=[], metavar="USER:PASSWORD",
                    help="an account (repeatable; prefer --users: a command line is visible to others)")
    ap.add_argument("--devices", type=int, default=4, help=f"devices (1..{MAX_DEVICES}), round-robin over the accounts")
    ap.add_argument("--gateway", default="", help="an already running gateway's URL (default: start "
                                                  "`seg-fast serve` in front of --gateway-upstream)")
    ap.add_argument("--gateway-upstream", default="", help="where the started gateway sends (default --sogo-url)")
    ap.add_argument("--imap", default="", metavar="HOST:PORT",
                    help="SOGo's IMAP server: deliver with each account's password (a seed message, "
                         "and the mail that wakes the Pings); without it no mail is delivered and no Ping runs")
    ap.add_argument("--pings", action=argparse.BooleanOptionalAction, default=True,
                    help="park Pings and wake them with a delivery (needs --imap)")
    ap.add_argument("--max-parked", type=int, default=4,
                    help="Pings parked at once (each holds one sogod worker; SOGo's default is 3 workers, "
                         "the test stack's 6)")
    ap.add_argument("--park-wait", type=float, default=2.0, help="s between parking the Pings and the delivery")
    ap.add_argument("--heartbeat", type=int, default=120, help="Ping HeartbeatInterval, s")
    ap.add_argument("--concurrency", type=int, default=4, help="device sessions at once")
    ap.add_argument("--timeout", type=float, default=60.0, help="per request, s")
    ap.add_argument("--out", default="", help="directory for the JSON report (default benchmarks/results)")
    ap.add_argument("--quiet", action="store_true")
    return ap


def cli(argv: list[str]) -> int:
    """``argv``: what follows ``seg-fast bench sizing``. Exit 0 on PASS, 1 on FAIL, 2 on bad use."""
    a = parser().parse_args(argv)
    try:
        accounts = read_users(a.users) if a.users else []
    except (OSError, ValueError) as exc:
        print(f"seg-fast bench sizing: --users: {exc}", file=sys.stderr)
        return 2
    for spec in a.user:
        user, sep, password = spec.partition(":")
        if not sep or not user or not password:
            print("seg-fast bench sizing: --user takes USER:PASSWORD", file=sys.stderr)
            return 2
        accounts.append((user, password))
    if not accounts:
        print("seg-fast bench sizing: --upstream sogo needs accounts (--users FILE or --user USER:PASSWORD)",
              file=sys.stderr)
        return 2
    if not 1 <= a.devices <= MAX_DEVICES:
        print(f"seg-fast bench sizing: --upstream sogo runs 1..{MAX_DEVICES} devices (a correctness run; "
              "SOGo's workers, not the gateway, bound it)", file=sys.stderr)
        return 2
    if a.max_parked < 2:
        print("seg-fast bench sizing: --max-parked must be at least 2 (a direct and a gateway Ping)",
              file=sys.stderr)
        return 2
    if urlsplit(a.sogo_url).scheme not in ("http", "https") or not urlsplit(a.sogo_url).hostname:
        print("seg-fast bench sizing: --sogo-url must be http(s)://host[:port]", file=sys.stderr)
        return 2

    def say(msg: str) -> None:
        if not a.quiet:
            print(msg, flush=True)

    async def go(workdir: Path) -> dict:
        if a.gateway:
            url = a.gateway
            await _wait_up(urlsplit(url), None, workdir, 10.0)
            return await Run(a, url, say).main(accounts)
        with started_gateway(a.gateway_upstream or a.sogo_url, workdir) as (proc, url):
            await _wait_up(urlsplit(url), proc, workdir)
            say(f"gateway: seg-fast serve at {url} in front of {a.gateway_upstream or a.sogo_url}")
            return await Run(a, url, say).main(accounts)

    with tempfile.TemporaryDirectory(prefix="seg-fast-sogo-fleet-") as tmp:
        try:
            report = trio.run(go, Path(tmp))
        except (RuntimeError, trio.TooSlowError, OSError) as exc:
            print(f"seg-fast bench sizing: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
    from seg_fast.sim.sizing import RESULTS
    out = Path(a.out) if a.out else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"sogo-fleet-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.json"
    path.write_bytes(msgspec.json.format(msgspec.json.encode(report)))
    summary = {k: report[k] for k in ("pass", "devices", "compared", "commands", "pings")} | {
        "mismatches": len(report["mismatches"]), "errors": len(report["errors"])}
    print(msgspec.json.format(msgspec.json.encode(summary)).decode())
    print(report["verdict"])
    print(f"wrote {path}")
    return 0 if report["pass"] else 1
