"""Both policy stores against the same contract: SQLite (a real file, WAL) and Redis
(a real redis-server on a free port). Changes reach a second reader within a second."""
from __future__ import annotations

import pytest
import trio

from redis_server import free_port, running_redis
from seg_fast.errors import PolicyError
from seg_fast.policy.model import DeviceRecord, DeviceSighting, ManagedDevicePolicies, PolicyDocument
from seg_fast.policy.resp import RedisConnection, RespParser, RedisError, encode_command, _Incomplete
from seg_fast.policy.store import RedisStore, SqliteStore, StoreError


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    with running_redis(tmp_path_factory.mktemp("redis")) as url:
        yield url


_n = [0]


@pytest.fixture(params=["sqlite", "redis"])
def make_store(request, tmp_path):
    """A factory: every call opens another handle on the same store (another worker)."""
    _n[0] += 1
    if request.param == "sqlite":
        path = tmp_path / "policy.db"

        def make():
            return SqliteStore(path)
    else:
        url = request.getfixturevalue("redis_url")
        prefix = f"t{_n[0]}:"

        def make():
            return RedisStore(url, prefix=prefix)
    return make


DOC = PolicyDocument(managed=ManagedDevicePolicies(compromised=True))


async def opened(make):
    s = make()
    await s.open()
    return s


async def test_round_trip(make_store):
    s = await opened(make_store)
    snap = await s.snapshot()
    assert snap.document is None and snap.devices == []
    v1 = await s.replace_all(DOC, [DeviceRecord(device_id="A", managed=True), DeviceRecord(device_id="B")])
    snap = await s.snapshot()
    assert snap.version == v1 > 0
    assert snap.document == DOC
    assert sorted(d.device_id for d in snap.devices) == ["A", "B"]
    v2 = await s.put_devices([DeviceRecord(device_id="a", compromised=True)])
    assert v2 > v1
    assert (await s.get_device("A")).compromised is True
    v3 = await s.remove_devices(["B"])
    assert v3 > v2 and await s.get_device("b") is None
    assert await s.get_document() == DOC
    await s.put_document(PolicyDocument())
    assert await s.get_document() == PolicyDocument()
    await s.set_meta("test_mode", "1")
    assert await s.get_meta("test_mode") == "1" and await s.get_meta("nope") is None
    await s.put_sightings([DeviceSighting(device_id="A", first_seen=10.0, last_seen=10.0)])
    await s.put_sightings([DeviceSighting(device_id="A", first_seen=20.0, last_seen=20.0, reason="x")])
    (seen,) = await s.sightings()
    assert seen.first_seen == 10.0 and seen.last_seen == 20.0 and seen.reason == "x"
    # replace_all drops devices that are not in the new set
    await s.replace_all(None, [DeviceRecord(device_id="C")])
    snap = await s.snapshot()
    assert snap.document is None and [d.device_id for d in snap.devices] == ["C"]
    with pytest.raises(StoreError):
        await s.put_entries("nonsense", {"a": b"b"})
    await s.aclose()


async def test_put_sightings_offers_first_seen_only_for_the_new_keys(make_store):
    """``new`` names the devices whose first_seen the caller has not offered before: only
    theirs is written; a first_seen already kept stays the earliest either way."""
    s = await opened(make_store)
    await s.put_sightings([DeviceSighting(device_id="A", first_seen=5.0, last_seen=5.0)])
    await s.put_sightings([DeviceSighting(device_id="A", first_seen=1.0, last_seen=30.0),
                           DeviceSighting(device_id="B", first_seen=30.0, last_seen=30.0),
                           DeviceSighting(device_id="C", first_seen=30.0, last_seen=30.0)], new={"b"})
    assert sorted(await s.get_entries("first_seen")) == ["a", "b"]      # C's was not offered
    seen = {x.device_id: x for x in await s.sightings()}
    assert {k: (v.first_seen, v.last_seen) for k, v in seen.items()} == \
        {"A": (5.0, 30.0), "B": (30.0, 30.0), "C": (30.0, 30.0)}          # C's from its own sighting
    await s.aclose()


