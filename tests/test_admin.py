"""The admin API over real loopback sockets, on a real SQLite store."""
from __future__ import annotations

import csv
import io
import json

import msgspec
import pytest
import trio

from http_client import request
from seg_fast.admin.server import AdminServer, admin_token, token_path
from seg_fast.config import AdminSettings, Config
from seg_fast.eas.request import EasRequest
from seg_fast.policy.gate import PolicyGatekeeper
from seg_fast.policy.model import DeviceSighting
from seg_fast.policy.settings import PolicySettings

TOKEN = "admintoken"
PUSH = "pushtoken"


def config(tmp_path, **policy) -> Config:
    return Config(state_dir=str(tmp_path), admin=AdminSettings(port=0, token=TOKEN),
                  policy=PolicySettings(sqlite_path=str(tmp_path / "p.db"), push_token=PUSH, **policy))


@pytest.fixture
async def admin(tmp_path, nursery):
    server = AdminServer(config(tmp_path))
    await nursery.start(server.gate.run)
    server.port = await nursery.start(server.listen, "127.0.0.1", 0)
    return server


async def call(server, method, path, body=None, token=TOKEN):
    raw = b"" if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    status, headers, out = await request(server.port, method, path, raw, token=token)
    return status, (json.loads(out) if headers.get("content-type") == "application/json" else out)


async def eventually(check, timeout=10.0):
    with trio.fail_after(timeout):
        while not check():
            await trio.sleep(0.02)


async def test_token_required(admin):
    assert (await call(admin, "GET", "/seg/diagnostic/cluster", token=None))[0] == 401
    assert (await call(admin, "GET", "/seg/diagnostic/cluster", token="wrong"))[0] == 401
    assert (await call(admin, "GET", "/seg/policy/segconfig", token=PUSH))[0] == 401
    assert (await call(admin, "POST", "/seg/push", {"devices": []}, token=TOKEN))[0] == 401
    status, body = await call(admin, "GET", "/seg/diagnostic/cluster")
    assert status == 200 and body["store"] == "sqlite" and body["policies_loaded"] is False
    assert (await call(admin, "GET", "/seg/nothing"))[0] == 404
    assert (await call(admin, "DELETE", "/seg/diagnostic/cluster"))[0] == 405


async def test_policy_lookups(admin):
    doc = {"general": {"managed_device_only": True,
                       "device_type": {"enabled": True, "mode": "block", "values": ["WP8"]},
                       "mail_client": {"enabled": True, "values": ["Apple-iPhone*"]},
                       "user": {"enabled": True, "mode": "block", "values": ["mallory"]}}}
    status, body = await call(admin, "PUT", "/seg/policy/document", doc)
    assert status == 200
    await eventually(lambda: admin.gate.engine.policies is not None)
    status, body = await call(admin, "GET", "/seg/policy/generalaccess")
    assert status == 200 and body["general"]["managed_device_only"] is True
    assert (await call(admin, "GET", "/seg/policy/easdevicetype/WP8"))[1]["verdict"] == "blocked"
    assert (await call(admin, "GET", "/seg/policy/easdevicetype/iPhone"))[1]["verdict"] == "allowed"
    status, body = await call(admin, "GET", "/seg/policy/mailclient/Apple-iPhone5C3%2F1405.526000002")
    assert body == {"mail_client": "Apple-iPhone5C3/1405.526000002", "verdict": "allowed"}
    assert (await call(admin, "GET", "/seg/policy/mailclient/Outlook"))[1]["verdict"] == "blocked"
    assert (await call(admin, "GET", "/seg/policy/account/CORP%5Cmallory"))[1]["user_policy"] == "blocked"
    status, body = await call(admin, "GET", "/seg/policy/segconfig")
    assert body["policy"]["push_token"] == "(set)" and PUSH not in json.dumps(body)
    assert "blocked.device_compromised" in body["reasons"]
    # malformed document: rejected whole, previous stays
    status, body = await call(admin, "PUT", "/seg/policy/document", {"general": {"managed_device_only": "yes"}})
    assert status == 400 and "managed_device_only" in body["error"]
    assert (await call(admin, "GET", "/seg/policy/generalaccess"))[1]["general"]["managed_device_only"] is True
    assert (await call(admin, "GET", "/seg/policy/hyperlink"))[1] == {"hyperlink": None}


