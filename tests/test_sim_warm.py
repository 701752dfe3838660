"""warm.py: the simulator's answer templates built up front change nothing a run sees.

Two simulators on the same corpus pool, one warmed: a fleet device's whole life
(provision, the setup download, deliveries and the Syncs that fetch them, Fetches of
every attachment) gets byte-identical answers and facts from both, and the warmed
one builds no template while doing it."""
from __future__ import annotations

import base64

import pytest

from seg_fast.sim import fleet_eas as eas
from seg_fast.sim.commands import file_reference
from seg_fast.sim.fleet import PooledCorpus
from seg_fast.sim.mailbox import MailboxSimulator
from seg_fast.sim.state import INBOX
from seg_fast.sim.tree import E, decode, encode, text
from seg_fast.sim.warm import warm

POOL = 24


@pytest.fixture(scope="module")
def corpus():
    c = PooledCorpus(5, pool=POOL)
    c.warm()
    return c


def _ask(sim, user, device_id, cmd, body, policy_key):
    auth = b"Basic " + base64.b64encode(f"{user}:secret".encode())
    target = (f"/Microsoft-Server-ActiveSync?Cmd={cmd}&User={user}&DeviceId={device_id}"
              "&DeviceType=iPhone").encode()
    headers = [(b"ms-asprotocolversion", b"14.1"), (b"authorization", auth),
               (b"x-ms-policykey", policy_key.encode())]
    return sim._answer(b"POST", target, headers, body)


def _life(sim, user, device_id, body_type):
    """A device's requests as the fleet makes them; every answer (status, bytes, facts)."""
    out = []

    def ask(cmd, body, key="0"):
        a = _ask(sim, user, device_id, cmd, body, key)
        out.append((cmd, a.status, a.body, a.facts))
        return a
    pol = lambda *x: encode(E("Provision:Provision", E("Provision:Policies", E(  # noqa: E731
        "Provision:Policy", E("Provision:PolicyType", "MS-EAS-Provisioning-WBXML"), *x))))
    temp = text(decode(ask("Provision", pol()).body), "Provision:Policies", "Provision:Policy",
                "Provision:PolicyKey")
    final = text(decode(ask("Provision", pol(E("Provision:PolicyKey", temp), E("Provision:Status", 1)),
                            temp).body), "Provision:Policies", "Provision:Policy", "Provision:PolicyKey")
    key = "0"
    for round_ in range(6):
        if round_ == 2:
            sim.deliver(user, POOL)             # every pool message (and every attachment)
        trunc = eas.SETUP_TRUNCATION if round_ == 1 else None
        while True:
            got = ask("Sync", encode(eas.sync_tree(key, body_type, trunc)), final).facts
            assert got.status == "1"
            key = got.sync_key
            if not got.more:
                break
    mbox = sim.mailbox(user)
    for sid, item in list(mbox.folder(INBOX).items()):
        for n in range(len(sim.corpus.message(item.msg).attachments)):
            a = ask("ItemOperations", encode(E("ItemOperations:ItemOperations", E(
                "ItemOperations:Fetch", E("ItemOperations:Store", "Mailbox"),
                E("AirSyncBase:FileReference", file_reference(sid, n))))), final)
            assert a.facts.fetch_status == "1"
    return out


def test_warm_changes_no_answer_and_builds_nothing_later(corpus):
    cold = MailboxSimulator(seed=5, corpus=corpus, initial_messages=8)
    warmed = MailboxSimulator(seed=5, corpus=corpus, initial_messages=8)
    sent = warm(warmed, POOL, "secret")
    assert sent > 4 * (POOL // eas.WINDOW + 1)
    # nothing of the warm-up is left that a run could see
    assert warmed.mailboxes == {} and warmed._auth_ok == {} and not warmed.counts
    assert warmed._next_msg == 0 and warmed._serial == 0
    built = warmed.splice_cache.misses
    assert built == len(warmed.splice_cache.templates) > POOL * 4
    for idx, body_type in ((0, 2), (1, 4)):
        a = _life(cold, f"user{idx}", f"SEGFAST{idx:09d}", body_type)
        b = _life(warmed, f"user{idx}", f"SEGFAST{idx:09d}", body_type)
        assert len(a) == len(b) > 10
        assert a == b                         # status, bytes and facts, answer by answer
    assert cold.splice_cache.misses > 0
    assert warmed.splice_cache.misses == built   # every template the devices needed was there
    assert warmed.counts == cold.counts


def test_warm_without_splicing_is_a_no_op(corpus):
    sim = MailboxSimulator(seed=5, corpus=corpus, splice_answers=False)
    assert warm(sim, POOL, "secret") == 0
    assert sim.mailboxes == {}


def test_a_kept_pool_loads_the_same_messages_and_is_named_by_what_made_it(tmp_path, monkeypatch):
    # sizing.run_path keeps the pool once for the point's shards (fleet.POOL_CACHE); a shard
    # loading it must see exactly the messages it would have built
    monkeypatch.delenv("SEG_FAST_CORPUS_CACHE", raising=False)
    built = PooledCorpus(9, pool=POOL)
    built.warm()
    assert built.cache_file() is None                   # no directory: nothing kept, nothing read
    PooledCorpus(9, pool=POOL).keep(str(tmp_path))
    (kept,) = tmp_path.iterdir()
    monkeypatch.setenv("SEG_FAST_CORPUS_CACHE", str(tmp_path))
    loaded = PooledCorpus(9, pool=POOL)
    loaded.warm()
    assert loaded._built is not None                    # read from the file, not built
    for i in range(POOL):
        a, b = built.message(i), loaded.message(i)
        assert (a.index, a.subject, a.html, a.text, a.mime, a.attachments, a.links) == \
               (b.index, b.subject, b.html, b.text, b.mime, b.attachments, b.links)
    # another seed or pool is another file; the same one again is not rewritten
    assert PooledCorpus(10, pool=POOL).cache_file() != kept
    assert PooledCorpus(9, pool=POOL + 1).cache_file() != kept
    mtime = kept.stat().st_mtime_ns
    PooledCorpus(9, pool=POOL).keep(str(tmp_path))
    assert kept.stat().st_mtime_ns == mtime and len(list(tmp_path.iterdir())) == 1
