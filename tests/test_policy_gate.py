"""The worker's gatekeeper: fail closed without a store, recover when it comes up,
record what it sees without waiting for I/O."""
from __future__ import annotations

import trio
import trio.testing

from redis_server import free_port, running_redis
from seg_fast.eas.request import EasRequest
from seg_fast.hooks import Decision
from seg_fast.policy.gate import PolicyGatekeeper
from seg_fast.policy.model import DeviceRecord, PolicyDocument
from seg_fast.policy.settings import PolicySettings
from seg_fast.policy.store import RedisStore, StoreError

REQ = EasRequest(method="POST", path="/", command="Sync", user="jdoe", device_id="D1", device_type="iPhone",
                 protocol_version="16.1", user_agent="UA", client_ip="192.0.2.7")


async def test_redis_down_at_start_fails_closed_then_recovers(tmp_path, nursery):
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    gate = PolicyGatekeeper(PolicySettings(store="redis", redis_url=url), node="n/1")
    await nursery.start(gate.run)
    assert not gate.store_ok
    d = gate.decide(REQ)
    assert not d.allowed and d.reason == "blocked.no_policies"
    status, headers, body = gate.blocked_answer(REQ, d)
    assert status == 200 and body.startswith(b"\x03\x01\x6a\x00")
    with running_redis(tmp_path, port=port):
        s = RedisStore(url)
        await s.open()
        await s.replace_all(PolicyDocument(), [DeviceRecord(device_id="D1", managed=True)])
        await s.aclose()
        with trio.fail_after(15):
            # The engine takes the snapshot in before the store counts as up (store_ok, set
            # when the whole load is done): a flush in between keeps its sightings for later.
            while not (gate.store_ok and gate.decide(REQ).allowed):
                await trio.sleep(0.05)
        assert gate.decide(REQ).reason == "allowed.compliant"
        s = RedisStore(url)
        await s.open()
        # One sighting, one flush: the first write after Redis came up must land.
        gate.record(REQ, gate.decide(REQ), 200)
        await gate.flush()
        seen = await s.sightings()
        (seen,) = seen
        assert (seen.device_id, seen.ip, seen.node, seen.status, seen.http_status) == ("D1", "192.0.2.7", "n/1",
                                                                                     "allowed", 200)
        await s.aclose()
        nursery.cancel_scope.cancel()


class _SlowStore:
    """Writes that take a while (trio's autojump clock makes them instant), as Redis's do."""
    writable = True

    def __init__(self):
        self.sightings: dict[str, object] = {}

    async def put_entries(self, ns, entries, *, notify=False):
        await trio.sleep(1)

    async def put_sightings(self, sightings, new=None):
        await trio.sleep(2)
        self.sightings.update((s.device_id, s) for s in sightings)


def _gate_on(store) -> PolicyGatekeeper:
    gate = PolicyGatekeeper(PolicySettings(store="sqlite", sqlite_path=":memory:"), node="n/1", store=store)
    gate.store_ok = True
    return gate


async def test_a_flush_that_returns_has_written_what_was_recorded_before_it(autojump_clock, nursery):
    # The loop's flush starts while a caller's waits on the store (its heartbeat): it must not
    # take the caller's sightings away and leave the caller to return before they are written.
    store = _SlowStore()
    gate = _gate_on(store)
    gate.record(REQ, gate.decide(REQ), 200)
    done = trio.Event()

    async def caller():
        await gate.flush()
        assert "D1" in store.sightings
        done.set()

    nursery.start_soon(caller)
    await trio.testing.wait_all_tasks_blocked()      # the caller in its heartbeat write
    nursery.start_soon(gate.flush)                   # the loop's tick
    with trio.fail_after(60):
        await done.wait()


async def test_a_flush_cancelled_mid_write_leaves_its_sightings_to_the_last_one(autojump_clock):
    store = _SlowStore()
    gate = _gate_on(store)
    gate._last_heartbeat = float("inf")              # straight to the sightings
    gate.record(REQ, gate.decide(REQ), 200)
    with trio.move_on_after(1):                      # mid put_sightings
        await gate.flush()
    assert not store.sightings
    await gate.flush()                               # the shutdown's
    assert store.sightings["D1"].ip == "192.0.2.7"


