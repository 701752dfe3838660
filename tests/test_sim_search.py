"""The simulator's Search command, against the running simulator over loopback.

Oracles: the corpus (the messages and bodies the answers must carry), a regular
expression word search written here (which messages must match), and libwbxml's
wbxml2xml, which must read every answer into the tree our codec reads.
"""
from __future__ import annotations

import random
import re
import shutil
import subprocess

import pytest
import trio

from seg_fast.eas.wbxml import Element, decode, from_xml
from seg_fast.sim.client import EasClient
from seg_fast.sim.corpus import Corpus
from seg_fast.sim.mailbox import MailboxSimulator
from seg_fast.sim.state import DELETED, INBOX, Item
from seg_fast.sim.tree import E, find, kids, text

SEED = 11
CORPUS = Corpus(SEED)


@pytest.fixture
async def sim(nursery):
    s = MailboxSimulator(password="secret", seed=SEED)
    await nursery.start(s.serve, "127.0.0.1", 0)
    return s


async def ready(sim, device="S1", version="14.1", user="jdoe") -> EasClient:
    c = EasClient("127.0.0.1", sim.port, user, "secret", device, version=version)
    await c.provision()
    return c


def mailbox_search(freetext, *, cid=None, cls="Email", rng=None, rebuild=True, pref=None, query=None):
    conds = [E("AirSync:Class", cls) if cls else None, E("AirSync:CollectionId", cid) if cid else None,
             E("Search:FreeText", freetext) if freetext is not None else None]
    return E("Search:Search", E("Search:Store", E("Search:Name", "Mailbox"),
             E("Search:Query", query if query is not None else E("Search:And", *conds)),
             E("Search:Options", E("Search:Range", rng) if rng else None,
               E("Search:RebuildResults") if rebuild else None, E("Search:DeepTraversal"), pref)))


def body_pref(t, trunc=None):
    return E("AirSyncBase:BodyPreference", E("AirSyncBase:Type", t),
             E("AirSyncBase:TruncationSize", trunc) if trunc is not None else None)


def store(r) -> Element:
    assert r.status == 200, r
    assert text(r.doc, "Search:Status") == "1"
    return find(r.doc, "Search:Response", "Search:Store")


def results(st) -> list[Element]:
    return [res for res in kids(st, "Search:Result") if res.children]


def oracle(sim, user, words, folders=("1", "2", "3", "4", "5")) -> list[str]:
    """ServerIds whose subject or text holds every word (a regex search), newest first."""
    hits = []
    for fid in folders:
        for sid, item in sim.mailbox(user).folder(fid).items():
            msg = sim.corpus.message(item.msg)
            hay = msg.subject + "\n" + msg.text
            if all(re.search(rf"\b{re.escape(w)}\b", hay, re.I) for w in words):
                hits.append((msg.date, int(sid.split(":")[1]), sid))
    hits.sort(key=lambda h: (-h[0].timestamp(), h[1]))
    return [sid for *_, sid in hits]


async def test_options_lists_search(sim):
    c = EasClient("127.0.0.1", sim.port, "jdoe", "secret", "S0")
    r = await c.request("", method="OPTIONS")
    assert "Search" in r.headers["ms-asprotocolcommands"].split(",")


