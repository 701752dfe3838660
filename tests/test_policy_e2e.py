"""Policies end to end: a real device session through the running gateway (its real
policy gatekeeper on a real store) to the mailbox simulator, over loopback.

Per policy and override: an allowed device gets the simulator's answers; a blocked
one gets HTTP 403 on protocol 12.1 and Status 129 inside the command's element on
14.1 and 16.1. Then: restart on SQLite, two gateways on one Redis, API down.
"""
from __future__ import annotations

import time
from contextlib import asynccontextmanager

import pytest
import trio

from http_client import request
from redis_server import free_port, running_redis
from seg_fast.admin.server import AdminServer
from seg_fast.config import load_config
from seg_fast.policy.model import (
    DeviceRecord, GatewayPolicy, GeneralAccess, InactivityPolicy, ListPolicy, ManagedDevicePolicies,
    PlatformSets, PolicyDocument, SyncSettingsPolicy,
)
from seg_fast.policy.store import RedisStore, SqliteStore
from seg_fast.proxy.gateway import Gateway
from seg_fast.sim.client import EasClient
from seg_fast.sim.mailbox import MailboxSimulator
from seg_fast.sim.state import INBOX
from seg_fast.sim.tree import E, text

PASSWORD = "secret"
VERSIONS = ("12.1", "14.1", "16.1")
NOW = time.time()
UA = "Apple-iPhone15C2/2104.100"


def env_for(sim_port: int, tmp_path, **policy) -> dict:
    env = {"SEG_FAST_LISTENER_HOST": "127.0.0.1", "SEG_FAST_LISTENER_PORT": "0",
           "SEG_FAST_UPSTREAM_URL": f"http://127.0.0.1:{sim_port}",
           "SEG_FAST_LOG_TRANSACTIONS": str(tmp_path / "tx.jsonl"),
           "SEG_FAST_POLICY_SQLITE_PATH": str(tmp_path / "policy.db")}
    env.update({f"SEG_FAST_POLICY_{k.upper()}": str(v) for k, v in policy.items()})
    return env


@asynccontextmanager
async def gateway(env: dict):
    async with trio.open_nursery() as nursery:
        gw = Gateway(load_config(None, env=env))   # the default gatekeeper: policy.gate.build
        await nursery.start(gw.serve)
        yield gw
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def simulator():
    sim = MailboxSimulator(password=PASSWORD, seed=3, initial_messages=2)
    async with trio.open_nursery() as nursery:
        await nursery.start(sim.serve, "127.0.0.1", 0)
        yield sim
        nursery.cancel_scope.cancel()


async def seed_sqlite(tmp_path, doc, devices):
    s = SqliteStore(tmp_path / "policy.db")
    await s.open()
    await s.replace_all(doc, devices)
    await s.aclose()


def client(port, version, *, user="jdoe", device_id="DEV1", device_type="iPhone", user_agent=UA):
    return EasClient("127.0.0.1", port, user, PASSWORD, device_id, device_type=device_type, version=version,
                     user_agent=user_agent)


FOLDERSYNC = E("FolderHierarchy:FolderSync", E("FolderHierarchy:SyncKey", "0"))


def assert_blocked(r, version, root):
    if version == "12.1":
        assert r.status == 403 and r.body == b""
    else:
        assert r.status == 200, r
        assert r.doc.tag == root
        assert text(r.doc, root.split(":")[0] + ":Status") == "129"


async def session(port, version, **kw) -> tuple[bool, object]:
    """Provision, FolderSync, Sync; returns (allowed, last answer). Checks each answer's shape."""
    c = client(port, version, **kw)
    try:
        r = await c.request("Provision", E("Provision:Provision", E("Provision:Policies", E(
            "Provision:Policy", E("Provision:PolicyType", "MS-EAS-Provisioning-WBXML")))))
        if r.status == 200 and text(r.doc, "Provision:Status") == "1":
            await c.provision()
            r = await c.request("FolderSync", FOLDERSYNC)
            assert r.status == 200 and text(r.doc, "FolderHierarchy:Status") == "1"
            r = await c.request("Sync", E("AirSync:Sync", E("AirSync:Collections", E("AirSync:Collection",
                                E("AirSync:SyncKey", "0"), E("AirSync:CollectionId", INBOX)))))
            assert r.status == 200 and r.doc.tag == "AirSync:Sync"
            return True, r
        assert_blocked(r, version, "Provision:Provision")
        r = await c.request("FolderSync", FOLDERSYNC)
        assert_blocked(r, version, "FolderHierarchy:FolderSync")
        r = await c.request("Sync", E("AirSync:Sync", E("AirSync:Collections", E("AirSync:Collection",
                            E("AirSync:SyncKey", "0"), E("AirSync:CollectionId", INBOX)))))
        assert_blocked(r, version, "AirSync:Sync")
        return False, r
    finally:
        await c.aclose()