async def test_a_flush_cancelled_between_chunks_leaves_the_rest_to_the_last_one(tmp_path, monkeypatch):
    """Cancelled at its checkpoint between chunks (the first chunk written), the flush
    gives back the chunks it had not reached."""
    import seg_fast.policy.gate as g
    monkeypatch.setattr(g, "FLUSH_CHUNK", 7)
    gate = PolicyGatekeeper(PolicySettings(sqlite_path=str(tmp_path / "p.db")))
    gate._last_heartbeat = float("inf")
    for i in range(30):
        gate.record(EasRequest(method="POST", path="/", device_id=f"D{i}"), Decision(True, "allowed.x"), 200)
    await gate.store.open()
    gate.store_ok = True
    written: list[str] = []
    with trio.CancelScope() as scope:
        async def put_sightings(sightings, new=None):
            written.extend(s.device_id for s in sightings)
            scope.cancel()                           # lands on the flush's next checkpoint

        monkeypatch.setattr(gate.store, "put_sightings", put_sightings)
        await gate.flush()
    assert scope.cancelled_caught and len(written) == 7
    await gate.flush()                               # the shutdown's
    assert sorted(written) == sorted(f"D{i}" for i in range(30))
    await gate.store.aclose()


async def test_record_is_bounded_and_test_mode_is_recorded(tmp_path, monkeypatch):
    import seg_fast.policy.gate as g
    monkeypatch.setattr(g, "MAX_PENDING_SIGHTINGS", 10)
    gate = PolicyGatekeeper(PolicySettings(sqlite_path=str(tmp_path / "p.db")))
    for i in range(50):
        gate.record(EasRequest(method="POST", path="/", device_id=f"D{i}"), Decision(True, "allowed.x"), 200)
    assert len(gate._pending) == 10
    gate.record(EasRequest(method="POST", path="/", device_id="D1"),
                Decision(True, "blocked.user", test_mode=True), 200)
    gate.record(EasRequest(method="POST", path="/"), Decision(True, "allowed.x"), 200)   # no DeviceId: ignored
    assert len(gate._pending) == 10
    await gate.store.open()
    gate.store_ok = True
    await gate.flush()
    seen = {s.device_id: s for s in await gate.store.sightings()}
    assert len(seen) == 10 and seen["D1"].status == "test_mode" and seen["D1"].reason == "blocked.user"
    assert not gate._pending
    await gate.store.aclose()


async def test_folder_classes_learned_by_one_worker_reach_another(tmp_path, nursery):
    """Sync Settings: worker A carries the FolderSync answer; worker B refuses Sync of the
    hidden folder because the learned classes travel through the store."""
    from seg_fast.eas.wbxml import Element, encode
    from seg_fast.policy.model import GeneralAccess, SyncSettingsPolicy
    from seg_fast.policy.store import SqliteStore

    s = SqliteStore(tmp_path / "p.db")
    await s.open()
    await s.replace_all(PolicyDocument(general=GeneralAccess(sync_settings=SyncSettingsPolicy(
        enabled=True, blocked_classes=["calendar"]))), [])
    await s.aclose()
    settings = PolicySettings(sqlite_path=str(tmp_path / "p.db"))
    a, b = PolicyGatekeeper(settings, node="n/a"), PolicyGatekeeper(settings, node="n/b")
    await nursery.start(a.run)
    await nursery.start(b.run)
    fh = "FolderHierarchy:"
    answer = encode(Element(fh + "FolderSync", [
        Element(fh + "Status", text="1"), Element(fh + "SyncKey", text="0"),
        Element(fh + "Changes", [Element(fh + "Count", text="1"), Element(fh + "Add", [
            Element(fh + "ServerId", text="cal"), Element(fh + "ParentId", text="0"),
            Element(fh + "DisplayName", text="Calendar"), Element(fh + "Type", text="8")])])]))
    fs_req = EasRequest(method="POST", path="/", command="FolderSync", user="jdoe", device_id="D1")
    (filt,) = [t for t in a.decide(fs_req).transforms if "FolderSync" in t.commands]
    filt.transform_answer(fs_req, 200, [], answer)
    sync = encode(Element("AirSync:Sync", [Element("AirSync:Collections", [Element("AirSync:Collection", [
        Element("AirSync:SyncKey", text="1"), Element("AirSync:CollectionId", text="cal")])])]))
    sync_req = EasRequest(method="POST", path="/", command="Sync", user="jdoe", device_id="D1")
    (guard,) = [t for t in b.decide(sync_req).transforms if hasattr(t, "transform_request")]
    assert guard.transform_request(sync_req, sync) is sync     # B has not learned it yet
    await a.flush()
    with trio.fail_after(10):    # generous: the mechanism, not the scheduler, is under test
        while guard.transform_request(sync_req, sync) is not None:
            await trio.sleep(0.02)
    nursery.cancel_scope.cancel()


