"""The rule book, table-driven: one row per policy and override, sans-IO."""
from __future__ import annotations

import pytest

from seg_fast.eas.request import EasRequest
from seg_fast.errors import PolicyError
from seg_fast.policy import engine as E
from seg_fast.policy import records
from seg_fast.policy.engine import Engine, NameMatcher, user_forms
from seg_fast.policy.model import (
    DeviceRecord, GatewayPolicy, GeneralAccess, InactivityPolicy, ListPolicy, ManagedDevicePolicies,
    PlatformSets, PolicyDocument, SyncSettingsPolicy, decode_document, decode_policy_file,
)

NOW = 1_800_000_000.0
DAY = 86400.0


def req(**kw) -> EasRequest:
    base = dict(method="POST", path="/Microsoft-Server-ActiveSync", command="Sync", user="jdoe",
                device_id="DEV1", device_type="iPhone", protocol_version="14.1",
                user_agent="Apple-iPhone9C1/1402.100")
    base.update(kw)
    return EasRequest(**base)


def managed(**kw) -> DeviceRecord:
    base = dict(device_id="DEV1", user="jdoe", managed=True, compliant=True, compromised=False,
                encrypted=True, platform="Apple", model="iPhone 15", os="17.4", last_checkin=NOW - 3600,
                eas_profile=True)
    base.update(kw)
    return DeviceRecord(**base)


def engine(doc: PolicyDocument | None, *devices: DeviceRecord, **kw) -> Engine:
    e = Engine(transforms_for=lambda *a, **k: (), clock=lambda: NOW, **kw)
    e.load(doc, devices, 1)
    return e


GA = GeneralAccess
MD = ManagedDevicePolicies