GA, MD = GeneralAccess, ManagedDevicePolicies


def rec(**kw):
    base = dict(device_id="DEV1", user="jdoe", managed=True, compliant=True, compromised=False, encrypted=True,
                platform="Apple", model="iPhone 15", os="17.4", last_checkin=NOW - 3600, eas_profile=True)
    base.update(kw)
    return DeviceRecord(**base)


# (name, document, device records, client overrides, allowed?, reason)
TABLE = [
    ("no policies: fail closed", None, [], {}, False, "blocked.no_policies"),
    ("managed device: managed", PolicyDocument(general=GA(managed_device_only=True)), [rec()], {}, True,
     "allowed.compliant"),
    ("managed device: unknown device", PolicyDocument(general=GA(managed_device_only=True)), [], {}, False,
     "blocked.unmanaged"),
    ("device type block list", PolicyDocument(general=GA(device_type=ListPolicy(enabled=True, mode="block",
                                                                                values=["iPhone"]))),
     [], {}, False, "blocked.device_type"),
    ("device type allow list", PolicyDocument(general=GA(device_type=ListPolicy(enabled=True, values=["iPhone"]))),
     [], {}, True, "allowed.compliant"),
    ("mail client pattern", PolicyDocument(general=GA(mail_client=ListPolicy(enabled=True, values=["Outlook-*"]))),
     [], {}, False, "blocked.mail_client"),
    ("mail client allowed", PolicyDocument(general=GA(mail_client=ListPolicy(enabled=True, values=["Apple-iPhone*"]))),
     [], {}, True, "allowed.compliant"),
    ("user block list", PolicyDocument(general=GA(user=ListPolicy(enabled=True, mode="block", values=["jdoe"]))),
     [], {}, False, "blocked.user"),
    ("mdm inactivity", PolicyDocument(managed=MD(inactivity=InactivityPolicy(enabled=True, days=1))),
     [rec(last_checkin=NOW - 3 * 86400)], {}, False, "blocked.mdm_inactive"),
    ("device compromised", PolicyDocument(managed=MD(compromised=True)), [rec(compromised=True)], {}, False,
     "blocked.device_compromised"),
    ("device encryption", PolicyDocument(managed=MD(encryption=True)), [rec(encrypted=False)], {}, False,
     "blocked.device_not_encrypted"),
    ("device model", PolicyDocument(managed=MD(model=PlatformSets(enabled=True, allowed={"Apple": ["iPad*"]}))),
     [rec()], {}, False, "blocked.device_model"),
    ("device os", PolicyDocument(managed=MD(os=PlatformSets(enabled=True, allowed={"Apple": ["18.*"]}))),
     [rec()], {}, False, "blocked.device_os"),
    ("require EAS profile", PolicyDocument(managed=MD(require_eas_profile=True)), [rec(eas_profile=False)], {},
     False, "blocked.no_eas_profile"),
    ("override whitelist", PolicyDocument(managed=MD(compromised=True)),
     [rec(compromised=True, override="whitelist")], {}, True, "allowed.whitelisted"),
    ("override blacklist", PolicyDocument(), [rec(override="blacklist")], {}, False, "blocked.blacklisted"),
    ("override default", PolicyDocument(managed=MD(compromised=True)),
     [rec(compromised=True, override="default")], {}, False, "blocked.device_compromised"),
]


@pytest.mark.parametrize("name,doc,devices,kw,allowed,reason", TABLE, ids=[t[0] for t in TABLE])
async def test_policy_through_gateway(tmp_path, name, doc, devices, kw, allowed, reason):
    await seed_sqlite(tmp_path, doc, devices)
    async with simulator() as sim, gateway(env_for(sim.port, tmp_path)) as gw:
        with trio.fail_after(20):
            for version in VERSIONS:
                got, _ = await session(gw.port, version, **kw)
                assert got == allowed, f"{version}: expected {reason}"
        # device discovery: what the gateway recorded, with the reason
        await gw.gatekeeper.flush()
        seen = await gw.gatekeeper.store.sightings()
        assert [(s.device_id, s.reason, s.status) for s in seen] == [
            ("DEV1", reason, "allowed" if allowed else "blocked")]


