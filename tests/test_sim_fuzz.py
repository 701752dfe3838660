"""Mangled requests never make the simulator fail: every one gets an answer that
is not a 500 (a 500 is a handler bug), and the server keeps serving."""
from __future__ import annotations

import copy
import random

import pytest

from seg_fast.eas.wbxml import Element, decode, encode
from seg_fast.sim.client import EasClient
from seg_fast.sim.mailbox import MailboxSimulator
from seg_fast.sim.tree import E

TEMPLATES = {
    "Sync": E("AirSync:Sync", E("AirSync:Collections", E(
        "AirSync:Collection", E("AirSync:SyncKey", "1"), E("AirSync:CollectionId", "1"),
        E("AirSync:GetChanges"), E("AirSync:WindowSize", 5),
        E("AirSync:Options", E("AirSyncBase:BodyPreference", E("AirSyncBase:Type", 2),
                                E("AirSyncBase:TruncationSize", 100))),
        E("AirSync:Commands", E("AirSync:Change", E("AirSync:ServerId", "1:1"),
                                E("AirSync:ApplicationData", E("Email:Read", 1))),
          E("AirSync:Delete", E("AirSync:ServerId", "1:2")), E("AirSync:Fetch", E("AirSync:ServerId", "1:3")))))),
    "FolderSync": E("FolderHierarchy:FolderSync", E("FolderHierarchy:SyncKey", "0")),
    "Provision": E("Provision:Provision", E("Provision:Policies", E("Provision:Policy",
                   E("Provision:PolicyType", "MS-EAS-Provisioning-WBXML"), E("Provision:PolicyKey", "1"),
                   E("Provision:Status", 1)))),
    "ItemOperations": E("ItemOperations:ItemOperations", E("ItemOperations:Fetch",
                        E("ItemOperations:Store", "Mailbox"), E("AirSyncBase:FileReference", "1:1:0"),
                        E("ItemOperations:Options", E("ItemOperations:Range", "0-10"))),
                        E("ItemOperations:Fetch", E("AirSync:CollectionId", "1"), E("AirSync:ServerId", "1:1"))),
    "GetItemEstimate": E("GetItemEstimate:GetItemEstimate", E("GetItemEstimate:Collections", E(
        "GetItemEstimate:Collection", E("AirSync:SyncKey", "1"), E("GetItemEstimate:CollectionId", "1")))),
    "MoveItems": E("Move:MoveItems", E("Move:Move", E("Move:SrcMsgId", "1:1"), E("Move:SrcFldId", "1"),
                                       E("Move:DstFldId", "3"))),
    "Settings": E("Settings:Settings", E("Settings:Oof", E("Settings:Get")),
                  E("Settings:UserInformation", E("Settings:Get"))),
    "SendMail": E("ComposeMail:SendMail", E("ComposeMail:ClientId", "1"),
                  E("ComposeMail:Mime", b"From: a@b\r\n\r\nhi\r\n")),
    "Ping": E("Ping:Ping", E("Ping:HeartbeatInterval", 30), E("Ping:Folders", E("Ping:Folder",
              E("Ping:Id", "1"), E("Ping:Class", "Email")))),
}
VALUES = ["", "0", "-1", "1", "2", "4", "99999999999999999999", "abc", "1-", "5-2", "0-0", "1:1:9",
          "1:", ":", "ü", "3540", "1:1"]


def all_elements(el: Element) -> list[Element]:
    out = [el]
    for c in el.children:
        out += all_elements(c)
    return out


def mangle(rng: random.Random, tree: Element) -> bytes:
    t = decode(encode(tree))               # a private copy
    els = all_elements(t)
    for _ in range(rng.randint(1, 3)):
        el = rng.choice(els)
        op = rng.randrange(5)
        if op == 0 and el.children:
            del el.children[rng.randrange(len(el.children))]
        elif op == 1 and el.children:
            el.children.append(copy.deepcopy(rng.choice(el.children)))
        elif op == 2 and not el.children:
            el.text = rng.choice(VALUES)
        elif op == 3:          # an element from another command's request
            other = rng.choice(all_elements(rng.choice(list(TEMPLATES.values()))))
            el.children.append(decode(encode(other)))
        else:                  # or another command's request whole
            t = decode(encode(rng.choice(list(TEMPLATES.values()))))
            els = all_elements(t)
    data = encode(t)
    if rng.random() < 0.3:                 # and sometimes byte damage
        b = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        data = bytes(b)
    return data


@pytest.fixture
async def sim(nursery):
    s = MailboxSimulator(password="secret", seed=3, initial_messages=3)
    await nursery.start(s.serve, "127.0.0.1", 0)
    return s


async def test_mangled_requests_never_fail_the_server(sim, autojump_clock, capsys):
    c = EasClient("127.0.0.1", sim.port, "fuzz", "secret", "FUZZ")
    await c.provision()
    await c.request("Sync", E("AirSync:Sync", E("AirSync:Collections", E(
        "AirSync:Collection", E("AirSync:SyncKey", "0"), E("AirSync:CollectionId", "1")))))
    rng = random.Random(20261126)
    statuses = set()
    for k in range(1500):
        command = rng.choice(list(TEMPLATES))
        version = rng.choice(["2.5", "12.1", "14.1", "16.1"])
        c.version = version
        r = await c.request(command, mangle(rng, TEMPLATES[command]),
                            headers={"ms-asacceptmultipart": "T"} if rng.random() < 0.2 else None)
        assert r.status != 500, (k, command)
        statuses.add(r.status)
    assert "internal error" not in capsys.readouterr().err
    assert statuses <= {200, 400, 449} and {200, 400} <= statuses
    assert sum(sim.counts.values()) > 500 and len(sim.counts) == len(TEMPLATES)
    c.version = "14.1"
    r = await c.request("FolderSync", TEMPLATES["FolderSync"])
    assert r.status == 200
