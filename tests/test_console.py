"""The console's server side over real loopback sockets, on a real SQLite store: login
(session cookie, CSRF), web-safety headers, the list view's filters/search/sort/paging,
bulk actions with their confirmation, the audit log, and Dx targets."""
from __future__ import annotations

import json
import os
import stat
import time

import pytest
import trio

from http_client import request
from seg_fast import dx
from seg_fast.admin.server import AdminServer
from seg_fast.config import AdminSettings, Config
from seg_fast.observe import Transaction
from seg_fast.policy.model import DeviceRecord, DeviceSighting
from seg_fast.policy.settings import PolicySettings
from seg_fast.stats import Stats

TOKEN = "console-token-7Hq"
NOW = time.time()


@pytest.fixture
async def admin(tmp_path, nursery):
    cfg = Config(state_dir=str(tmp_path), admin=AdminSettings(port=0, token=TOKEN),
                 policy=PolicySettings(sqlite_path=str(tmp_path / "p.db")))
    server = AdminServer(cfg)
    await nursery.start(server.gate.run)
    server.port = await nursery.start(server.listen, "127.0.0.1", 0)
    return server


async def call(server, method, path, body=None, *, token=None, cookie=None, csrf=None):
    raw = b"" if body is None else json.dumps(body).encode()
    headers = []
    if cookie:
        headers.append((b"cookie", cookie.encode()))
    if csrf:
        headers.append((b"x-csrf-token", csrf.encode()))
    status, hdrs, out = await request(server.port, method, path, raw, token=token, headers=headers)
    ctype = hdrs.get("content-type", "")
    return status, hdrs, (json.loads(out) if ctype == "application/json" else out)


async def login(server, name="alice"):
    status, hdrs, body = await call(server, "POST", "/seg/session", {"token": TOKEN, "name": name})
    assert status == 200, body
    cookie = hdrs["set-cookie"]
    return cookie.split(";", 1)[0], body["csrf"], cookie


async def test_login_session_csrf_and_headers(admin):
    # The page itself is open and locked down.
    status, hdrs, page = await call(admin, "GET", "/seg/admin")
    assert status == 200 and b"<script" in page
    csp = hdrs["content-security-policy"]
    assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert b"<script>" not in page and b" style=" not in page and b"onclick" not in page   # nothing inline
    for asset, ctype in (("console.js", "text/javascript"), ("console.css", "text/css")):
        status, hdrs, _ = await call(admin, "GET", f"/seg/admin/{asset}")
        assert status == 200 and hdrs["content-type"].startswith(ctype)
    assert (await call(admin, "GET", "/seg/admin/../server.py"))[0] == 404
    # A wrong token gets no session.
    status, hdrs, _ = await call(admin, "POST", "/seg/session", {"token": "nope"})
    assert status == 401 and "set-cookie" not in hdrs
    cookie, csrf, full = await login(admin)
    attrs = [a.strip().lower() for a in full.split(";")]
    assert "httponly" in attrs and "samesite=strict" in attrs and any(a.startswith("max-age=") for a in attrs)
    # The cookie reads; a state change needs the CSRF token too.
    assert (await call(admin, "GET", "/seg/console/dashboard", cookie=cookie))[0] == 200
    assert (await call(admin, "GET", "/seg/session", cookie=cookie))[2]["csrf"] == csrf
    status, _, body = await call(admin, "POST", "/seg/testmode", {"enabled": True}, cookie=cookie)
    assert status == 403 and "CSRF" in body["error"]
    assert (await call(admin, "POST", "/seg/testmode", {"enabled": True}, cookie=cookie, csrf="forged"))[0] == 403
    assert (await call(admin, "POST", "/seg/testmode", {"enabled": False}, cookie=cookie, csrf=csrf))[0] == 200
    assert (await call(admin, "GET", "/seg/console/dashboard", cookie="seg_session=made-up"))[0] == 401
    # Log out: the cookie is worthless afterwards.
    assert (await call(admin, "DELETE", "/seg/session", cookie=cookie, csrf=csrf))[0] == 200
    assert (await call(admin, "GET", "/seg/console/dashboard", cookie=cookie))[0] == 401
    # The audit log names who did what.
    _, _, audit = await call(admin, "GET", "/seg/console/audit", token=TOKEN)
    actions = [(e["who"].split("@")[0], e["action"]) for e in audit["entries"]]
    assert ("alice", "login") in actions and ("alice", "test_mode") in actions and ("alice", "logout") in actions