async def test_freetext_results_bodies_and_range(sim):
    sim.deliver("jdoe", count=40)
    mbox = sim.mailbox("jdoe")
    word = "forecast"
    moved = mbox.move(oracle(sim, "jdoe", [word])[2], DELETED)     # one in Deleted Items
    c = await ready(sim)
    expected = oracle(sim, "jdoe", [word])
    assert 5 < len(expected) < 41 and moved in expected
    # the whole mailbox, HTML bodies in full
    st = store(await c.request("Search", mailbox_search(word.upper(), pref=body_pref(2))))
    assert text(st, "Search:Status") == "1"
    got = results(st)
    assert [text(res, "Search:LongId")[1:] for res in got] == expected
    assert text(st, "Search:Total") == str(len(expected))
    assert text(st, "Search:Range") == f"0-{len(expected) - 1}"
    for res in got:
        sid = text(res, "Search:LongId")[1:]
        msg = sim.corpus.message(mbox.find(sid)[1].msg)
        assert text(res, "AirSync:Class") == "Email"
        assert text(res, "AirSync:CollectionId") == sid.split(":")[0]
        props = find(res, "Search:Properties")
        assert text(props, "Email:Subject") == msg.subject
        assert text(props, "AirSyncBase:Body", "AirSyncBase:Type") == "2"
        assert text(props, "AirSyncBase:Body", "AirSyncBase:Data") == msg.html
        assert text(props, "AirSyncBase:Body", "AirSyncBase:Truncated") == "0"
        names = [text(a, "AirSyncBase:DisplayName")
                 for a in kids(find(props, "AirSyncBase:Attachments"), "AirSyncBase:Attachment")]
        assert names == [a[0] for a in msg.attachments]
    # the Inbox only: the moved one is gone
    st = store(await c.request("Search", mailbox_search(word, cid=INBOX)))
    assert [text(res, "Search:LongId")[1:] for res in results(st)] == [s for s in expected if s != moved]
    # a page of three, plain text truncated to 100 bytes
    st = store(await c.request("Search", mailbox_search(word, rng="2-4", pref=body_pref(1, 100))))
    page = results(st)
    assert [text(res, "Search:LongId")[1:] for res in page] == expected[2:5]
    assert text(st, "Search:Range") == "2-4" and text(st, "Search:Total") == str(len(expected))
    for res in page:
        msg = sim.corpus.message(mbox.find(text(res, "Search:LongId")[1:])[1].msg)
        body = find(res, "Search:Properties", "AirSyncBase:Body")
        assert text(body, "AirSyncBase:Data") == msg.text[:100]
        assert text(body, "AirSyncBase:Truncated") == "1"
        assert text(body, "AirSyncBase:EstimatedDataSize") == str(len(msg.text.encode()))
    # MIME bodies
    st = store(await c.request("Search", mailbox_search(word, rng="0-0", pref=body_pref(4))))
    (res,) = results(st)
    msg = sim.corpus.message(mbox.find(expected[0])[1].msg)
    assert text(res, "Search:Properties", "AirSyncBase:Body", "AirSyncBase:Data").encode() == msg.mime
    # every word must be there: a word no message has finds nothing
    st = store(await c.request("Search", mailbox_search(f"{word} zebra")))
    assert text(st, "Search:Status") == "1" and text(st, "Search:Total") == "0"
    assert len(list(kids(st, "Search:Result"))) == 1 and not results(st) and find(st, "Search:Range") is None
    # a class no mail item has
    st = store(await c.request("Search", mailbox_search(word, cls="Calendar")))
    assert text(st, "Search:Total") == "0"


async def test_subject_words_and_dates(sim):
    mbox = sim.mailbox("jdoe")
    sids = [mbox.add(INBOX, Item(i)) for i in range(20)]
    c = await ready(sim)
    target = sim.corpus.message(13)
    words = re.findall(r"\w+", target.subject)
    st = store(await c.request("Search", mailbox_search(" ".join(words))))
    got = [text(res, "Search:LongId")[1:] for res in results(st)]
    assert sids[13] in got and got == oracle(sim, "jdoe", words)
    # DateReceived bounds: corpus message i is received at EPOCH + i minutes
    after = sim.corpus.message(5).date.strftime("%Y-%m-%dT%H:%M:%S.000Z")
    before = sim.corpus.message(9).date.strftime("%Y-%m-%dT%H:%M:%S.000Z")
    query = E("Search:And", E("AirSync:Class", "Email"), E("Search:FreeText", "the"),
              E("Search:GreaterThan", E("Email:DateReceived"), E("Search:Value", after)),
              E("Search:LessThan", E("Email:DateReceived"), E("Search:Value", before)))
    st = store(await c.request("Search", mailbox_search(None, query=query)))
    got = [text(res, "Search:LongId")[1:] for res in results(st)]
    assert got == [s for s in oracle(sim, "jdoe", ["the"]) if s in sids[6:9]] and got


