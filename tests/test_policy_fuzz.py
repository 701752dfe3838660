"""Property tests: the cached decision equals the rule book; bad input never crashes."""
from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, strategies as st

from seg_fast.eas.request import EasRequest
from seg_fast.errors import PolicyError
from seg_fast.policy.engine import Engine, evaluate, device_for, device_key
from seg_fast.policy.model import (
    DeviceRecord, GatewayPolicy, GeneralAccess, InactivityPolicy, ListPolicy, ManagedDevicePolicies,
    PlatformSets, PolicyDocument, decode_document, decode_policy_file,
)
from seg_fast.policy.resp import RedisError, RespParser, _Incomplete

NOW = 1_800_000_000.0
names = st.sampled_from(["jdoe", "CORP\\jdoe", "alice@corp.example", "bob", "", "Mallory"])
ids = st.sampled_from(["DEV1", "dev1", "DEV2", "X"])
types = st.sampled_from(["iPhone", "Android", "WP8", None])
agents = st.sampled_from(["Apple-iPhone9C1/1402.100", "Outlook-iOS/2.0", "Boxer/4", None])
commands = st.sampled_from(["Sync", "Ping", "Search", "MoveItems", "FolderSync"])


def list_policy(values):
    return st.builds(ListPolicy, enabled=st.booleans(), mode=st.sampled_from(["allow", "block"]),
                     values=st.lists(values, min_size=1, max_size=3))


docs = st.builds(
    PolicyDocument,
    general=st.builds(GeneralAccess, managed_device_only=st.booleans(),
                      device_type=list_policy(st.sampled_from(["iphone", "Android", "WP*"])),
                      mail_client=list_policy(st.sampled_from(["Apple-*", "Outlook-iOS/2.0", "boxer*"])),
                      user=list_policy(st.sampled_from(["jdoe", "alice", "corp\\bob"]))),
    managed=st.builds(ManagedDevicePolicies,
                      inactivity=st.builds(InactivityPolicy, enabled=st.booleans(), days=st.integers(1, 30)),
                      compromised=st.booleans(), encryption=st.booleans(), mdm_compliant=st.booleans(),
                      require_eas_profile=st.booleans(),
                      model=st.builds(PlatformSets, enabled=st.booleans(),
                                      allowed=st.dictionaries(st.sampled_from(["Apple", "Android"]),
                                                              st.lists(st.sampled_from(["iPhone*", "Pixel 8"]),
                                                                       max_size=2), max_size=2)),
                      os=st.builds(PlatformSets, enabled=st.booleans(),
                                   allowed=st.dictionaries(st.sampled_from(["Apple", "Android"]),
                                                           st.lists(st.sampled_from(["17.*", "14"]), max_size=2),
                                                           max_size=2))),
    gateway=st.builds(GatewayPolicy, disabled_commands=st.lists(st.sampled_from(["Search", "MoveItems"]),
                                                                 max_size=2)),
)
opt_bool = st.sampled_from([True, False, None])
devices = st.builds(
    DeviceRecord, device_id=ids, user=names, managed=st.booleans(), compliant=opt_bool, compromised=opt_bool,
    encrypted=opt_bool, platform=st.sampled_from(["Apple", "Android", ""]),
    model=st.sampled_from(["iPhone 15", "Pixel 8", ""]), os=st.sampled_from(["17.4", "14", ""]),
    last_checkin=st.sampled_from([0.0, NOW - 3600, NOW - 40 * 86400]), eas_profile=st.booleans(),
    override=st.sampled_from(["default", "whitelist", "blacklist"]))
requests = st.builds(lambda c, u, d, t, a: EasRequest(method="POST", path="/", command=c, user=u or None,
                                                       device_id=d, device_type=t, user_agent=a),
                     commands, names, ids, types, agents)


@given(docs, st.lists(devices, max_size=3), st.lists(requests, min_size=1, max_size=12))
def test_cached_decisions_equal_the_rule_book(doc, devs, reqs):
    e = Engine(transforms_for=lambda *a, **k: (), clock=lambda: NOW)
    e.load(doc, devs, 1)
    index = {device_key(d.device_id): d for d in devs}
    for r in reqs + reqs:                    # second pass: from the cache
        got = e.decide(r)
        if r.command in doc.gateway.disabled_commands:
            assert got.reason == "blocked.command_disabled"
            continue
        dev = device_for(index.get(device_key(r.device_id)), r.user)
        from seg_fast.policy.engine import CompiledPolicies
        want, _ = evaluate(r, dev, CompiledPolicies(doc), NOW)
        assert got.reason == want
        assert got.allowed == want.startswith("allowed.")


@given(st.binary(max_size=300))
def test_policy_decoders_only_raise_policy_error(raw):
    for fn in (decode_document, decode_policy_file):
        try:
            fn(raw)
        except PolicyError:
            pass


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(
                        st.sampled_from(["general", "managed", "gateway", "user", "enabled", "mode", "values",
                                         "days", "inactivity", "disabled_commands", "policies", "devices",
                                         "device_id"]), c, max_size=3), max_leaves=12))
def test_structured_garbage_only_raises_policy_error(obj):
    raw = msgspec.json.encode(obj)
    for fn in (decode_document, decode_policy_file):
        try:
            fn(raw)
        except PolicyError:
            pass


@given(st.lists(st.binary(max_size=40), max_size=6))
def test_resp_parser_never_crashes(chunks):
    p = RespParser()
    for c in chunks:
        p.feed(c)
        for _ in range(10):
            try:
                p.next()
            except (_Incomplete, RedisError):
                break


def test_resp_parser_limits():
    p = RespParser()
    p.feed(b"*1\r\n" * 20 + b":1\r\n")
    with pytest.raises(RedisError, match="deep"):
        p.next()
    p = RespParser()
    p.feed(b"$abc\r\n")
    with pytest.raises(RedisError, match="bad"):
        p.next()
