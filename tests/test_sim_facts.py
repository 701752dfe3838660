"""The facts the simulator records as it builds a Sync or ItemOperations answer
(facts.py) are exactly what decoding the answer's bytes gives (``facts.sync_of`` /
``facts.fetch_of``, the fleet's decode path) — over corpus messages with and without
attachments, signed ones, every body type, truncations, AllOrNone, read and unread
items, several collections, the initial and error answers, whole and ranged and
failed Fetches. And the fleet's check reads them as strictly as it read the decoded
tree: a duplicated or missing ServerId, a body of the wrong size or type, a Type 4
body without a MIME header, a stale SyncKey, a missing Fetch or Data are each a
recorded failure, by record as by decoding."""
from __future__ import annotations

import pytest

from test_sim_splice import CORPUS, MESSAGES, OPTIONS_12, _call, _pref
from test_sim_splice import _coll_plain as _coll
from seg_fast.eas.wbxml import decode
from seg_fast.sim import commands as C
from seg_fast.sim import facts
from seg_fast.sim import fleet_eas as eas
from seg_fast.sim.fleet import Fleet, ShardSpec
from seg_fast.sim.mailbox import MailboxSimulator
from seg_fast.sim.state import DELETED, INBOX, Item
from seg_fast.sim.tree import E


def _sim():
    sim = MailboxSimulator(seed=3, corpus=CORPUS)
    mbox = sim.mailbox("u")
    for k in range(MESSAGES):
        sid = mbox.add(INBOX if k % 5 else DELETED, Item(k))
        mbox.find(sid)[1].read = k % 3 == 0
    return sim


OPTIONS = [*OPTIONS_12, [E("AirSync:MIMESupport", 2), _pref(4)]]


def _sync(*colls):
    return E("AirSync:Sync", E("AirSync:Collections", *colls))


def _same(answer):
    """The recorded facts, required equal to the decoded ones; returned."""
    assert answer.facts is not None
    decoded = (facts.sync_of(decode(answer.body))[0] if type(answer.facts) is facts.Sync
               else facts.fetch_of(decode(answer.body)))
    assert decoded == answer.facts
    return answer.facts


@pytest.mark.parametrize("version", ["12.0", "14.1", "16.1"])
def test_recorded_sync_facts_are_the_decoded_ones(version):
    sim = _sim()
    items = 0
    for n, options in enumerate(OPTIONS):
        dev = f"d{n}"
        first = _same(_call(sim, "Sync", version, _sync(_coll("0", INBOX), _coll("0", DELETED)), dev))
        assert first == facts.Sync(None, True, "1", "1", False, ())
        # a small window first (MoreAvailable), then the rest, then the Deleted folder's first
        got = _same(_call(sim, "Sync", version, _sync(_coll("1", INBOX, options, window=5)), dev))
        assert got.more and len(got.adds) == 5 and got.sync_key == "2"
        rest = _same(_call(sim, "Sync", version, _sync(_coll("2", INBOX, options), _coll("1", DELETED, options)),
                           dev))
        assert not rest.more and len(rest.adds) == len(sim.mailbox("u").folder(INBOX)) - 5
        items += len(got.adds) + len(rest.adds)
        # a retry of the last request (its answer lost): the same items again, a new key
        again = _same(_call(sim, "Sync", version, _sync(_coll("2", INBOX, options)), dev))
        assert [s for s, _ in again.adds] == [s for s, _ in rest.adds]
    assert items > 300
    # attachments' FileReferences carry each item's ServerId (the template's hole filled)
    with_att = [(sid, it) for sid, it in rest.adds if it.attachments]
    assert with_att and all(ref.startswith(sid + ":") for sid, it in with_att for ref, _s, _n in it.attachments)
    # the error answers: a stale key, an unknown folder, a request that is not a Sync
    assert _same(_call(sim, "Sync", version, _sync(_coll("99", INBOX)), "d0")).status == "3"
    assert _same(_call(sim, "Sync", version, _sync(_coll("1", "77")), "d0")).status == "8"
    assert _same(_call(sim, "Sync", version, E("AirSync:Sync", E("AirSync:Status", 1)), "d0")).top == "4"


def test_recorded_fetch_facts_are_the_decoded_ones():
    sim = _sim()
    mbox = sim.mailbox("u")
    refs = [(C.file_reference(sid, k), len(blob)) for sid, item in mbox.folder(INBOX).items()
            for k, (_n, _c, blob) in enumerate(CORPUS.message(item.msg).attachments)]
    assert len(refs) >= 5

    def fetch(ref, options=None):
        return E("ItemOperations:ItemOperations", E("ItemOperations:Fetch", E("ItemOperations:Store", "Mailbox"),
                 E("AirSyncBase:FileReference", ref), options))
    for ref, size in refs:
        assert _same(_call(sim, "ItemOperations", "14.1", fetch(ref))) == facts.Fetch("1", "1", size)
    ref, size = refs[0]
    ranged = _same(_call(sim, "ItemOperations", "14.1",
                         fetch(ref, E("ItemOperations:Options", E("ItemOperations:Range", "0-99")))))
    assert ranged == facts.Fetch("1", "1", min(100, size))
    assert _same(_call(sim, "ItemOperations", "14.1", fetch("nope:0"))) == facts.Fetch("1", "15", -1)