async def test_command_switch_and_test_mode(tmp_path):
    doc = PolicyDocument(general=GA(managed_device_only=True), gateway=GatewayPolicy(disabled_commands=["MoveItems"]))
    await seed_sqlite(tmp_path, doc, [rec(device_id="OK1")])
    async with simulator() as sim, gateway(env_for(sim.port, tmp_path)) as gw:
        c = client(gw.port, "14.1", device_id="OK1")
        await c.provision()
        r = await c.request("MoveItems", E("Move:MoveItems", E("Move:Move", E("Move:SrcMsgId", "1:1"),
                            E("Move:SrcFldId", INBOX), E("Move:DstFldId", "3"))))
        assert r.status == 200 and text(r.doc, "Move:Response", "Move:Status") == "129"
        await c.aclose()
    # test mode: the unmanaged device is let through, recorded as test_mode
    async with simulator() as sim, gateway(env_for(sim.port, tmp_path, test_mode="true")) as gw:
        allowed, _ = await session(gw.port, "16.1", device_id="UNMANAGED")
        assert allowed
        await gw.gatekeeper.flush()
        seen = {s.device_id: s for s in await gw.gatekeeper.store.sightings()}
        assert seen["UNMANAGED"].status == "test_mode" and seen["UNMANAGED"].reason == "blocked.unmanaged"


async def test_sync_settings_hide_calendar_and_contacts(tmp_path):
    doc = PolicyDocument(general=GA(sync_settings=SyncSettingsPolicy(enabled=True,
                                                                     blocked_classes=["calendar", "contacts"])))
    await seed_sqlite(tmp_path, doc, [])
    async with simulator() as sim, gateway(env_for(sim.port, tmp_path)) as gw:
        direct = client(sim.port, "14.1")
        await direct.provision()
        r = await direct.request("FolderSync", FOLDERSYNC)
        names = [el.text for el in r.doc.iter() if el.tag == "FolderHierarchy:DisplayName"]
        assert "Calendar" in names and "Contacts" in names
        await direct.aclose()
        c = client(gw.port, "14.1", device_id="DEV9")
        await c.provision()
        r = await c.request("FolderSync", FOLDERSYNC)
        names = [el.text for el in r.doc.iter() if el.tag == "FolderHierarchy:DisplayName"]
        assert "Calendar" not in names and "Contacts" not in names and "Inbox" in names
        adds = [el for el in r.doc.iter() if el.tag == "FolderHierarchy:Add"]
        assert text(r.doc, "FolderHierarchy:Changes", "FolderHierarchy:Count") == str(len(adds))
        ok = await c.request("Sync", E("AirSync:Sync", E("AirSync:Collections", E("AirSync:Collection",
                             E("AirSync:SyncKey", "0"), E("AirSync:CollectionId", INBOX)))))
        assert ok.status == 200 and text(ok.doc, "AirSync:Collections", "AirSync:Collection", "AirSync:Status") == "1"
        refused = await c.request("Sync", E("AirSync:Sync", E("AirSync:Collections", E("AirSync:Collection",
                                  E("AirSync:SyncKey", "0"), E("AirSync:CollectionId", "6")))))
        assert refused.status == 200 and text(refused.doc, "AirSync:Status") == "129"
        await c.aclose()


async def test_restart_keeps_policies_and_device_records(tmp_path):
    """SQLite: a second gateway on the same file, with the policy API down, serves the
    last snapshot and remembers the devices it saw."""
    await seed_sqlite(tmp_path, PolicyDocument(managed=MD(compromised=True)),
                      [rec(device_id="GOOD"), rec(device_id="BAD", compromised=True)])
    async with simulator() as sim:
        env = env_for(sim.port, tmp_path)
        async with gateway(env) as gw:
            assert (await session(gw.port, "14.1", device_id="GOOD"))[0]
            assert not (await session(gw.port, "14.1", device_id="BAD"))[0]
            await gw.gatekeeper.flush()
            first = {s.device_id: s.first_seen for s in await gw.gatekeeper.store.sightings()}
        # the control process with a dead policy API, then the gateway again
        env2 = dict(env, SEG_FAST_POLICY_API_URL=f"http://127.0.0.1:{free_port()}/api",
                    SEG_FAST_ADMIN_PORT="0", SEG_FAST_ADMIN_TOKEN="t")
        admin = AdminServer(load_config(None, env=env2))
        async with trio.open_nursery() as nursery:
            await nursery.start(admin.gate.run)
            await nursery.start(admin.source.run)
            with trio.fail_after(5):
                while not admin.source.last_error:
                    await trio.sleep(0.02)
            async with gateway(env) as gw:
                assert (await session(gw.port, "16.1", device_id="GOOD"))[0]
                assert not (await session(gw.port, "16.1", device_id="BAD"))[0]
                await gw.gatekeeper.flush()
                seen = {s.device_id: s for s in await gw.gatekeeper.store.sightings()}
                assert {k: v.first_seen for k, v in seen.items()} == first
                assert seen["BAD"].reason == "blocked.device_compromised"
            nursery.cancel_scope.cancel()