async def test_push_override_and_device_lookup(admin):
    await call(admin, "PUT", "/seg/policy/document", {"managed": {"compromised": True}})
    push = {"devices": [{"device_id": "DEV1", "user": "jdoe", "managed": True, "compromised": True}]}
    status, body = await call(admin, "POST", "/seg/push", push, token=PUSH)
    assert status == 200
    status, body = await call(admin, "GET", "/seg/policy/device/DEV1")
    assert status == 200 and body["record"]["compromised"] is True
    assert body["decision"] == "blocked.device_compromised"
    status, body = await call(admin, "POST", "/seg/device/DEV1/override", {"override": "whitelist"})
    assert status == 200
    # The gate (like every worker) follows the store: within a second it allows the device.
    req = EasRequest(method="POST", path="/", command="Sync", user="jdoe", device_id="DEV1", identity="credential")
    await eventually(lambda: admin.gate.decide(req).reason == "allowed.whitelisted")
    assert (await call(admin, "GET", "/seg/policy/device/DEV1"))[1]["decision"] == "allowed.whitelisted"
    assert (await call(admin, "POST", "/seg/device/DEV1/override", {"override": "maybe"}))[0] == 400
    # a malformed push changes nothing
    status, body = await call(admin, "POST", "/seg/push", b'{"devices": [{"device_id": "DEV1", "managed": 3}]}',
                              token=PUSH)
    assert status == 400 and "managed" in body["error"]
    assert (await call(admin, "GET", "/seg/policy/device/DEV1"))[1]["record"]["managed"] is True
    assert (await call(admin, "GET", "/seg/policy/device/NOPE"))[0] == 404
    await call(admin, "POST", "/seg/push", {"devices": [{"device_id": "K1", "user": "jdoe", "key_id": "k-42"}]},
               token=PUSH)
    assert (await call(admin, "GET", "/seg/policy/encryptionkeydatapayload/K1"))[1]["key_id"] == "k-42"
    assert (await call(admin, "GET", "/seg/policy/encryptionkeydatapayload/NOPE"))[0] == 404


async def test_test_mode_logging_and_compliance_run(admin):
    await call(admin, "PUT", "/seg/policy/document", {"general": {"managed_device_only": True}})
    await eventually(lambda: admin.gate.engine.policies is not None)
    status, body = await call(admin, "POST", "/seg/testmode", {"enabled": True})
    assert status == 200
    await eventually(lambda: admin.gate.engine.test_mode)
    req = EasRequest(method="POST", path="/", command="Sync", user="jdoe", device_id="UNK")
    d = admin.gate.decide(req)
    assert d.allowed and d.test_mode and d.reason == "blocked.unmanaged"
    await call(admin, "POST", "/seg/testmode", {"enabled": False})
    await eventually(lambda: not admin.gate.engine.test_mode)

    status, body = await call(admin, "PUT", "/seg/logging", {"policy_cache": "debug", "reporting": "off"})
    assert status == 200
    status, body = await call(admin, "GET", "/seg/logging")
    assert body["policy_cache"] == "debug" and body["reporting"] == "off"
    assert (await call(admin, "PUT", "/seg/logging", {"nonsense": "debug"}))[0] == 400
    assert (await call(admin, "PUT", "/seg/logging", {"reporting": "loud"}))[0] == 400

    # A device seen as allowed before; after the policy changed, run compliance re-evaluates it.
    await admin.gate.store.put_sightings([DeviceSighting(device_id="UNK", user="jdoe", status="allowed",
                                                         reason="allowed.compliant", node="n1/1")])
    status, body = await call(admin, "POST", "/seg/compliance/run")
    assert status == 200 and body["changed"] == 1 and body["reasons"] == {"blocked.unmanaged": 1}
    (seen,) = await admin.gate.store.sightings()
    assert seen.status == "blocked" and seen.reason == "blocked.unmanaged"
    status, body = await call(admin, "GET", "/seg/diagnostic/cluster")
    # (the admin process's own heartbeat may be listed first: CI saw "admin" at nodes[0])
    assert body["devices_by_status"] == {"blocked": 1}
    assert [(n["node"], n["devices"]) for n in body["nodes"] if n["devices"]] == [("n1", 1)], body["nodes"]


async def test_downloads(admin):
    await call(admin, "PUT", "/seg/policy/document", {})
    await call(admin, "POST", "/seg/push", {"devices": [{"device_id": "D1", "user": "=cmd", "managed": True}]},
               token=PUSH)
    await admin.gate.store.put_sightings([DeviceSighting(device_id="D2", user="bob", status="blocked")])
    await eventually(lambda: "d1" in admin.gate.engine.devices)
    status, body = await call(admin, "GET", "/seg/download/device/")
    assert status == 200
    rows = list(csv.reader(io.StringIO(body.decode())))
    assert rows[0][:3] == ["device_id", "user", "managed"]
    assert {r[0] for r in rows[1:]} == {"D1", "D2"}
    assert ["D1", "'=cmd"] == [r for r in rows if r[0] == "D1"][0][:2]   # no spreadsheet formulas
    status, body = await call(admin, "GET", "/seg/download/account")
    assert list(csv.reader(io.StringIO(body.decode())))[1] == ["bob", "1", "1"]
    for kind in ("managedattachment", "unmanagedattachment", "redirect"):
        assert (await call(admin, "GET", f"/seg/download/{kind}/"))[0] == 200
    assert (await call(admin, "GET", "/seg/download/nonsense/"))[0] == 404


