"""Which user a request is decided on: policy.user_without_credential in the engine."""
from __future__ import annotations

import pytest

from seg_fast.eas.request import EasRequest
from seg_fast.policy.engine import Engine
from seg_fast.policy.model import DeviceRecord, GeneralAccess, ListPolicy, PolicyDocument
from seg_fast.policy.settings import PolicySettings

BLOCK_MALLORY = PolicyDocument(general=GeneralAccess(user=ListPolicy(enabled=True, mode="block", values=["mallory"])))


def req(user="alice", identity="credential", device="D1") -> EasRequest:
    return EasRequest(method="POST", path="/", command="Sync", user=user, device_id=device, device_type="iPhone",
                      identity=identity)


def engine(doc=BLOCK_MALLORY, devices=(), rule="refuse", test_mode=False) -> Engine:
    e = Engine(transforms_for=lambda *a, **k: (), user_without_credential=rule, test_mode=test_mode)
    e.load(doc, list(devices), 1)
    return e


@pytest.mark.parametrize("identity,user,rule,reason", [
    ("credential", "alice", "refuse", "allowed.compliant"),
    ("credential", "CORP\\mallory", "refuse", "blocked.user"),
    ("none", "alice", "refuse", "blocked.user_unverified"),        # Kerberos or no credential, User=alice
    ("none", None, "refuse", "blocked.user_unverified"),
    ("none", "alice", "trust_query", "allowed.compliant"),
    ("none", "mallory", "trust_query", "blocked.user"),
    ("handshake", "alice", "refuse", "allowed.compliant"),         # NTLM type 1: decided on User=
    ("handshake", "mallory", "refuse", "blocked.user"),
])
def test_user_policy_and_the_credential(identity, user, rule, reason):
    assert engine(rule=rule).decide(req(user, identity)).reason == reason


def test_without_a_user_policy_only_user_bound_device_records_need_a_verified_user():
    enrolled = DeviceRecord(device_id="D1", user="alice", managed=True)
    anyone = DeviceRecord(device_id="D2", user="", managed=True)
    e = engine(PolicyDocument(general=GeneralAccess(managed_device_only=True)), [enrolled, anyone])
    assert e.decide(req("alice", "none", "D1")).reason == "blocked.user_unverified"
    assert e.decide(req("alice", "credential", "D1")).reason == "allowed.compliant"
    assert e.decide(req("bob", "none", "D2")).reason == "allowed.compliant"     # the user does not matter
    assert engine(PolicyDocument()).decide(req("x", "none", "D9")).reason == "allowed.compliant"


def test_overrides_that_do_not_depend_on_the_user():
    black = DeviceRecord(device_id="D1", override="blacklist")
    white = DeviceRecord(device_id="D2", override="whitelist")
    white_enrolled = DeviceRecord(device_id="D3", user="alice", override="whitelist")
    e = engine(devices=[black, white, white_enrolled])
    assert e.decide(req("alice", "none", "D1")).reason == "blocked.blacklisted"
    assert e.decide(req("mallory", "none", "D2")).reason == "allowed.whitelisted"
    assert e.decide(req("alice", "none", "D3")).reason == "blocked.user_unverified"


def test_the_cache_keeps_identities_apart():
    e = engine()
    assert e.decide(req("alice", "credential")).allowed
    assert e.decide(req("alice", "none")).reason == "blocked.user_unverified"
    assert e.decide(req("alice", "credential")).allowed


def test_test_mode_records_the_refusal_and_lets_it_through():
    d = engine(test_mode=True).decide(req("alice", "none"))
    assert d.allowed and d.test_mode and d.reason == "blocked.user_unverified"


def test_admin_lookups_ask_about_a_user_as_if_authenticated():
    assert engine().explain(req("alice", "none"))[0] == "allowed.compliant"


def test_the_setting_reaches_the_engine_and_rejects_other_values():
    import msgspec

    from seg_fast.policy.gate import PolicyGatekeeper

    class NoStore:
        pass

    assert PolicySettings().user_without_credential == "refuse"
    gk = PolicyGatekeeper(PolicySettings(user_without_credential="trust_query"), store=NoStore())
    assert not gk.engine.refuse_unverified
    assert PolicyGatekeeper(PolicySettings(), store=NoStore()).engine.refuse_unverified
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"user_without_credential": "maybe"}, PolicySettings)