def sighting(i: int, **kw) -> DeviceSighting:
    base = dict(device_id=f"DEV{i:03d}", user=f"user{i % 7}@corp.example", device_type="iPhone" if i % 2 else "Android",
                mail_client="Apple-iPhone/1" if i % 2 else "Android-Mail/2", node="gw1/100", ip="10.0.0.1",
                first_seen=NOW - 86400 * 40, last_seen=NOW - 3600 * i, last_command="Sync",
                status="blocked" if i % 3 == 0 else "allowed",
                reason="blocked.device_compromised" if i % 3 == 0 else "allowed.compliant", http_status=200)
    base.update(kw)
    return DeviceSighting(**base)


async def seed(admin, n=60):
    store = admin.gate.store
    await store.put_sightings([sighting(i) for i in range(n)])
    await store.put_devices([DeviceRecord(device_id=f"DEV{i:03d}", managed=True, platform="Apple", model="iPhone 15",
                                          os="17.4") for i in range(0, n, 2)])
    await admin.gate.catch_up()
    admin.api.index_dirty = True


async def test_list_filters_sort_paging(admin):
    await seed(admin)
    devs = [sighting(i) for i in range(60)]
    q = lambda s: call(admin, "GET", "/seg/console/devices?" + s, token=TOKEN)
    status, _, body = await q("limit=10")
    assert status == 200 and body["total"] == 60 and len(body["devices"]) == 10
    # Default order: most recently seen first.
    assert [d["device_id"] for d in body["devices"]] == [d.device_id for d in sorted(devs, key=lambda d: -d.last_seen)][:10]
    status, _, body = await q("status=blocked&limit=500")
    assert body["total"] == sum(1 for d in devs if d.status == "blocked")
    assert {d["status"] for d in body["devices"]} == {"blocked"}
    _, _, body = await q("managed=true&limit=500")
    assert body["total"] == 30 and all(d["platform"] == "Apple" for d in body["devices"])
    _, _, body = await q("violation=true&managed=false")
    assert body["total"] == sum(1 for i, d in enumerate(devs) if d.status == "blocked" and i % 2)
    _, _, body = await q("q=user3%40corp&limit=500")
    assert body["total"] == sum(1 for d in devs if d.user == "user3@corp.example")
    _, _, body = await q("seen_within_days=1&limit=500")
    assert body["total"] == sum(1 for d in devs if d.last_seen >= time.time() - 86400)
    _, _, body = await q("sort=device_id&order=asc&offset=20&limit=5")
    assert [d["device_id"] for d in body["devices"]] == [f"DEV{i:03d}" for i in range(20, 25)]
    assert (await q("sort=password"))[0] == 400
    assert (await q("colour=red"))[0] == 400


async def test_bulk_override_confirmation_and_delete(admin):
    await seed(admin)
    cookie, csrf, _ = await login(admin, "bob")
    flt = {"status": "blocked", "platform": "apple"}
    _, _, listed = await call(admin, "GET", "/seg/console/devices?status=blocked&platform=apple&limit=500", cookie=cookie)
    n = listed["total"]
    assert n > 0
    # A count that does not match what the filter selects now is refused (confirm again).
    status, _, body = await call(admin, "POST", "/seg/console/override/whitelist", {"filter": flt, "expected": n + 1},
                                 cookie=cookie, csrf=csrf)
    assert status == 409
    assert (await call(admin, "POST", "/seg/console/override/whitelist", {"expected": 60},
                       cookie=cookie, csrf=csrf))[0] == 400        # never every device by accident
    status, _, body = await call(admin, "POST", "/seg/console/override/whitelist", {"filter": flt, "expected": n},
                                 cookie=cookie, csrf=csrf)
    assert status == 200 and body["devices"] == n
    for d in listed["devices"]:
        assert (await admin.gate.store.get_device(d["device_id"])).override == "whitelist"
    # Unmanaged devices not seen for 30+ hours: sightings go, the rest stay.
    stale = [f"DEV{i:03d}" for i in range(60) if i % 2 and i > 30]
    status, _, body = await call(admin, "POST", "/seg/console/delete-unmanaged/1.25", {"expected": len(stale)},
                                 cookie=cookie, csrf=csrf)
    assert status == 200 and body["deleted"] == len(stale)
    left = {s.device_id for s in await admin.gate.store.sightings()}
    assert left == {f"DEV{i:03d}" for i in range(60)} - set(stale)
    _, _, audit = await call(admin, "GET", "/seg/console/audit", token=TOKEN)
    acts = {e["action"]: e for e in audit["entries"]}
    assert acts["bulk_override"]["count"] == n and acts["bulk_override"]["who"].startswith("bob@")
    assert acts["delete_unmanaged"]["count"] == len(stale)
    mode = stat.S_IMODE(os.stat(admin.api.audit.path).st_mode)
    assert mode == 0o600