async def test_openapi_document(admin):
    status, doc = await call(admin, "GET", "/seg/openapi.json", token=None)
    assert status == 200 and doc["openapi"].startswith("3.1")
    for r in admin.api.routes:
        assert r.method.lower() in doc["paths"][r.pattern]
    put = doc["paths"]["/seg/policy/document"]["put"]["requestBody"]["content"]["application/json"]["schema"]
    assert put == {"$ref": "#/components/schemas/PolicyDocument"}
    assert "DeviceRecord" in doc["components"]["schemas"]
    # every $ref resolves
    refs = []

    def walk(o):
        if isinstance(o, dict):
            for k, v in o.items():
                if k == "$ref":
                    refs.append(v)
                walk(v)
        elif isinstance(o, list):
            for v in o:
                walk(v)
    walk(doc)
    for ref in refs:
        assert ref.split("/")[-1] in doc["components"]["schemas"]


def test_generated_token_is_private(tmp_path):
    cfg = Config(state_dir=str(tmp_path), policy=PolicySettings(sqlite_path=str(tmp_path / "p.db")))
    t1 = admin_token(cfg)
    assert len(t1) > 30 and admin_token(cfg) == t1
    assert (token_path(cfg).stat().st_mode & 0o777) == 0o600


async def test_malformed_http_gets_400(admin):
    stream = await trio.open_tcp_stream("127.0.0.1", admin.port)
    await stream.send_all(b"GARBAGE\r\n\r\n")
    data = await stream.receive_some(1000)
    assert data.startswith(b"HTTP/1.1 400")
    await stream.aclose()


async def test_push_only_listener(tmp_path, nursery):
    cfg = config(tmp_path)
    main = AdminServer(cfg)
    await nursery.start(main.gate.run)
    push = AdminServer(cfg, gate=main.gate, push_only=True)
    port = await nursery.start(push.listen, "127.0.0.1", 0)
    status, _, _ = await request(port, "GET", "/seg/diagnostic/cluster", token=TOKEN)
    assert status == 404                     # only /seg/push is served there
    status, _, body = await request(port, "POST", "/seg/push", b'{"devices": [{"device_id": "P1"}]}', token=PUSH)
    assert status == 200
    assert (await main.gate.store.get_device("P1")) is not None


async def test_run_pulls_the_policy_api_and_serves_push_over_tls(tmp_path, nursery):
    import ssl

    import trustme

    from http_client import JsonServer
    from redis_server import free_port
    from seg_fast.admin import server as admin_server
    from seg_fast.config import ListenerSettings

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    api = JsonServer({"/snapshot": (200, json.dumps({"token": "t", "policies": {"managed": {"compromised": True}},
                                                      "devices": [{"device_id": "API1"}]}).encode())})
    api_port = await nursery.start(api.serve)
    push_port = free_port()
    cfg = Config(state_dir=str(tmp_path), admin=AdminSettings(port=0, token=TOKEN),
                 listener=ListenerSettings(tls_cert=str(tmp_path / "cert.pem"), tls_key=str(tmp_path / "key.pem")),
                 policy=PolicySettings(sqlite_path=str(tmp_path / "p.db"), push_token=PUSH, push_port=push_port,
                                       push_host="127.0.0.1", api_url=f"http://127.0.0.1:{api_port}"))
    port = await nursery.start(admin_server.run, cfg)

    async def device_known():
        status, _, body = await request(port, "GET", "/seg/policy/device/API1", token=TOKEN)
        return status == 200
    with trio.fail_after(5):
        while not await device_known():
            await trio.sleep(0.05)
    # push over TLS, trusted through the test CA
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    raw = await trio.open_tcp_stream("127.0.0.1", push_port)
    stream = trio.SSLStream(raw, ctx, server_hostname="127.0.0.1", https_compatible=True)
    body = b'{"devices": [{"device_id": "PUSHED"}]}'
    await stream.send_all(b"POST /seg/push HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: %d\r\n"
                          b"authorization: Bearer %s\r\n\r\n%s" % (len(body), PUSH.encode(), body))
    answer = b""
    with trio.fail_after(5):
        while b"\r\n\r\n" not in answer:
            answer += await stream.receive_some(4096)
    assert answer.startswith(b"HTTP/1.1 200")
    await trio.aclose_forcefully(stream)
    status, _, body = await request(port, "GET", "/seg/policy/device/PUSHED", token=TOKEN)
    assert status == 200


async def test_list_view_and_admin_page(admin):
    await admin.gate.store.put_sightings([
        DeviceSighting(device_id="A", status="blocked", last_seen=2.0),
        DeviceSighting(device_id="B", status="allowed", last_seen=3.0)])
    status, body = await call(admin, "GET", "/seg/devices/all")
    assert [d["seen"]["device_id"] for d in body["devices"]] == ["B", "A"]
    status, body = await call(admin, "GET", "/seg/devices/blocked")
    assert body["count"] == 1 and body["devices"][0]["seen"]["device_id"] == "A"
    assert (await call(admin, "GET", "/seg/devices/nonsense"))[0] == 404
    status, headers, page = await request(admin.port, "GET", "/seg/admin")
    assert status == 200 and headers["content-type"].startswith("text/html")
    # every endpoint the page calls exists in the route table
    import re
    from seg_fast.admin.api import _match
    for path in {p.decode() for p in re.findall(rb'"(/seg/[a-z/]+)', page)}:
        assert any(_match(r.pattern, path) is not None or r.pattern.startswith(path)
                   for r in admin.api.routes), path