# (name, document, device record or None, request overrides, expected reason)
CASES = [
    ("no policies blocks", None, managed(), {}, "blocked.no_policies"),
    ("empty document allows", PolicyDocument(), None, {}, "allowed.compliant"),
    # Managed Device
    ("managed only: unknown device", PolicyDocument(general=GA(managed_device_only=True)), None, {},
     "blocked.unmanaged"),
    ("managed only: unmanaged record", PolicyDocument(general=GA(managed_device_only=True)),
     managed(managed=False), {}, "blocked.unmanaged"),
    ("managed only: managed", PolicyDocument(general=GA(managed_device_only=True)), managed(), {},
     "allowed.compliant"),
    ("managed only: enrolled to another user", PolicyDocument(general=GA(managed_device_only=True)),
     managed(user="alice"), {}, "blocked.unmanaged"),
    ("blacklist holds for another user", PolicyDocument(), managed(user="alice", override="blacklist"), {},
     "blocked.blacklisted"),
    ("whitelist is not inherited by another user", PolicyDocument(general=GA(managed_device_only=True)),
     managed(user="alice", override="whitelist"), {}, "blocked.unmanaged"),
    ("blacklist holds without a user", PolicyDocument(), managed(override="blacklist"), {"user": None},
     "blocked.blacklisted"),
    ("managed only: DOMAIN\\user matches", PolicyDocument(general=GA(managed_device_only=True)),
     managed(user="jdoe"), {"user": "CORP\\JDoe"}, "allowed.compliant"),
    # EAS Device Type
    ("device type allow list hit", PolicyDocument(general=GA(device_type=ListPolicy(enabled=True, values=["iphone"]))),
     None, {}, "allowed.compliant"),
    ("device type allow list miss", PolicyDocument(general=GA(device_type=ListPolicy(enabled=True, values=["Android"]))),
     None, {}, "blocked.device_type"),
    ("device type block list hit", PolicyDocument(general=GA(device_type=ListPolicy(enabled=True, mode="block", values=["iPhone"]))),
     None, {}, "blocked.device_type"),
    ("device type block list miss", PolicyDocument(general=GA(device_type=ListPolicy(enabled=True, mode="block", values=["WP8"]))),
     None, {}, "allowed.compliant"),
    # Mail Client (exact or pattern)
    ("mail client pattern allow", PolicyDocument(general=GA(mail_client=ListPolicy(enabled=True, values=["Apple-iPhone*"]))),
     None, {}, "allowed.compliant"),
    ("mail client exact allow miss", PolicyDocument(general=GA(mail_client=ListPolicy(enabled=True, values=["Apple-iPhone9C1"]))),
     None, {}, "blocked.mail_client"),
    ("mail client block pattern", PolicyDocument(general=GA(mail_client=ListPolicy(enabled=True, mode="block", values=["*iphone9c1/*"]))),
     None, {}, "blocked.mail_client"),
    ("mail client missing UA vs allow list", PolicyDocument(general=GA(mail_client=ListPolicy(enabled=True, values=["Boxer*"]))),
     None, {"user_agent": None}, "blocked.mail_client"),
    # User
    ("user allow list", PolicyDocument(general=GA(user=ListPolicy(enabled=True, values=["jdoe"]))),
     None, {"user": "jdoe@corp.example"}, "allowed.compliant"),
    ("user allow list miss", PolicyDocument(general=GA(user=ListPolicy(enabled=True, values=["alice"]))),
     None, {}, "blocked.user"),
    ("user block list", PolicyDocument(general=GA(user=ListPolicy(enabled=True, mode="block", values=["corp\\jdoe"]))),
     None, {"user": "CORP\\jdoe"}, "blocked.user"),
    # MDM Inactivity
    ("inactive", PolicyDocument(managed=MD(inactivity=InactivityPolicy(enabled=True, days=7))),
     managed(last_checkin=NOW - 8 * DAY), {}, "blocked.mdm_inactive"),
    ("active", PolicyDocument(managed=MD(inactivity=InactivityPolicy(enabled=True, days=7))),
     managed(last_checkin=NOW - 6 * DAY), {}, "allowed.compliant"),
    ("never checked in", PolicyDocument(managed=MD(inactivity=InactivityPolicy(enabled=True, days=7))),
     managed(last_checkin=0), {}, "blocked.mdm_inactive"),
    ("inactivity ignores unmanaged", PolicyDocument(managed=MD(inactivity=InactivityPolicy(enabled=True, days=1))),
     None, {}, "allowed.compliant"),
    # Device Compromised
    ("compromised", PolicyDocument(managed=MD(compromised=True)), managed(compromised=True), {},
     "blocked.device_compromised"),
    ("compromised not reported", PolicyDocument(managed=MD(compromised=True)), managed(compromised=None), {},
     "allowed.compliant"),
    ("compromised policy off", PolicyDocument(), managed(compromised=True), {}, "allowed.compliant"),
    # Device Encryption
    ("not encrypted", PolicyDocument(managed=MD(encryption=True)), managed(encrypted=False), {},
     "blocked.device_not_encrypted"),
    ("encryption not reported", PolicyDocument(managed=MD(encryption=True)), managed(encrypted=None), {},
     "allowed.compliant"),
    ("MDM non-compliant", PolicyDocument(managed=MD(mdm_compliant=True)), managed(compliant=False), {},
     "blocked.mdm_noncompliant"),
    # Device Model / OS per platform
    ("model allowed", PolicyDocument(managed=MD(model=PlatformSets(enabled=True, allowed={"Apple": ["iPhone 1*"]}))),
     managed(), {}, "allowed.compliant"),
    ("model not allowed", PolicyDocument(managed=MD(model=PlatformSets(enabled=True, allowed={"apple": ["iPad*"]}))),
     managed(), {}, "blocked.device_model"),
    ("model: other platform unrestricted", PolicyDocument(managed=MD(model=PlatformSets(enabled=True, allowed={"Android": ["Pixel 8"]}))),
     managed(), {}, "allowed.compliant"),
    ("os allowed", PolicyDocument(managed=MD(os=PlatformSets(enabled=True, allowed={"Apple": ["17.*"]}))),
     managed(), {}, "allowed.compliant"),
    ("os not allowed", PolicyDocument(managed=MD(os=PlatformSets(enabled=True, allowed={"Apple": ["16.*"]}))),
     managed(), {}, "blocked.device_os"),
    # Require EAS Profile
    ("no EAS profile", PolicyDocument(managed=MD(require_eas_profile=True)), managed(eas_profile=False), {},
     "blocked.no_eas_profile"),
    ("EAS profile", PolicyDocument(managed=MD(require_eas_profile=True)), managed(), {}, "allowed.compliant"),
    # Overrides
    ("whitelist beats compromised", PolicyDocument(managed=MD(compromised=True)),
     managed(compromised=True, override="whitelist"), {}, "allowed.whitelisted"),
    ("whitelist beats user block", PolicyDocument(general=GA(user=ListPolicy(enabled=True, mode="block", values=["jdoe"]))),
     managed(override="whitelist"), {}, "allowed.whitelisted"),
    ("blacklist beats compliant", PolicyDocument(), managed(override="blacklist"), {}, "blocked.blacklisted"),
    ("default override decides", PolicyDocument(managed=MD(compromised=True)),
     managed(compromised=True, override="default"), {}, "blocked.device_compromised"),
    # Command switches
    ("search turned off", PolicyDocument(gateway=GatewayPolicy(disabled_commands=["Search"])), managed(),
     {"command": "Search"}, "blocked.command_disabled"),
    ("search off, sync on", PolicyDocument(gateway=GatewayPolicy(disabled_commands=["Search"])), managed(),
     {}, "allowed.compliant"),
    ("command off even when whitelisted", PolicyDocument(gateway=GatewayPolicy(disabled_commands=["MoveItems"])),
     managed(override="whitelist"), {"command": "MoveItems"}, "blocked.command_disabled"),
]


