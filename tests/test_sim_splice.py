"""The simulator's cached, spliced answers are byte for byte the answers encoding the
whole tree gives (splice_answers=False, the reference), over corpus messages with and
without attachments, signed ones, every body type, truncations, AllOrNone, protocol
2.5 MIME/plain options, read and unread items, Fetch responses and several
collections (so spliced items are followed by every kind of next token)."""
from __future__ import annotations

import pytest

from seg_fast.eas.wbxml import decode, encode
from seg_fast.sim import commands as C
from seg_fast.sim.commands import Ctx
from seg_fast.sim.corpus import Corpus
from seg_fast.sim.mailbox import MailboxSimulator
from seg_fast.sim.query import parse_target
from seg_fast.sim.state import DELETED, INBOX, Item
from seg_fast.sim.tree import E

CORPUS = Corpus(3, cache=512)
MESSAGES = 48          # with attachments (1 to 2 MB), signed ones, several body sizes


def _sims():
    sims = []
    for splice in (True, False):
        sim = MailboxSimulator(seed=3, corpus=CORPUS, splice_answers=splice)
        mbox = sim.mailbox("u")
        for k in range(MESSAGES):
            sid = mbox.add(INBOX if k % 5 else DELETED, Item(k))
            mbox.find(sid)[1].read = k % 3 == 0
        sims.append(sim)
    return sims


def _call(sim, command, version, tree, device="d"):
    vnum = C.version_number(version)
    q = parse_target(f"/Microsoft-Server-ActiveSync?Cmd={command}&User=u&DeviceId={device}&DeviceType=t")[1]
    mbox = sim.mailbox("u")
    body = encode(tree)
    ctx = Ctx(sim, mbox, mbox.device(device), vnum, q, decode(body), body, False)
    return getattr(C, {"Sync": "sync", "ItemOperations": "item_operations"}[command])(ctx)


def _sync(key, cid, options=None, commands=None):
    return E("AirSync:Collection", E("AirSync:Class", "Email"), E("AirSync:SyncKey", key),
             E("AirSync:CollectionId", cid), E("AirSync:WindowSize", 512), commands,
             E("AirSync:Options", *options) if options else None)


def _pref(t, trunc=None, all_or_none=False):
    return E("AirSyncBase:BodyPreference", E("AirSyncBase:Type", t),
             E("AirSyncBase:TruncationSize", trunc) if trunc is not None else None,
             E("AirSyncBase:AllOrNone", 1) if all_or_none else None)


OPTIONS_12 = [[], [_pref(1)], [_pref(1, 4096)], [_pref(2)], [_pref(2, 512, True)], [_pref(2, 100000)],
              [E("AirSync:MIMESupport", 2), _pref(4, 4096)], [_pref(4)], [_pref(3), _pref(2, 2048)]]
OPTIONS_25 = [[], [E("AirSync:Truncation", 1)], [E("AirSync:Truncation", 8)],
              [E("AirSync:MIMESupport", 1), E("AirSync:MIMETruncation", 2)],
              [E("AirSync:MIMESupport", 2), E("AirSync:MIMETruncation", 8)],
              [E("AirSync:MIMESupport", 2), E("AirSync:MIMETruncation", 0)]]


@pytest.mark.parametrize("version", ["2.5", "12.0", "12.1", "14.0", "14.1", "16.0", "16.1"])
def test_sync_answers_identical(version):
    sims = _sims()
    for options in (OPTIONS_25 if version == "2.5" else OPTIONS_12):
        answers = []
        for sim in sims:
            sim.mailbox("u").device("d").sync.clear()
            _call(sim, "Sync", version, E("AirSync:Sync", E("AirSync:Collections",
                                                             _sync("0", INBOX), _sync("0", DELETED))))
            fetch = E("AirSync:Commands", *[E("AirSync:Fetch", E("AirSync:ServerId", sid))
                                            for sid in list(sim.mailbox("u").folder(INBOX))[:3]])
            # Inbox items, then the Fetch responses (after the Adds: a page-0 tag follows a
            # spliced item), then the Deleted folder's items (the next collection follows),
            # the document ending right after the last one.
            answers.append(_call(sim, "Sync", version, E("AirSync:Sync", E("AirSync:Collections",
                           _sync("1", INBOX, options, fetch), _sync("1", DELETED, options)))))
        spliced, whole = answers
        assert whole.status == 200 and decode(whole.body).find("AirSync:Collections") is not None
        assert spliced[:3] == whole[:3], (version, options)
        assert encode(decode(spliced.body)) == spliced.body
    cache = sims[0].splice_cache
    assert cache.misses > 0 and cache.hits > 0       # built once, then reused (Fetch hits)
    if version != "2.5":    # whole MIME bodies (Type 4, no truncation) referenced, not copied
        mimes = {id(CORPUS.message(k).mime) for k in range(MESSAGES)}
        assert any(id(p) in mimes for t in cache.templates.values() for p in t.pieces)
    assert sims[1].splice_cache is None


