"""seg_fast.policy.records: the MDM's device records as one table every worker maps.

The oracle is what the table replaced: a dict of the decoded records keyed by
``record_key(device_id)`` (the later of two records of one key wins)."""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from seg_fast.errors import PolicyError
from seg_fast.policy import gate as gate_mod
from seg_fast.policy import records
from seg_fast.policy.gate import PolicyGatekeeper
from seg_fast.policy.model import DeviceRecord, PolicyDocument, device_key
from seg_fast.policy.records import RecordTable, Records, build, record_key, shared_table
from seg_fast.policy.settings import PolicySettings
from seg_fast.policy.store import SqliteStore

enc = msgspec.json.Encoder()
# Ids as devices and MDMs spell them: case, non-ASCII, separators, the empty string.
ids = st.text(alphabet=st.sampled_from("aAbBzZ09-_.ÉéßΣσ\u0130 "), max_size=12)
recs = st.builds(DeviceRecord, device_id=ids, user=st.sampled_from(["", "jdoe", "CORP\\ann"]),
                 managed=st.booleans(), compromised=st.none() | st.booleans(),
                 model=st.sampled_from(["", "iPhone 15", "Pixel 8"]),
                 override=st.sampled_from(["default", "whitelist", "blacklist"]))


def oracle(rs: list[DeviceRecord]) -> dict[str, DeviceRecord]:
    return {record_key(r.device_id): r for r in rs}


@given(st.lists(recs, max_size=40), st.lists(ids, max_size=10))
def test_a_table_answers_as_the_dict_it_replaces(rs, others):
    want = oracle(rs)
    table = RecordTable(build(enc.encode(r) for r in rs))
    assert table.count == len(want)
    assert sorted(table.keys()) == sorted(want)
    assert dict(table.items()) == want
    for key, rec in want.items():
        assert table.get(key) == rec
    for raw in others + [r.device_id for r in rs]:
        for key in (raw, device_key(raw), raw.upper()):
            assert table.get(key) == want.get(key)


def test_every_worker_builds_the_same_bytes_whatever_order_the_store_reads_in():
    # (the file is named by its content: workers whose stores return the rows in another
    # order must still find one file)
    bodies = [enc.encode(DeviceRecord(device_id=f"dev{i}", model=str(i % 7))) for i in range(300)]
    assert build(bodies) == build(bodies[::-1]) == build(bodies[150:] + bodies[:150])


def test_keys_of_one_hash_are_told_apart(monkeypatch):
    monkeypatch.setattr(records, "key_hash", lambda key: 7)       # every key collides
    rs = [DeviceRecord(device_id=f"dev{i}", model=str(i)) for i in range(20)]
    table = RecordTable.of(rs)
    assert [table.get(f"dev{i}").model for i in range(20)] == [str(i) for i in range(20)]
    assert table.get("dev20") is None


def test_a_damaged_record_is_refused_when_the_table_is_built():
    with pytest.raises(PolicyError, match="stored device record is damaged"):
        build([enc.encode(DeviceRecord(device_id="ok")), b'{"device_id": 5}'])


@given(st.lists(recs, max_size=15), st.lists(st.tuples(st.booleans(), recs), max_size=25))
def test_changes_over_the_table_read_as_the_dict_would(rs, changes):
    want = oracle(rs)
    view = Records(RecordTable.of(rs))
    for put, rec in changes:
        key = record_key(rec.device_id)
        if put:
            view.put(key, rec)
            want[key] = rec
        else:
            view.remove(key)
            want.pop(key, None)
        assert len(view) == len(want)
    assert sorted(view) == sorted(want)
    assert {k: view[k] for k in view} == want
    assert dict(view.items()) == want and len(list(view.items())) == len(want)
    assert sorted(map(record_key, (r.device_id for r in view.values()))) == sorted(want)
    for key in list(want) + ["absent"]:
        assert view.get(key) == want.get(key)
    assert "absent" not in view


def _bodies(n: int, tag: str = "") -> list[bytes]:
    return [enc.encode(DeviceRecord(device_id=f"d{i}{tag}", managed=i % 2 == 0)) for i in range(n)]


def _maps(path: Path) -> int:
    return sum(str(path) in line for line in Path("/proc/self/maps").read_text().splitlines())