@pytest.mark.parametrize("name,doc,device,overrides,reason", CASES, ids=[c[0] for c in CASES])
def test_policy_table(name, doc, device, overrides, reason):
    e = engine(doc, *([device] if device else []))
    r = req(**overrides)
    d = e.decide(r)
    assert d.reason == reason
    assert d.allowed == reason.startswith("allowed.")
    assert not d.test_mode
    # The cached path gives the same answer as the first, uncached one.
    assert e.decide(req(**overrides)) is d
    assert e.explain(r)[0] == reason


@pytest.mark.parametrize("name,doc,device,overrides,reason", CASES, ids=[c[0] for c in CASES])
def test_test_mode_never_blocks(name, doc, device, overrides, reason):
    e = engine(doc, *([device] if device else []), test_mode=True)
    d = e.decide(req(**overrides))
    assert d.allowed and d.reason == reason
    assert d.test_mode == reason.startswith("blocked.")


def test_allow_if_no_policies():
    assert engine(None, allow_if_no_policies=True).decide(req()).reason == "allowed.no_policies"
    assert engine(None, allow_if_no_policies=True).decide(req()).allowed


def test_test_mode_from_document():
    doc = PolicyDocument(managed=MD(compromised=True), gateway=GatewayPolicy(test_mode=True))
    d = engine(doc, managed(compromised=True)).decide(req())
    assert d.allowed and d.test_mode and d.reason == "blocked.device_compromised"


def test_device_update_invalidates_only_that_device():
    doc = PolicyDocument(managed=MD(compromised=True))
    e = engine(doc, managed(), managed(device_id="DEV2"))
    a = e.decide(req())
    b = e.decide(req(device_id="dev2"))
    assert a.allowed and b.allowed
    e.put_device(managed(device_id="dev1", compromised=True), 2)   # MDM uses another case
    assert e.decide(req()).reason == "blocked.device_compromised"
    assert e.decide(req(device_id="dev2")) is b and "dev2" in e._cache
    e.remove_device("DEV1", 3)
    assert e.decide(req()).reason == "allowed.compliant"   # now unknown, unmanaged allowed
    e.set_document(PolicyDocument(general=GA(managed_device_only=True)), 4)
    assert e.decide(req()).reason == "blocked.unmanaged"
    assert e.version == 4


def test_cache_respects_changed_identity_and_time():
    clock = [NOW]
    e = Engine(transforms_for=lambda *a, **k: (), clock=lambda: clock[0])
    e.load(PolicyDocument(managed=MD(inactivity=InactivityPolicy(enabled=True, days=1)),
                          general=GA(user=ListPolicy(enabled=True, values=["jdoe"]))),
           [managed(user="", last_checkin=NOW - 3600)], 1)
    assert e.decide(req()).allowed
    assert e.decide(req(user="mallory")).reason == "blocked.user"   # same device id, other user
    assert e.decide(req()).allowed
    clock[0] = NOW + DAY    # the check-in is now older than a day
    assert e.decide(req()).allowed        # the engine's clock moves on tick() only
    e.tick()
    assert e.decide(req()).reason == "blocked.mdm_inactive"


