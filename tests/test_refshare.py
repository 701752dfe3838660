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
            await trio.sleep(0)
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