async def test_kept_results_and_rebuild(sim):
    sim.deliver("jdoe", count=10)
    c = await ready(sim)
    first = await c.request("Search", mailbox_search("report"))
    total = int(text(store(first), "Search:Total"))
    assert total > 0
    # deterministic: the same search answers the same bytes
    assert (await c.request("Search", mailbox_search("report"))).body == first.body
    extra = next(i for i in range(10, 400) if re.search(r"\breport\b", sim.corpus.message(i).text))
    new = sim.mailbox("jdoe").add(INBOX, Item(extra))
    kept = store(await c.request("Search", mailbox_search("report", rebuild=False)))
    assert text(kept, "Search:Total") == str(total)
    rebuilt = store(await c.request("Search", mailbox_search("report")))
    assert text(rebuilt, "Search:Total") == str(total + 1)
    assert new in [text(res, "Search:LongId")[1:] for res in results(rebuilt)]


async def test_bad_queries_get_store_status(sim):
    sim.deliver("jdoe", count=3)
    c = await ready(sim)

    async def status(body):
        return text(store(await c.request("Search", body)), "Search:Status")

    assert await status(mailbox_search("report", rng="0-100")) == "12"      # 101 entries asked
    assert await status(mailbox_search("report", rng="5-2")) == "2"
    assert await status(mailbox_search("report", rng="x")) == "2"
    assert await status(mailbox_search("")) == "2"                         # no words
    assert await status(mailbox_search("report", cid="99")) == "2"
    assert await status(mailbox_search(None, query=E("Search:Or", E("Search:FreeText", "a")))) == "8"
    assert await status(mailbox_search(None, query=E("Search:And", E("Search:FreeText", "a"),
                                                         E("Search:Or", E("Search:FreeText", "b"))))) == "8"
    bad_date = E("Search:And", E("Search:FreeText", "a"),
                  E("Search:GreaterThan", E("Email:DateReceived"), E("Search:Value", "yesterday")))
    assert await status(mailbox_search(None, query=bad_date)) == "2"
    other = E("Search:Search", E("Search:Store", E("Search:Name", "DocumentLibrary"), E("Search:Query", "x")))
    assert await status(other) == "2"
    r = await c.request("Search", E("Search:Search"))
    assert r.status == 400
    # 2.5 has no mailbox search, only the GAL
    old = await ready(sim, device="OLD", version="2.5")
    assert text(store(await old.request("Search", mailbox_search("report"))), "Search:Status") == "2"


async def test_gal(sim):
    c = await ready(sim)
    gal = lambda q, rng=None: E("Search:Search", E("Search:Store", E("Search:Name", "GAL"), E("Search:Query", q),
                                                  E("Search:Options", E("Search:Range", rng)) if rng else None))
    st = store(await c.request("Search", gal("ali")))
    (res,) = results(st)
    props = find(res, "Search:Properties")
    assert text(props, "GAL:DisplayName") == "Alice Smith"
    assert text(props, "GAL:EmailAddress") == "alice.smith@seg-fast.test"
    assert text(props, "GAL:FirstName") == "Alice" and text(props, "GAL:LastName") == "Smith"
    assert text(st, "Search:Range") == "0-0" and text(st, "Search:Total") == "1"
    # "W" begins four last names (none of the first): by last name, then a page of two
    st = store(await c.request("Search", gal("W")))
    names = [text(r, "Search:Properties", "GAL:DisplayName") for r in results(st)]
    assert names == ["Judy Walker", "Erin Wilson", "Peggy Wood", "Mallory Wright"]
    assert text(st, "Search:Total") == "4"
    st = store(await c.request("Search", gal("W", "1-2")))
    assert [text(r, "Search:Properties", "GAL:DisplayName") for r in results(st)] == names[1:3]
    st = store(await c.request("Search", gal("nobody")))
    assert text(st, "Search:Total") == "0" and not results(st)
    # a 2.5 device searches the GAL too
    old = await ready(sim, device="OLD", version="2.5")
    assert results(store(await old.request("Search", gal("alice smith"))))