async def test_a_big_flush_builds_and_writes_its_sightings_a_chunk_per_step(tmp_path, monkeypatch):
    """Thousands of devices leaving together leave a record each: the flush builds and
    writes their sightings FLUSH_CHUNK at a time, each chunk in a task step of its own,
    and every device's sighting is written (the store's write here never yields, so
    only the flush's own checkpoint separates the chunks)."""
    import seg_fast.policy.gate as g
    monkeypatch.setattr(g, "FLUSH_CHUNK", 7)
    gate = PolicyGatekeeper(PolicySettings(sqlite_path=str(tmp_path / "p.db")))
    for i in range(30):
        gate.record(EasRequest(method="POST", path="/", device_id=f"D{i}"), Decision(True, "allowed.x"), 200)
    await gate.store.open()
    gate.store_ok = True
    written: list[list[str]] = []

    async def put_sightings(sightings, new=None):
        written.append([s.device_id for s in sightings])

    monkeypatch.setattr(gate.store, "put_sightings", put_sightings)
    built_in_step = [0]
    most = [0]
    real = gate._sighting

    def sighting(*args):
        built_in_step[0] += 1
        most[0] = max(most[0], built_in_step[0])
        return real(*args)

    monkeypatch.setattr(gate, "_sighting", sighting)

    class Steps(trio.abc.Instrument):
        def before_task_step(self, task):
            built_in_step[0] = 0

    trio.lowlevel.add_instrument(Steps())
    await gate.flush()
    assert [len(w) for w in written] == [7, 7, 7, 7, 2]
    assert sorted(d for w in written for d in w) == sorted(f"D{i}" for i in range(30))
    assert most[0] == 7
    await gate.store.aclose()


async def test_first_seen_is_offered_once_per_device_and_worker(tmp_path, monkeypatch):
    """A device's first_seen goes to the store with the flush that first sees it, not with
    every later one (the store keeps the earliest anyway: the repeats were wasted rows); a
    flush the store refused offers it again with the device's next sighting."""
    from seg_fast.policy.model import device_key

    gate = PolicyGatekeeper(PolicySettings(sqlite_path=str(tmp_path / "p.db")))
    await gate.store.open()
    gate.store_ok = True
    offered: list[set] = []
    real = gate.store.put_sightings
    fail = [True]

    async def put_sightings(sightings, new=None):
        offered.append(set(new))
        if fail[0]:
            fail[0] = False
            raise StoreError("disk full")        # the first flush is lost: its first_seen is offered again
        await real(sightings, new)

    monkeypatch.setattr(gate.store, "put_sightings", put_sightings)
    req = EasRequest(method="POST", path="/", device_id="Dev1")
    gate.record(req, Decision(True, "allowed.x"), 200)
    first = gate.engine.now
    await gate.flush()
    assert await gate.store.sightings() == []
    gate.engine.now += 30
    gate.record(req, Decision(True, "allowed.x"), 200)
    await gate.flush()
    gate.engine.now += 30
    gate.record(req, Decision(True, "allowed.x"), 200)
    gate.record(EasRequest(method="POST", path="/", device_id="Dev2"), Decision(True, "allowed.x"), 200)
    await gate.flush()
    assert offered == [{device_key("Dev1")}, {device_key("Dev1")}, {device_key("Dev2")}]
    assert sorted(await gate.store.get_entries("first_seen")) == [device_key("Dev1"), device_key("Dev2")]
    seen = {s.device_id: s for s in await gate.store.sightings()}
    assert seen["Dev1"].first_seen == first and seen["Dev1"].last_seen == first + 60
    assert seen["Dev2"].first_seen == first + 60
    await gate.store.aclose()