async def test_dashboard_aggregates(admin):
    await seed(admin)
    _, _, d = await call(admin, "GET", "/seg/console/dashboard", token=TOKEN)
    devs = [sighting(i) for i in range(60)]
    assert d["devices"] == 60
    assert d["by_status"]["blocked"] == sum(1 for x in devs if x.status == "blocked")
    assert d["by_reason"]["blocked.device_compromised"] == d["by_status"]["blocked"]
    assert d["seen_last_24h_by_status"]["allowed"] == sum(
        1 for x in devs if x.status == "allowed" and x.last_seen >= time.time() - 86400)
    assert d["managed"] == 30 and d["unmanaged"] == 30


async def test_dx_targets_and_capture(admin, tmp_path):
    cookie, csrf, _ = await login(admin)
    status, _, t = await call(admin, "POST", "/seg/dx", {"kind": "device", "target": "Dev-7"}, cookie=cookie, csrf=csrf)
    assert status == 200 and 59 * 60 < t["until"] - time.time() <= 3600
    assert (await call(admin, "POST", "/seg/dx", {"kind": "printer", "target": "x"}, cookie=cookie, csrf=csrf))[0] == 400
    await call(admin, "POST", "/seg/dx", {"kind": "user", "target": "CORP\\Carol", "minutes": 5}, token=TOKEN)
    _, _, listed = await call(admin, "GET", "/seg/dx", token=TOKEN)
    assert {(x["kind"], x["target"]) for x in listed["targets"]} == {("device", "Dev-7"), ("user", "CORP\\Carol")}
    # A worker's side: it follows the targets file and writes the targeted transactions only.
    stats = Stats()
    stats.dx.directory = tmp_path / "dx"
    stats.dx.refresh()
    assert stats.dx.active
    recs = [Transaction(ts=0, method="POST", command="Sync", device_id="DEV-7", user="dave", status=200,
                        decision="allowed.compliant"),
            Transaction(ts=0, method="POST", command="Ping", device_id="OTHER", user="carol@corp.example", status=200),
            Transaction(ts=0, method="POST", command="Sync", device_id="NOBODY", user="erin", status=200)]
    for r in recs:
        stats.tx(r)
    _, hdrs, log = await call(admin, "GET", "/seg/dx/device/Dev-7/log", token=TOKEN)
    lines = [json.loads(x) for x in log.splitlines()]
    assert [x["device_id"] for x in lines] == ["DEV-7"] and "attachment" in hdrs["content-disposition"]
    _, _, log = await call(admin, "GET", "/seg/dx/user/carol/log", token=TOKEN)
    assert [json.loads(x)["device_id"] for x in log.splitlines()] == ["OTHER"]
    for name in os.listdir(tmp_path / "dx"):
        assert stat.S_IMODE(os.stat(tmp_path / "dx" / name).st_mode) == 0o600
    # Stopped: the worker stops writing once it re-reads the list.
    assert (await call(admin, "DELETE", "/seg/dx/device/DEV-7", cookie=cookie, csrf=csrf))[2]["stopped"] is True
    os.utime(tmp_path / "dx" / dx.TARGETS, (time.time() + 5, time.time() + 5))    # mtime granularity
    stats.dx.refresh()
    stats.tx(recs[0])
    _, _, log = await call(admin, "GET", "/seg/dx/device/Dev-7/log", token=TOKEN)
    assert len(log.splitlines()) == 1


def test_dx_rotation(tmp_path):
    dx.start(tmp_path, "device", "ROT", 10)
    d = dx.Dx(tmp_path, max_bytes=2000)
    d.refresh()
    rec = Transaction(ts=0, method="POST", command="Sync", device_id="ROT", status=200)
    for _ in range(40):
        d.capture(rec)
    name = dx.log_name("device", "ROT")
    assert (tmp_path / (name + ".1")).exists() and os.path.getsize(tmp_path / name) <= 2000
    assert len(dx.read_log(tmp_path, "device", "ROT").splitlines()) <= 40


async def test_login_attempts_are_limited(admin):
    from seg_fast.admin.server import LOGIN_ATTEMPTS
    for _ in range(LOGIN_ATTEMPTS):
        assert (await call(admin, "POST", "/seg/session", {"token": "guess"}))[0] == 401
    status, _, body = await call(admin, "POST", "/seg/session", {"token": "guess"})
    assert status == 429
    # Even the right token waits out the window from that address.
    assert (await call(admin, "POST", "/seg/session", {"token": TOKEN}))[0] == 429