def test_transforms_for_gets_device_facts():
    calls = []

    def tf(policy, *, managed, device_id, user):
        calls.append((managed, device_id, user))
        return ("T",)
    e = Engine(transforms_for=tf, clock=lambda: NOW)
    e.load(PolicyDocument(), [managed()], 1)
    d = e.decide(req())
    assert d.transforms == ("T",)
    e.decide(req())
    assert calls == [(True, "DEV1", "jdoe")]     # computed once per device and snapshot
    assert e.decide(req(device_id="OTHER")).transforms == ("T",)
    assert calls[-1] == (False, "OTHER", "jdoe")


def test_blocked_has_no_transforms():
    e = Engine(transforms_for=lambda *a, **k: ("T",), clock=lambda: NOW)
    e.load(PolicyDocument(), [managed(override="blacklist")], 1)
    assert e.decide(req()).transforms == ()


def test_a_device_cached_under_several_spellings_is_forgotten_under_all():
    doc = PolicyDocument(managed=MD(compromised=True))
    e = engine(doc, managed())
    for spelling in ("DEV1", "dev1", "Dev1"):
        assert e.decide(req(device_id=spelling)).reason == "allowed.compliant"
    assert {"DEV1", "dev1", "Dev1"} <= set(e._cache)
    e.put_device(managed(device_id="dEV1", compromised=True), 2)
    assert not {"DEV1", "dev1", "Dev1"} & set(e._cache)
    for spelling in ("DEV1", "dev1", "Dev1"):
        assert e.decide(req(device_id=spelling)).reason == "blocked.device_compromised"


def test_repeated_strings_are_one_object_per_worker():
    # Every worker holds an entry per device it has seen and the records changed since its
    # snapshot: a fleet's platform, model and mail client are stored once, not once per device.
    # (The snapshot's records are one shared table, no object per record: test_policy_records.)
    records = [managed(device_id=f"dev{i}", platform="Apple"[:], model="".join(["iPhone", " 15"]),
                       os="".join(["17", ".4"])) for i in range(3)]
    assert records[0].model is not records[1].model          # as decoded: one object each
    e = engine(PolicyDocument(), *records)
    assert [e.devices[f"dev{i}"] for i in range(3)] == records   # the same records, from the table
    for i in (7, 8, 9):
        e.put_device(managed(device_id=f"dev{i}", model="".join(["iPhone", " 15"]), os="".join(["17", ".4"])), i)
    got = [e.devices[f"dev{i}"] for i in (7, 8, 9)]
    assert got[0].model is got[1].model is got[2].model and got[0].os is got[2].os
    ua = "".join(["Apple-iPhone15C2/", "2104.100"])
    for i in range(3):
        e.decide(req(device_id=f"D{i}", user_agent=ua[:5] + ua[5:], device_type="".join(["iP", "hone"])))
    entries = [e._cache[f"D{i}"] for i in range(3)]
    assert entries[0][2] is entries[1][2] is entries[2][2] and entries[0][1] is entries[2][1]


def test_shared_strings_are_bounded_and_short(monkeypatch):
    monkeypatch.setattr(records, "MAX_SHARED_STRINGS", 10)
    e = engine(PolicyDocument())
    for i in range(100):                      # devices sending a new mail client each time
        e.decide(req(device_id=f"D{i}", user_agent=f"client-{i}"))
    assert len(e._shared._seen) == 10
    long = "x" * (records.MAX_SHARED_LENGTH + 1)
    assert records.Shared()(long) is long and not records.Shared()._seen
    e2 = engine(PolicyDocument())
    e2.decide(req(device_id="L", user_agent=long))
    assert long not in e2._shared._seen and e2._cache["L"][2] == long