# -- the fleet's check, fed by record --------------------------------------------------------

def _device(body_type=2):
    sim = MailboxSimulator(seed=3, corpus=CORPUS)
    fleet = Fleet(ShardSpec(devices=2, first_device=0 if body_type == 2 else 1), sim)
    fleet.strict, fleet.security = True, False
    fleet.crosscheck_every = 10 ** 9          # checked by record alone
    dev = fleet.devices[0]
    dev.sync_key, dev.delivered, dev.received = "1", 3, 0
    assert dev.body_type == body_type
    return dev


def _item(size=100, **kw):
    base = dict(body=True, body_type="2", data_len=size, estimated=str(size), truncated=False,
                mime_head=False, attachments=(("1:1:0", "5000", "a.pdf"),))
    base.update(kw)
    return facts.Item(**base)


def _answer(*adds, key="2", more=False):
    return (200, [], b"\x03\x01\x6a\x00", facts.Sync(None, True, "1", key, more, tuple(adds)))


def _failures(dev):
    return dict(dev.fleet.stats.failures)


def test_the_check_by_record_accepts_a_good_answer():
    dev = _device()
    assert eas.sync_answer(dev, _answer(("1:1", _item()), ("1:2", _item(7, attachments=()))), False, False, 3)
    assert _failures(dev) == {} and dev.received == 2 and dev.sync_key == "2"
    assert dev.attachments == [("1:1:0", 5000)] and dev.fleet.stats.facts_checked == 1


@pytest.mark.parametrize("answer, first_download, failure", [
    (_answer(("1:1", _item()), ("1:1", _item())), False, "Sync.duplicate"),
    (_answer((None, _item())), False, "Sync.duplicate"),
    (_answer(("1:1", _item(100, data_len=99))), False, "Sync.size"),
    (_answer(("1:1", _item(body_type="1"))), False, "Sync.body"),
    (_answer(("1:1", _item(body=False))), False, "Sync.body"),
    (_answer(("1:1", _item(data_len=-1))), False, "Sync.body"),
    (_answer(("1:1", _item(truncated=True))), False, "Sync.truncated"),
    (_answer(key="1"), False, "Sync.key"),
    (_answer(), False, "Sync.missing"),
    (_answer(*[(f"1:{k}", _item()) for k in range(4)]), False, "Sync.phantom"),
    ((200, [], b"x", facts.Sync(None, True, "3", "1", False, ())), False, "Sync.status"),
    ((200, [], b"x", facts.Sync("4", False, None, None, False, ())), False, "Sync.status"),
    ((200, [], b"x", facts.Sync(None, False, None, None, False, ())), False, "Sync.shape"),
])
def test_the_check_by_record_fails_what_decoding_failed(answer, first_download, failure):
    dev = _device()
    assert not eas.sync_answer(dev, answer, False, first_download, 3)
    assert failure in _failures(dev), _failures(dev)


def test_a_mime_body_needs_its_header_block_by_record_too():
    dev = _device(body_type=4)
    item = _item(body_type="4", mime_head=False)
    assert not eas.sync_answer(dev, _answer(("1:1", item)), False, False, 3)
    assert "Sync.mime" in _failures(dev)
    dev = _device(body_type=4)
    assert eas.sync_answer(dev, _answer(("1:1", item._replace(mime_head=True))), False, False, 3)


def test_a_record_that_disagrees_with_the_bytes_fails_the_crosscheck():
    sim = _sim()
    answer = _call(sim, "Sync", "14.1", _sync(_coll("0", INBOX)))
    answer = _call(sim, "Sync", "14.1", _sync(_coll("1", INBOX, [_pref(2)], window=3)))
    dev = _device()
    dev.delivered = 40
    dev.fleet.crosscheck_every = 1
    res = (200, [], answer.body, answer.facts)
    assert eas.sync_answer(dev, res, False, False, 40) and dev.fleet.stats.facts_crosschecked == 1
    (sid, item), *rest = answer.facts.adds
    lying = answer.facts._replace(adds=((sid, item._replace(estimated="1")), *rest))
    dev = _device()
    dev.delivered, dev.fleet.crosscheck_every = 40, 1
    assert not eas.sync_answer(dev, (200, [], answer.body, lying), False, False, 40)
    assert "Sync.facts" in _failures(dev)