async def test_rotate_attachment_key(admin, tmp_path):
    from seg_fast.content.keys import Keyring
    await seed(admin, 4)
    cookie, csrf, _ = await login(admin)
    _, _, d = await call(admin, "GET", "/seg/console/device/DEV001", cookie=cookie)
    assert d["key_generation"] == 0
    status, _, body = await call(admin, "POST", "/seg/console/device/DEV001/rotate-key", cookie=cookie, csrf=csrf)
    assert status == 200 and body["key_generation"] == 1
    # The key state file every worker reads says so too.
    assert Keyring.from_settings(admin.config.security).generation("DEV001") == 1
    _, _, d = await call(admin, "GET", "/seg/console/device/DEV001", cookie=cookie)
    assert d["key_generation"] == 1


async def test_decision_trace_names_each_policy(admin):
    from seg_fast.policy.model import ManagedDevicePolicies, PolicyDocument
    await admin.gate.store.replace_all(
        PolicyDocument(managed=ManagedDevicePolicies(compromised=True, encryption=True)),
        [DeviceRecord(device_id="TR1", managed=True, compromised=True, encrypted=True)])
    await admin.gate.store.put_sightings([sighting(1, device_id="TR1"), sighting(2, device_id="TR2")])
    await admin.gate.catch_up()
    _, _, d = await call(admin, "GET", "/seg/console/device/TR1", token=TOKEN)
    steps = {s["step"]: s["result"] for s in d["trace"]}
    assert steps["policy: compromised"] == "blocks (blocked.device_compromised)"
    assert steps["policy: encryption"] == "passes"
    assert steps["policy: user"] == "off" and steps["policy: MDM inactivity"] == "off"
    assert steps["decision"] == "blocked.device_compromised" and d["trace"][-1]["step"] == "decision"
    # Unmanaged (no record): the managed-device policies do not apply to it.
    _, _, d = await call(admin, "GET", "/seg/console/device/TR2", token=TOKEN)
    steps = {s["step"]: s["result"] for s in d["trace"]}
    assert steps["policy: managed device policies"] == "not applied (unmanaged device)"
    assert "policy: compromised" not in steps and steps["decision"] == "allowed.compliant"


async def test_bulk_compliance_keys_and_dx_over_a_filter(admin, tmp_path):
    from seg_fast import dx as dxmod
    from seg_fast.content.keys import Keyring
    from seg_fast.policy.model import ManagedDevicePolicies, PolicyDocument
    await seed(admin, 12)
    # The stored sightings say "allowed.compliant" for DEV001 but its record is now compromised.
    await admin.gate.store.put_document(PolicyDocument(managed=ManagedDevicePolicies(compromised=True)))
    await admin.gate.store.put_devices([DeviceRecord(device_id=f"DEV{i:03d}", managed=True, compromised=True)
                                        for i in range(12)])
    await admin.gate.catch_up()
    admin.api.index_dirty = True
    cookie, csrf, _ = await login(admin, "carol")
    flt = {"device_type": "iphone"}                 # the odd ones: 6 devices
    n = (await call(admin, "GET", "/seg/console/devices?device_type=iphone", cookie=cookie))[2]["total"]
    assert n == 6
    assert (await call(admin, "POST", "/seg/console/compliance", {"filter": flt, "expected": 5},
                       cookie=cookie, csrf=csrf))[0] == 409
    status, _, body = await call(admin, "POST", "/seg/console/compliance", {"filter": flt, "expected": n},
                                 cookie=cookie, csrf=csrf)
    assert status == 200 and body["devices"] == n and body["reasons"] == {"blocked.device_compromised": n}
    by_id = {s.device_id: s for s in await admin.gate.store.sightings()}
    assert {i for i, s in by_id.items() if s.reason == "blocked.device_compromised"} == \
        {f"DEV{i:03d}" for i in range(12) if i % 2 or i % 3 == 0}     # the filter's, and those blocked before
    status, _, body = await call(admin, "POST", "/seg/console/compliance", {"ids": ["DEV000"], "expected": 1},
                                 cookie=cookie, csrf=csrf)
    assert status == 200 and body["devices"] == 1 and body["reasons"] == {"blocked.device_compromised": 1}
    # New attachment keys for the filter's devices only.
    ring = Keyring.from_settings(admin.config.security)
    before = [ring.generation(f"DEV{i:03d}") for i in range(4)]
    status, _, body = await call(admin, "POST", "/seg/console/rotate-key", {"filter": flt, "expected": n},
                                 cookie=cookie, csrf=csrf)
    assert status == 200 and body["devices"] == n
    ring = Keyring.from_settings(admin.config.security)
    assert [ring.generation(f"DEV{i:03d}") for i in range(4)] == [g + i % 2 for i, g in enumerate(before)]
    # Dx over the filter, then stopped; more than the cap is refused.
    status, _, body = await call(admin, "POST", "/seg/console/dx/start", {"filter": flt, "expected": n, "minutes": 5},
                                 cookie=cookie, csrf=csrf)
    assert status == 200 and body["started"] == n
    targets = dxmod.read_targets(dxmod.dx_dir(admin.config))
    assert sorted(t.target for t in targets) == [f"DEV{i:03d}" for i in range(1, 12, 2)]
    assert all(280 < t.until - time.time() <= 300 for t in targets)
    status, _, body = await call(admin, "POST", "/seg/console/dx/stop", {"filter": flt, "expected": n},
                                 cookie=cookie, csrf=csrf)
    assert status == 200 and body["stopped"] == n and not dxmod.read_targets(dxmod.dx_dir(admin.config))
    await seed(admin, 60)
    many = (await call(admin, "GET", "/seg/console/devices?q=dev", cookie=cookie))[2]["total"]
    assert (await call(admin, "POST", "/seg/console/dx/start", {"filter": {"q": "dev"}, "expected": many},
                       cookie=cookie, csrf=csrf))[0] == 400
    _, _, audit = await call(admin, "GET", "/seg/console/audit", token=TOKEN)
    acts = [e["action"] for e in audit["entries"] if e["who"].startswith("carol@")]
    assert {"run_compliance", "rotate_key", "dx_start", "dx_stop"} <= set(acts)