def test_devices_without_transforms_share_a_decision():
    e = engine(PolicyDocument(), managed(), managed(device_id="DEV2"))
    a, b = e.decide(req()), e.decide(req(device_id="DEV2"))
    assert a is b and a.allowed and a.reason == "allowed.compliant" and a.transforms == ()
    e.set_document(PolicyDocument(), 2)
    c = e.decide(req())
    assert c == a and c is e.decide(req(device_id="DEV2"))
    # with transforms, each device its own (they carry the device's facts)
    t = Engine(transforms_for=lambda pol, *, managed, device_id, user: (device_id,), clock=lambda: NOW)
    t.load(PolicyDocument(), [managed(), managed(device_id="DEV2")], 1)
    assert t.decide(req()).transforms == ("DEV1",) and t.decide(req(device_id="DEV2")).transforms == ("DEV2",)


def test_device_records_are_not_tracked_by_the_collector():
    import gc

    assert not gc.is_tracked(managed())


def test_cache_is_bounded():
    e = engine(PolicyDocument())
    e.MAX_CACHED = 100
    for i in range(1000):
        assert e.decide(req(device_id=f"D{i}")).allowed
    assert len(e._cache) <= 100


def test_helpers():
    assert user_forms("CORP\\JDoe") == ("corp\\jdoe", "jdoe")
    assert user_forms("jdoe@corp.example") == ("jdoe@corp.example", "jdoe")
    assert user_forms(None) == ("",)
    m = NameMatcher(["Outlook-iOS/*", "Boxer"], patterns=True)
    assert m.match("outlook-ios/2.0") and m.match("BOXER") and not m.match("boxer/1")
    assert not NameMatcher(["a*"], patterns=False).match("ab")


@pytest.mark.parametrize("raw,where", [
    (b'{"general": {"user": {"enabled": true, "mode": "deny"}}}', "mode"),
    (b'{"general": {"usr": {}}}', "usr"),
    (b'{"managed": {"inactivity": {"enabled": true, "days": 0}}}', "days"),
    (b'{"managed": {"inactivity": {"enabled": true, "days": 32768}}}', "days"),
    (b'{"gateway": {"disabled_commands": ["Serch"]}}', "Serch"),
    (b'{"general": {"sync_settings": {"enabled": true, "blocked_classes": ["email"]}}}', "blocked_classes"),
    (b'{"general": {"user": {"enabled": true, "values": []}}}', "general.user"),
    (b'{"general": ', "JSON"),
])
def test_malformed_document_rejected(raw, where):
    with pytest.raises(PolicyError) as ei:
        decode_document(raw)
    assert where in str(ei.value)


def test_policy_file_rejects_bad_device():
    with pytest.raises(PolicyError, match="devices"):
        decode_policy_file(b'{"devices": [{"device_id": "A", "managed": "yes"}]}')
    with pytest.raises(PolicyError, match=r"devices\[1\].device_id"):
        decode_policy_file(b'{"devices": [{"device_id": "A"}, {"device_id": ""}]}')
    pf = decode_policy_file(b'{"policies": {"managed": {"compromised": true}}, "devices": [{"device_id": "A"}]}')
    assert pf.policies.managed.compromised and pf.devices[0].device_id == "A"


def test_sync_settings_hidden_types():
    doc = PolicyDocument(general=GA(sync_settings=SyncSettingsPolicy(enabled=True,
                                                                     blocked_classes=["calendar", "contacts"])))
    got = []
    e = Engine(transforms_for=lambda *a, **k: (), sync_transforms=lambda types: (got.append(types) or ("S",)),
               clock=lambda: NOW)
    e.load(doc, [], 1)
    assert got == [frozenset({8, 13, 9, 14})]
    assert e.decide(req()).transforms == ("S",)


def test_no_policy_transforms_when_allowed_without_policies():
    e = Engine(transforms_for=lambda *a, **k: ("T",), clock=lambda: NOW, allow_if_no_policies=True,
               no_policy_transforms=lambda *, managed, device_id, user: (("NP", managed, device_id),))
    e.load(None, [managed()], 1)
    d = e.decide(req())
    assert d.allowed and d.reason == "allowed.no_policies" and d.transforms == (("NP", True, "DEV1"),)
    assert e.decide(req(device_id="X")).transforms == (("NP", False, "X"),)
