"""Search answers through the running gateway (its real policy gatekeeper on SQLite)
in front of the mailbox simulator, over loopback.

- Include mode: in the result bodies only links to the listed domains open in the
  secure browser; the same Search straight to the simulator has the original links.
- An unmanaged device's blocked PNG leaves the result's attachment list (and its
  MIME body); the simulator itself lists it.
"""
from __future__ import annotations

import email
import email.policy
import re

import trio

from seg_fast.sim.commands import long_id
from seg_fast.sim.client import EasClient
from seg_fast.sim.state import INBOX, Item
from seg_fast.sim.tree import E, find, kids, text
from link_oracle import assert_include_mode, listed
from test_content_e2e import BLOCK_MSG, PASSWORD, device, has, pick, running


def search_req(msg, body_type):
    # every word of the subject: the message itself is among the results
    words = " ".join(re.findall(r"\w+", msg.subject))
    return E("Search:Search", E("Search:Store", E("Search:Name", "Mailbox"), E("Search:Query", E(
        "Search:And", E("AirSync:Class", "Email"), E("AirSync:CollectionId", INBOX), E("Search:FreeText", words))),
        E("Search:Options", E("Search:Range", "0-9"), E("Search:RebuildResults"), E("Search:DeepTraversal"),
          E("AirSyncBase:BodyPreference", E("AirSyncBase:Type", body_type)))))


async def search_props(c, msg, sid, body_type):
    """The Properties of ``sid``'s result in a Search for ``msg``'s subject."""
    r = await c.request("Search", search_req(msg, body_type))
    assert r.status == 200, r
    assert text(r.doc, "Search:Status") == "1"
    st = find(r.doc, "Search:Response", "Search:Store")
    assert text(st, "Search:Status") == "1"
    by_id = {text(res, "Search:LongId"): find(res, "Search:Properties") for res in kids(st, "Search:Result")}
    return by_id[long_id(sid)]


async def test_search_bodies_through_the_gateway(tmp_path):
    async with running(tmp_path) as (sim, gw):
        with trio.fail_after(30):
            mbox = sim.mailbox("jdoe")
            links_i = pick(sim, lambda m: not m.signed and not m.attachments
                           and any(listed(u) for u in m.links) and not all(listed(u) for u in m.links))
            png_i, pdf_i = pick(sim, has("png")), pick(sim, has("pdf"))
            sid = {name: mbox.add(INBOX, Item(i)) for name, i in
                   (("links", links_i), ("png", png_i), ("pdf", pdf_i))}
            links_msg, png_msg, pdf_msg = (sim.corpus.message(i) for i in (links_i, png_i, pdf_i))

            # Include mode: listed domains rewritten in the result body, the others as they were.
            managed = await device(gw, "MANAGED1")
            html = text(await search_props(managed, links_msg, sid["links"], 2), "AirSyncBase:Body", "AirSyncBase:Data")
            assert html != links_msg.html
            assert_include_mode(html, links_msg)
            # The plain-text rendering too.
            plain = text(await search_props(managed, links_msg, sid["links"], 1), "AirSyncBase:Body", "AirSyncBase:Data")
            assert plain.replace("awbs://", "https://").replace("awb://", "http://") == links_msg.text
            assert any(("awbs" if u.startswith("https") else "awb") + u[u.index("://"):] in plain
                       for u in links_msg.links if listed(u))

            # Straight to the simulator: the original links.
            direct = EasClient("127.0.0.1", sim.port, "jdoe", PASSWORD, "DIRECT1", version="14.1")
            await direct.provision()
            props = await search_props(direct, links_msg, sid["links"], 2)
            assert text(props, "AirSyncBase:Body", "AirSyncBase:Data") == links_msg.html
            assert "awb://" not in links_msg.html and "awbs://" not in links_msg.html
            # ... and the PNG listed.
            props = await search_props(direct, png_msg, sid["png"], 2)
            atts = list(kids(find(props, "AirSyncBase:Attachments"), "AirSyncBase:Attachment"))
            assert [text(a, "AirSyncBase:DisplayName") for a in atts] == [png_msg.attachments[0][0]]

            # Unmanaged device: the blocked PNG is cut from the result's attachment list
            # (its only attachment: no list left), the PDF it may have stays listed.
            unmanaged = await device(gw, "UNMANAGED1")
            props = await search_props(unmanaged, png_msg, sid["png"], 2)
            assert find(props, "AirSyncBase:Attachments") is None
            assert text(props, "Email:Subject") == png_msg.subject
            props = await search_props(unmanaged, pdf_msg, sid["pdf"], 2)
            atts = list(kids(find(props, "AirSyncBase:Attachments"), "AirSyncBase:Attachment"))
            assert [text(a, "AirSyncBase:DisplayName") for a in atts] == [pdf_msg.attachments[0][0]]
            # Its MIME body has no PNG left, the block note in its place.
            props = await search_props(unmanaged, png_msg, sid["png"], 4)
            assert find(props, "AirSyncBase:Attachments") is None
            parsed = email.message_from_string(text(props, "AirSyncBase:Body", "AirSyncBase:Data"),
                                               policy=email.policy.default)
            assert not any(p.get_content_type() == "image/png" for p in parsed.walk())
            notes = [p.get_content() for p in parsed.walk() if p.get_content_type() == "text/plain"
                     and png_msg.attachments[0][0] in p.get_content()]
            assert len(notes) == 1 and BLOCK_MSG in notes[0]
            for c in (managed, direct, unmanaged):
                await c.aclose()