async def test_survives_reopen(make_store):
    s = await opened(make_store)
    await s.replace_all(DOC, [DeviceRecord(device_id="A", managed=True)])
    await s.aclose()
    s2 = await opened(make_store)
    snap = await s2.snapshot()
    assert snap.document == DOC and snap.devices[0].managed
    await s2.aclose()


async def test_second_reader_sees_change_within_a_second(make_store):
    writer, reader = await opened(make_store), await opened(make_store)
    await writer.replace_all(DOC, [])
    got = []

    since = await reader.version()     # what the reader holds: every later write is seen

    async def follow(task_status=trio.TASK_STATUS_IGNORED):
        agen = reader.subscribe(since=since)
        task_status.started()
        async for ch in agen:
            got.append(ch)
            if ch.kind == "device":
                return

    async with trio.open_nursery() as n:
        await n.start(follow)
        with trio.fail_after(10):     # generous: the mechanism, not the scheduler, is under test
            # A first change proves the subscription live (Redis reports one written before
            # its SUBSCRIBE took hold as a "reload"); the device change is then delivered as such.
            await writer.set_meta("marker", "1")
            while not got:
                await trio.sleep(0.01)
            assert got[0].kind in ("meta", "reload")
            t0 = trio.current_time()
            await writer.put_devices([DeviceRecord(device_id="Z", managed=True)])
            while got[-1].kind != "device":
                await trio.sleep(0.01)
        print(f"change seen after {trio.current_time() - t0:.3f} s")
    assert got[-1].key == "z"
    await writer.aclose()
    await reader.aclose()


async def test_damaged_document_is_a_policy_error(tmp_path):
    s = SqliteStore(tmp_path / "p.db")
    await s.open()
    await s._run(lambda db: db.execute("INSERT INTO document(id, body) VALUES (1, ?)", (b'{"general": 5}',)))
    with pytest.raises(PolicyError, match="damaged"):
        await s.snapshot()
    await s.aclose()


