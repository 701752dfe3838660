"""Attachment names and kinds passed between a serve's workers (refshare.py over proxy/channel.py).

In one process: the control process's Hub relays a worker's entry to every other worker
(never back to the sender), over real socketpairs; a worker puts a received entry into its
pipeline cache without publishing it again; nothing passes outside a serve.
"""
from __future__ import annotations

import socket
import threading

import msgspec
import pytest
import trio

from seg_fast import refshare
from seg_fast.content import pipeline
from seg_fast.content.settings import ContentSettings
from seg_fast.proxy import channel


class SharingRuntime(pipeline._Runtime):
    """The pipeline's cache with the ``share`` keyword (as refshare.received calls it)."""

    def __init__(self):
        super().__init__(ContentSettings())
        self.published = []

    def remember(self, user, ref, name, *, share=True):
        super().remember(user, ref, name)
        if share:
            self.published.append(("name", user, ref, name))

    def remember_kind(self, user, ref, kind, *, share=True):
        super().remember_kind(user, ref, kind)
        if share:
            self.published.append(("kind", user, ref, kind))


@pytest.fixture
def runtime(monkeypatch):
    rt = SharingRuntime()
    monkeypatch.setattr(pipeline, "_runtime", rt)
    return rt


def entry(what, user, ref, value) -> bytes:
    return refshare.MAGIC + msgspec.msgpack.encode((what, user, ref, value))


def test_hub_relays_to_every_other_worker():
    async def main():
        hub = channel.Hub(relayed=frozenset({refshare.MAGIC}))
        ends = {}
        for pid in (11, 12, 13):
            ours, theirs = hub.pair()
            theirs.setblocking(False)
            hub.started(pid, ours)
            ends[pid] = theirs
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hub.run)
            await trio.lowlevel.checkpoint()
            message = entry(refshare.NAME, "kim", "5%3a1%3a0", "Q3 report.pdf")
            ends[11].send(message)
            ends[11].send(b"XXXXXother kinds are not relayed")
            got = {}
            with trio.fail_after(10):
                for pid in (12, 13):
                    await trio.lowlevel.wait_readable(ends[pid])
                    got[pid] = ends[pid].recv(1024)
            assert got == {12: message, 13: message}
            # Not back to the sender, and nothing else went out.
            await trio.sleep(0.05)
            for pid in (11, 12, 13):
                with pytest.raises(BlockingIOError):
                    ends[pid].recv(1024)
            # A worker gone: the others still get what a third sends.
            ends[13].close()
            hub.gone(13)
            ends[12].send(entry(refshare.KIND, "kim", "r", "pdf"))
            with trio.fail_after(10):
                await trio.lowlevel.wait_readable(ends[11])
            assert ends[11].recv(1024) == entry(refshare.KIND, "kim", "r", "pdf")
            nursery.cancel_scope.cancel()
        hub.close()

    trio.run(main)


def test_received_entries_land_in_the_cache_and_are_not_published_again(runtime):
    refshare.received(entry(refshare.NAME, "kim", "5%3a1%3a0", "\0exempt\0signed.pdf"))
    refshare.received(entry(refshare.KIND, "kim", "5%3a1%3a0", "pdf"))
    assert runtime.name_of("KIM", "5%3a1%3a0") == "\0exempt\0signed.pdf"
    assert runtime.kind_of("kim", "5%3a1%3a0") == "pdf"
    assert runtime.published == []
    refshare.received(b"SFRF1 not msgpack")          # ignored, as a malformed entry
    refshare.received(entry(7, "kim", "x", "y"))      # an unknown kind: ignored
    assert runtime.name_of("kim", "x") == ""


def test_a_pipeline_without_the_share_keyword_is_never_fed(monkeypatch):
    """It would publish what it received: two workers would pass it back and forth for ever."""
    class NoShare(pipeline._Runtime):
        def remember(self, user, ref, name):
            super().remember(user, ref, name)

        def remember_kind(self, user, ref, kind):
            super().remember_kind(user, ref, kind)

    rt = NoShare(ContentSettings())
    monkeypatch.setattr(pipeline, "_runtime", rt)
    refshare.received(entry(refshare.NAME, "kim", "r", "a.pdf"))
    assert rt.name_of("kim", "r") == ""