@pytest.mark.parametrize("version", ["2.5", "12.1", "14.1", "16.1"])
def test_framed_sync_answers_identical(version):
    # one Collection of new items only (a phone's steady state) is written by a frame
    # (splice.SyncFrame) with no tree: still the bytes encoding the whole tree gives,
    # one item or many (page switches between them), MoreAvailable or not
    sims = _sims()
    for n, options in enumerate(OPTIONS_25 if version == "2.5" else OPTIONS_12):
        dev = f"f{n}"
        answers = []
        for sim in sims:
            first = _call(sim, "Sync", version, E("AirSync:Sync", E("AirSync:Collections", _coll_plain("0", INBOX))),
                          dev)
            assert first.status == 200
            mbox = sim.mailbox("u")
            got = [_call(sim, "Sync", version, E("AirSync:Sync", E("AirSync:Collections",
                                                                    _coll_plain(key, INBOX, options, window))), dev)
                   for key, window in (("1", 1), ("2", 4), ("3", 512))]
            sid = mbox.add(INBOX, Item(n))            # one new message, then nothing new
            got += [_call(sim, "Sync", version, E("AirSync:Sync", E("AirSync:Collections",
                                                                     _coll_plain(key, INBOX, options))), dev)
                    for key in ("4", "5")]
            assert sid in mbox.folder(INBOX)
            answers.append(got)
        framed, whole = answers
        assert [a[:3] for a in framed] == [a[:3] for a in whole], (version, options)
        assert all(encode(decode(a.body)) == a.body for a in framed)
    assert sims[0].splice_cache.framed >= 4 * len(OPTIONS_12 if version != "2.5" else OPTIONS_25)


def _coll_plain(key, cid, options=None, window=512):
    """A Collection as a phone sends it: no Class, GetChanges, a window."""
    return E("AirSync:Collection", E("AirSync:SyncKey", key), E("AirSync:CollectionId", cid),
             E("AirSync:DeletesAsMoves", 1), E("AirSync:GetChanges"), E("AirSync:WindowSize", window),
             E("AirSync:Options", *options) if options else None)


def test_spliced_answers_reused_across_devices():
    sims = _sims()
    for dev in ("d1", "d2"):
        bodies = []
        for sim in sims:
            mbox = sim.mailbox("u")
            q = parse_target(f"/eas?Cmd=Sync&User=u&DeviceId={dev}&DeviceType=t")[1]
            for key, opts in (("0", None), ("1", [_pref(2, 4096)])):
                body = encode(E("AirSync:Sync", E("AirSync:Collections", _sync(key, INBOX, opts))))
                ctx = Ctx(sim, mbox, mbox.device(dev), 141, q, decode(body), body, False)
                answer = C.sync(ctx)
            bodies.append(answer.body)
        assert bodies[0] == bodies[1]
    assert sims[0].splice_cache.hits >= MESSAGES * 4 // 5 - 1     # the second device: all cached


def test_item_operations_attachments_identical():
    sims = _sims()
    mbox = sims[0].mailbox("u")
    refs = [C.file_reference(sid, k) for sid, item in mbox.folder(INBOX).items()
            for k in range(len(CORPUS.message(item.msg).attachments))]
    assert len(refs) >= 5
    for k in range(0, len(refs), 2):
        fetches = [E("ItemOperations:Fetch", E("ItemOperations:Store", "Mailbox"),
                     E("AirSyncBase:FileReference", ref)) for ref in refs[k:k + 2]]
        # an EmptyFolderContents after them: another kind of next token
        tree = E("ItemOperations:ItemOperations", *fetches,
                 E("ItemOperations:Fetch", E("ItemOperations:Store", "Mailbox"),
                   E("AirSyncBase:FileReference", "nope:0")))
        spliced, whole = (_call(sim, "ItemOperations", "14.1", tree) for sim in sims)
        assert spliced == whole
        assert decode(whole.body).find("ItemOperations:Response") is not None
    # a Range still goes through the tree
    ranged = E("ItemOperations:ItemOperations", E("ItemOperations:Fetch",
               E("ItemOperations:Store", "Mailbox"), E("AirSyncBase:FileReference", refs[0]),
               E("ItemOperations:Options", E("ItemOperations:Range", "0-99"))))
    spliced, whole = (_call(sim, "ItemOperations", "14.1", ranged) for sim in sims)
    assert spliced == whole


@pytest.mark.parametrize("after", [
    [E("Email:Subject", "same page as the spliced item's last tag")],   # its SWITCH_PAGE dropped
    [E("AirSync:Status", 1)],                  # the placeholder's own page: a SWITCH_PAGE added
    [E("AirSyncBase:NativeBodyType", 2)],      # a third page: the SWITCH_PAGE kept
    [],                                        # only ENDs after it
])
def test_splices_fix_the_code_page_after(after):
    from seg_fast.sim.splice import HOLE, Splices, Template
    item = E("AirSync:ApplicationData", E("Email:To", "a@b.c"),
             E("AirSyncBase:Attachments", E("AirSyncBase:Attachment",
               E("AirSyncBase:FileReference", "x"))), E("Email:MessageClass", "IPM.Note"))
    template = Template(E("AirSync:ApplicationData", E("Email:To", "a@b.c"),
                          E("AirSyncBase:Attachments", E("AirSyncBase:Attachment",
                            E("AirSyncBase:FileReference", HOLE))), E("Email:MessageClass", "IPM.Note")), 1)
    assert template.end_page == 2
    splices = Splices()
    spliced = splices.encode(E("AirSync:Sync", E("AirSync:Add", E("AirSync:ServerId", "1:1"),
                                                  splices.placeholder(template, "x"), *after)))
    whole = encode(E("AirSync:Sync", E("AirSync:Add", E("AirSync:ServerId", "1:1"), item, *after)))
    assert spliced == whole