def test_recent_transactions_and_identifying_headers(tmp_path):
    from seg_fast.admin.console import identifying_headers, recent_transactions
    log = tmp_path / "tx.jsonl"
    lines = []
    for i in range(300):
        dev = ["PHONE1", "phone10", "OTHER"][i % 3]
        lines.append(json.dumps({"ts": 1000.0 + i, "method": "POST", "command": ["Sync", "Ping"][i % 2],
                                 "device_id": dev, "user": "phone1@corp.example", "status": 200,
                                 "decision": "allowed.compliant"}))
    log.write_text("\n".join(lines) + "\n{broken")
    got = recent_transactions(str(log), "Phone1", n=5)
    want = [json.loads(x) for x in lines if json.loads(x)["device_id"] == "PHONE1"][::-1][:5]
    assert [g["ts"] for g in got] == [w["ts"] for w in want]           # newest first, this device only
    assert [g["command"] for g in got] == [w["command"] for w in want]
    assert recent_transactions("-", "PHONE1") == [] and recent_transactions("", "PHONE1") == []
    assert recent_transactions(str(tmp_path / "missing"), "PHONE1") == []
    dx_log = "\n".join(json.dumps(e) for e in [
        {"ts": 1.0, "command": "Sync", "request_headers": [["User-Agent", "old"], ["MS-ASProtocolVersion", "12.1"]]},
        {"ts": 2.0, "command": "Ping", "request_headers": [["User-Agent", "Apple-iPhone/2"], ["Cookie", "x=1"],
                                                           ["MS-ASProtocolVersion", "16.1"]]},
        {"ts": 3.0, "command": "Sync"}]).encode()
    ident = identifying_headers(dx_log)
    assert ident["protocol_version"] == "16.1" and ident["ts"] == 2.0
    assert ident["headers"] == [["User-Agent", "Apple-iPhone/2"], ["MS-ASProtocolVersion", "16.1"]]   # no cookie
    assert identifying_headers(b"") == {}
    # The protocol version: every transaction record carries it, the newest one's is shown;
    # only a device with none in the log falls back to its last Dx line.
    from seg_fast.admin.console import protocol_version
    log.write_text("\n".join(json.dumps({"ts": float(i), "method": "POST", "command": "Sync", "device_id": "PHONE1",
                                         "status": 200, **({"protocol_version": v} if v else {})})
                             for i, v in enumerate(["12.1", "16.1", None])) + "\n")
    got = recent_transactions(str(log), "PHONE1")
    assert [g.get("protocol_version") for g in got] == [None, "16.1", "12.1"]
    assert protocol_version(got, {}) == "16.1"
    assert protocol_version([], ident) == "16.1" and protocol_version([], {}) == ""