async def test_fetch_by_long_id(sim):
    sim.deliver("jdoe", count=5)
    c = await ready(sim)
    (res,) = results(store(await c.request("Search", mailbox_search("the", rng="0-0"))))
    long_id = text(res, "Search:LongId")
    r = await c.request("ItemOperations", E("ItemOperations:ItemOperations", E(
        "ItemOperations:Fetch", E("ItemOperations:Store", "Mailbox"), E("Search:LongId", long_id),
        E("ItemOperations:Options", body_pref(1)))))
    fetch = find(r.doc, "ItemOperations:Response", "ItemOperations:Fetch")
    assert text(fetch, "ItemOperations:Status") == "1"
    assert text(fetch, "ItemOperations:Properties", "Email:Subject") == \
        text(res, "Search:Properties", "Email:Subject")
    r = await c.request("ItemOperations", E("ItemOperations:ItemOperations", E(
        "ItemOperations:Fetch", E("ItemOperations:Store", "Mailbox"), E("Search:LongId", "L1:999"))))
    assert text(r.doc, "ItemOperations:Response", "ItemOperations:Fetch", "ItemOperations:Status") == "6"


def crlf_as_xml_reads_it(root: Element) -> Element:
    for el in root.iter():
        if el.text is not None:
            el.text = el.text.replace("\r\n", "\n").replace("\r", "\n")
    return root


@pytest.mark.skipif(shutil.which("wbxml2xml") is None, reason="libwbxml2-utils not installed")
async def test_answers_readable_by_libwbxml(sim, tmp_path):
    i = next(i for i in range(400) if CORPUS.message(i).attachments
             and len(CORPUS.message(i).attachments[0][2]) < 400_000)
    sim.mailbox("jdoe").add(INBOX, Item(i))
    sim.deliver("jdoe", count=4)
    c = await ready(sim)
    answers = {
        "html": await c.request("Search", mailbox_search("the", pref=body_pref(2))),
        "mime": await c.request("Search", mailbox_search("the", rng="0-1", pref=body_pref(4))),
        "text": await c.request("Search", mailbox_search("the", pref=body_pref(1, 50))),
        "none": await c.request("Search", mailbox_search("zebra")),
        "bad": await c.request("Search", mailbox_search("the", rng="0-500")),
        "gal": await c.request("Search", E("Search:Search", E("Search:Store", E("Search:Name", "GAL"),
                                                              E("Search:Query", "a")))),
    }
    assert any(find(r, "Search:Properties", "AirSyncBase:Attachments") is not None
               for r in results(store(answers["html"])))
    for name, r in answers.items():
        src, out = tmp_path / f"{name}.wbxml", tmp_path / f"{name}.xml"
        src.write_bytes(r.body)
        proc = await trio.to_thread.run_sync(lambda: subprocess.run(
            ["wbxml2xml", "-l", "ACTIVESYNC", "-m", "0", "-k", "-o", str(out), str(src)],
            capture_output=True, timeout=60))
        assert proc.returncode == 0, (name, proc.stderr)
        assert from_xml(out.read_bytes(), dialect="libwbxml") == crlf_as_xml_reads_it(decode(r.body)), name
    assert "<Total>0</Total>" in (tmp_path / "none.xml").read_text()
    assert "alice.smith@seg-fast.test" in (tmp_path / "gal.xml").read_text()


async def test_mangled_searches_never_fail_the_server(sim, capsys):
    from test_sim_fuzz import mangle

    sim.deliver("jdoe", count=3)
    c = await ready(sim, device="FUZZ")
    date = E("Search:GreaterThan", E("Email:DateReceived"), E("Search:Value", "2026-11-02T08:00:00.000Z"))
    templates = [
        mailbox_search("the report", cid=INBOX, rng="0-4", pref=body_pref(2, 100)),
        mailbox_search(None, query=E("Search:And", E("Search:FreeText", "a"), date)),
        E("Search:Search", E("Search:Store", E("Search:Name", "GAL"), E("Search:Query", "al"),
                             E("Search:Options", E("Search:Range", "0-1")))),
    ]
    rng = random.Random(20261126)
    statuses = set()
    for k in range(300):
        c.version = rng.choice(["2.5", "12.1", "14.1", "16.1"])
        r = await c.request("Search", mangle(rng, rng.choice(templates)))
        assert r.status != 500, k
        statuses.add(r.status)
    assert "internal error" not in capsys.readouterr().err
    assert statuses <= {200, 400} and 200 in statuses