def test_workers_with_one_snapshot_map_one_file(tmp_path):
    d = tmp_path / "policy-records"
    a = shared_table(_bodies(500), d)
    b = shared_table(_bodies(500), d)         # a second worker, the same snapshot
    assert a.path == b.path and a.path.parent == d
    assert [p.name for p in d.iterdir()] == [a.path.name]                  # no temporary left
    assert a.path.name == f"records-{hashlib.sha256(build(_bodies(500))).hexdigest()[:32]}.tbl"
    assert _maps(a.path) >= 2                                               # two mappings of one file
    assert a.path.stat().st_mode & 0o777 == 0o600 and d.stat().st_mode & 0o777 == 0o700
    assert b.get("d7") == DeviceRecord(device_id="d7") and b.get("d8").managed


def test_a_damaged_file_under_the_name_is_replaced_not_trusted(tmp_path):
    d = tmp_path / "policy-records"
    d.mkdir()
    content = build(_bodies(50))
    path = d / f"records-{hashlib.sha256(content).hexdigest()[:32]}.tbl"
    path.write_bytes(content[:-1] + b"X")                    # same size, last byte wrong
    t = shared_table(_bodies(50), d)
    assert t.path == path and path.read_bytes() == content
    assert t.get("d49") == DeviceRecord(device_id="d49")


def test_a_new_snapshot_gets_a_new_file_and_an_old_mapping_outlives_its_file(tmp_path, monkeypatch):
    d = tmp_path / "policy-records"
    old = shared_table(_bodies(100), d)
    monkeypatch.setattr(records, "STALE_AFTER", -1.0)        # every other table is stale at once
    new = shared_table(_bodies(100, tag="n"), d)
    assert new.path != old.path
    assert [p.name for p in d.iterdir()] == [new.path.name]
    assert old.get("d3") == DeviceRecord(device_id="d3", managed=False)     # its pages still mapped
    assert new.get("d3n") is not None and new.get("d3") is None


def test_without_a_usable_directory_each_worker_keeps_its_own_copy(tmp_path, caplog):
    (tmp_path / "file").write_text("")
    with caplog.at_level(logging.WARNING, logger="seg_fast.policy"):
        t = shared_table(_bodies(10), tmp_path / "file" / "policy-records")
    assert t.path is None and t.get("d5") == DeviceRecord(device_id="d5")
    assert "not shared between workers" in caplog.text


async def test_two_gatekeepers_share_a_table_follow_changes_and_fold_them_in(tmp_path, monkeypatch):
    db = tmp_path / "policy.db"
    seed = SqliteStore(db)
    await seed.open()
    await seed.replace_all(PolicyDocument(), [DeviceRecord(device_id=f"PHONE{i}") for i in range(20)])
    d = tmp_path / "state" / "policy-records"
    gates = [PolicyGatekeeper(PolicySettings(sqlite_path=str(db)), store=SqliteStore(db), records_dir=d)
             for _ in range(2)]
    for g in gates:
        await g.store.open()
        await g.reload()
    tables = [g.engine.devices.table for g in gates]
    assert tables[0].path == tables[1].path and os.stat(tables[0].path).st_ino == os.stat(tables[1].path).st_ino
    # changes arrive in the overlay, over the shared table
    await seed.put_devices([DeviceRecord(device_id="phone7", managed=True), DeviceRecord(device_id="NEW")])
    await seed.remove_devices(["PHONE8"])
    for g in gates:
        await g.catch_up()
        assert g.engine.devices.get("phone7").managed and "NEW".lower() in g.engine.devices
        assert g.engine.devices.get("phone8") is None and len(g.engine.devices) == 20
        assert len(g.engine.devices.overlay) == 3 and g.engine.devices.table is tables[gates.index(g)]
    # past the overlay's bound, a worker loads the snapshot again: the changes are in its new table
    monkeypatch.setattr(gate_mod, "OVERLAY_MAX", 3)
    await seed.put_devices([DeviceRecord(device_id="PHONE9", compromised=True)])
    for g in gates:
        await g.catch_up()
        assert not g.engine.devices.overlay and g.engine.devices.table.path != tables[0].path
        assert g.engine.devices.get("phone9").compromised and g.engine.devices.get("phone7").managed
        assert g.engine.devices.get("phone8") is None
    assert gates[0].engine.devices.table.path == gates[1].engine.devices.table.path
    for g in gates:
        await g.store.aclose()
    await seed.aclose()