async def test_unreachable_redis_is_a_store_error():
    from redis_server import free_port
    s = RedisStore(f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(StoreError, match="cannot connect"):
        await s.open()


async def test_sqlite_change_log_trim_means_reload(tmp_path, monkeypatch):
    import seg_fast.policy.store as st
    monkeypatch.setattr(st, "_KEEP_CHANGES", 3)
    s = SqliteStore(tmp_path / "p.db")
    await s.open()
    v = await s.put_devices([DeviceRecord(device_id="A")])
    for i in range(6):
        await s.put_devices([DeviceRecord(device_id=f"D{i}")])
    changes = await s.changes_since(v)
    assert [c.kind for c in changes] == ["reload"]
    await s.aclose()


def test_resp_parser():
    p = RespParser()
    p.feed(b"+OK\r\n:42\r\n$3\r\nabc\r\n$-1\r\n*2\r\n$1\r\na\r\n:1\r\n-ERR bad\r\n$5\r\nab")
    assert p.next() == "OK"
    assert p.next() == 42
    assert p.next() == b"abc"
    assert p.next() is None
    assert p.next() == [b"a", 1]
    err = p.next()
    assert isinstance(err, RedisError) and "bad" in str(err)
    with pytest.raises(_Incomplete):
        p.next()
    p.feed(b"cde\r\n")
    assert p.next() == b"abcde"
    assert encode_command("SET", "k", 5) == b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\n5\r\n"
    p.feed(b"?what\r\n")
    with pytest.raises(RedisError):
        p.next()


async def test_redis_reconnects_after_a_lost_connection(redis_url):
    s = RedisStore(redis_url, prefix="reconnect:")
    await s.open()
    await s.put_devices([DeviceRecord(device_id="A")])
    # The connection breaks in the middle of a call: killed by another client while it waits.
    own_id = await s._conn.execute("CLIENT", "ID")
    killer = await RedisConnection.connect(redis_url)
    errors = []

    async def blocked_call():
        try:
            await s._pipe([("BLPOP", "reconnect:nothing", "20")])
        except StoreError as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(blocked_call)
        with trio.fail_after(10):
            while b"cmd=blpop" not in await killer.execute("CLIENT", "LIST", "ID", own_id):
                await trio.sleep(0.02)      # wait until the call is in Redis's hands
        assert await killer.execute("CLIENT", "KILL", "ID", own_id) == 1
    await killer.aclose()
    assert len(errors) == 1 and "connection" in str(errors[0])
    assert (await s.get_device("A")).device_id == "A"   # the next call reconnects
    # Closed while idle (seen before sending): the call itself reconnects and succeeds.
    await s._conn.stream.aclose()
    assert (await s.get_device("A")).device_id == "A"
    await s.aclose()


async def test_first_write_after_a_redis_restart_lands(tmp_path):
    port = free_port()
    with running_redis(tmp_path, port=port) as url:
        s = RedisStore(url, prefix="restart:")
        await s.open()
        await s.put_devices([DeviceRecord(device_id="A")])
    with running_redis(tmp_path, port=port):     # a new Redis on the same address, empty
        # The store's idle connection was closed by the old Redis: the write must not be lost.
        await s.put_devices([DeviceRecord(device_id="B")])
        assert (await s.get_device("B")).device_id == "B"
        assert await s.get_device("A") is None
        await s.aclose()


async def test_bulk_update_is_one_reload(make_store):
    writer, reader = await opened(make_store), await opened(make_store)
    await writer.replace_all(DOC, [])
    got = []

    since = await reader.version()

    async def follow(task_status=trio.TASK_STATUS_IGNORED):
        agen = reader.subscribe(since=since)
        task_status.started()
        async for ch in agen:
            got.append(ch)

    async with trio.open_nursery() as n:
        await n.start(follow)
        await writer.put_devices([DeviceRecord(device_id=f"D{i}") for i in range(1500)])
        with trio.fail_after(20):     # generous: the mechanism, not the scheduler, is under test
            while not got:
                await trio.sleep(0.01)
            # A later, single change marks the end: changes arrive in order, so anything
            # more the bulk write produced would come before it.
            await writer.set_meta("marker", "1")
            while got[-1].kind != "meta":
                await trio.sleep(0.01)
        n.cancel_scope.cancel()
    assert [c.kind for c in got] == ["reload", "meta"]
    assert len((await reader.snapshot()).devices) == 1500
    await writer.aclose()
    await reader.aclose()


async def test_sqlite_subscribe_reads_the_table_only_when_the_file_changed(tmp_path):
    """A worker's subscription reads the changes table (a thread hop each) only when the
    file shows a write, and at least every recheck_every seconds: counted, not timed."""
    path = tmp_path / "p.db"
    writer, reader = SqliteStore(path), SqliteStore(path)
    await writer.open()
    await reader.open()
    reader.poll_interval, reader.recheck_every = 0.01, 3600.0     # only a write makes a read
    got = []

    async def follow(task_status=trio.TASK_STATUS_IGNORED):
        agen = reader.subscribe(since=await reader.version())
        task_status.started()
        async for ch in agen:
            got.append(ch)

    async with trio.open_nursery() as n:
        await n.start(follow)
        with trio.fail_after(20):
            while reader.reads < 1:              # the first look reads: nothing seen yet
                await trio.sleep(0.01)
            idle_from = reader.reads
            for _ in range(30):                  # 30 polls of an unchanged file
                await trio.sleep(0.01)
            assert reader.reads == idle_from
            await writer.put_devices([DeviceRecord(device_id="Z", managed=True)])
            while not got:
                await trio.sleep(0.01)
        assert reader.reads > idle_from and got[-1].kind == "device" and got[-1].key == "z"
        # With the recheck due, an unchanged file is read again anyway.
        reader.recheck_every = 0.0
        seen = reader.reads
        with trio.fail_after(20):
            while reader.reads < seen + 3:
                await trio.sleep(0.01)
        n.cancel_scope.cancel()
    await writer.aclose()
    await reader.aclose()