def test_publish_sends_from_any_thread_and_nothing_outside_a_serve(monkeypatch):
    monkeypatch.setattr(channel, "_worker_sock", None)
    refshare.publish(refshare.NAME, ("kim", "r"), "a.pdf")       # outside a serve: nothing, no error
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    monkeypatch.setattr(channel, "_worker_sock", ours)
    threads = [threading.Thread(target=refshare.publish, args=(refshare.NAME, ("kim", f"r{i}"), f"{i}.pdf"))
               for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    refshare.publish(refshare.KIND, ("kim", "x" * 2000), "pdf")     # too long: stays local
    got = sorted(msgspec.msgpack.decode(theirs.recv(1024)[5:]) for _ in range(8))
    assert got == sorted([refshare.NAME, "kim", f"r{i}", f"{i}.pdf"] for i in range(8))
    theirs.setblocking(False)
    with pytest.raises(BlockingIOError):
        theirs.recv(1024)
    ours.close()
    theirs.close()


def test_table_keeps_the_latest_within_its_bound_and_replays_in_batches(runtime):
    table = refshare.Table(limit=300)
    table.note(b"XXXXXnot an entry")
    for i in range(400):
        table.note(entry(refshare.NAME, "kim", f"ref{i}", f"old-{i}.pdf"))
    table.note(entry(refshare.NAME, "kim", "ref399", "new-399.pdf"))
    table.note(entry(refshare.KIND, "kim", "ref399", "pdf"))
    assert len(table.entries) == 300                      # the oldest 101 names out
    assert ("kim", "ref0") not in {(u, r) for _, u, r in table.entries}
    big = "n" * 900
    for i in range(100):
        table.note(entry(refshare.NAME, "lee", f"big{i}", big))
    batches = table.replay()
    assert len(batches) > 1 and all(len(b) < refshare.BATCH_BYTES + 2048 for b in batches)
    for b in batches:
        refshare.received_batch(b)
    assert runtime.name_of("kim", "ref399") == "new-399.pdf" and runtime.kind_of("kim", "ref399") == "pdf"
    assert runtime.name_of("lee", "big99") == big
    assert runtime.name_of("kim", "ref0") == ""
    assert runtime.published == []


def test_a_worker_started_later_gets_the_backlog():
    async def main():
        hub = channel.Hub(relayed=frozenset({refshare.MAGIC}), kept=refshare.Table(10_000))
        ours, first = hub.pair()
        first.setblocking(False)
        hub.started(1, ours)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hub.run)
            await trio.lowlevel.checkpoint()
            sent = [entry(refshare.NAME, "kim", f"r{i}", f"file {i} " + "x" * 200 + ".pdf") for i in range(3000)]
            for message in sent:        # more than a socket buffer holds in one go
                while True:
                    try:
                        first.send(message)
                        break
                    except BlockingIOError:
                        await trio.sleep(0.001)
            with trio.fail_after(10):
                while len(hub.kept.entries) < 3000:
                    await trio.sleep(0.01)
            ours2, later = hub.pair()
            later.setblocking(False)
            hub.started(2, ours2)
            got = []
            with trio.fail_after(20):
                while len(got) < 3000:
                    await trio.lowlevel.wait_readable(later)
                    message = later.recv(channel.MAX_MESSAGE)
                    assert message.startswith(refshare.BATCH)
                    got += refshare._decode_batch(message[len(refshare.BATCH):])
            assert [tuple(e) for e in got] == [refshare._decode(m[5:]) for m in sent]
            nursery.cancel_scope.cancel()
        hub.close()

    trio.run(main)


def test_messages_before_their_handler_are_handled_when_it_is_set(monkeypatch):
    monkeypatch.setattr(channel, "handlers", {})
    monkeypatch.setattr(channel, "_pending", [])
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    theirs.setblocking(False)
    for m in (b"AAAAA1", b"BBBBB1", b"AAAAA2"):
        ours.send(m)
    seen = []
    channel.handle(b"BBBBB", seen.append)
    assert channel._take(theirs) and seen == [b"BBBBB1"]
    channel.handle(b"AAAAA", seen.append)          # the early ones, in order
    assert seen == [b"BBBBB1", b"AAAAA1", b"AAAAA2"] and channel._pending == []
    ours.close()
    assert not channel._take(theirs)               # EOF: the control process is gone
    theirs.close()