async def test_two_gateways_on_one_redis(tmp_path):
    """A push to one gateway's admin API blocks the device on the other within a second."""
    with running_redis(tmp_path) as url:
        store = RedisStore(url)
        await store.open()
        await store.replace_all(PolicyDocument(managed=MD(compromised=True)), [rec(device_id="PHONE")])
        await store.aclose()
        async with simulator() as sim:
            base = env_for(sim.port, tmp_path, store="redis", redis_url=url, push_token="push")
            env_a = dict(base, SEG_FAST_POLICY_NODE_NAME="node-a", SEG_FAST_ADMIN_PORT="0",
                         SEG_FAST_ADMIN_TOKEN="t")
            env_b = dict(base, SEG_FAST_POLICY_NODE_NAME="node-b")
            admin_a = AdminServer(load_config(None, env=env_a))
            async with trio.open_nursery() as nursery:
                await nursery.start(admin_a.gate.run)
                admin_port = await nursery.start(admin_a.listen, "127.0.0.1", 0)
                async with gateway(env_a) as gw_a, gateway(env_b) as gw_b:
                    for gw in (gw_a, gw_b):
                        assert (await session(gw.port, "14.1", device_id="PHONE"))[0]
                    c = client(gw_b.port, "14.1", device_id="PHONE")
                    await c.provision()
                    status, _, body = await request(
                        admin_port, "POST", "/seg/push", token="push",
                        body=b'{"devices": [{"device_id": "PHONE", "user": "jdoe", "managed": true, '
                             b'"compromised": true}]}')
                    assert status == 200, body
                    t0 = trio.current_time()
                    # pub/sub makes this well under a second on an idle machine; the
                    # bound is generous so a loaded CI machine tests the mechanism.
                    with trio.fail_after(10):
                        while True:
                            r = await c.request("FolderSync", FOLDERSYNC)
                            if text(r.doc, "FolderHierarchy:Status") == "129":
                                break
                            await trio.sleep(0.02)
                    print(f"push reached the other gateway in {trio.current_time() - t0:.2f} s")
                    await c.aclose()
                    assert not (await session(gw_a.port, "16.1", device_id="PHONE"))[0]
                    await gw_a.gatekeeper.flush()
                    await gw_b.gatekeeper.flush()
                    status, _, body = await request(admin_port, "GET", "/seg/diagnostic/cluster", token="t")
                    import json
                    nodes = {n["node"] for n in json.loads(body)["nodes"]}
                    assert {"node-a", "node-b"} <= nodes          # both gateways reported themselves
                nursery.cancel_scope.cancel()


async def test_base64_query_device_is_identified_and_blocked(tmp_path):
    """A device using the base64 query form (user from Basic auth, version from the blob)."""
    # The base64 form carries the DeviceId as bytes; the gateway names it by their hex.
    await seed_sqlite(tmp_path, PolicyDocument(), [rec(device_id=b"B64DEV".hex().upper(), override="blacklist")])
    async with simulator() as sim, gateway(env_for(sim.port, tmp_path)) as gw:
        for version, blocked_status in (("14.1", 200), ("12.1", 403)):
            c = client(gw.port, version, device_id="B64DEV")
            r = await c.request("FolderSync", FOLDERSYNC, base64_query=True)
            assert r.status == blocked_status
            if version == "14.1":
                assert text(r.doc, "FolderHierarchy:Status") == "129"
            await c.aclose()
        c = client(gw.port, "16.1", device_id="OTHER")
        r = await c.request("FolderSync", FOLDERSYNC, base64_query=True)
        assert r.status == 200 and text(r.doc, "FolderHierarchy:Status") in ("1", "142")
        await c.aclose()
        await gw.gatekeeper.flush()
        seen = {s.device_id: s for s in await gw.gatekeeper.store.sightings()}
        hexid = b"B64DEV".hex()
        assert seen[hexid].user == "jdoe" and seen[hexid].reason == "blocked.blacklisted"
