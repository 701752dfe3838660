"""The set-up answers every device gets, encoded once (commands._policy_answer,
_first_folder_sync): byte for byte what encoding the whole tree gives, as the
simulator built them before, and they read back as a device reads them."""
from __future__ import annotations

import random

from seg_fast.sim import commands
from seg_fast.sim.commands import FOLDERS, POLICY
from seg_fast.sim.tree import E, decode, encode, find, kids, text


def policy_tree(key: str):
    # built as commands.provision built it for every device before the cache
    out = [E("Provision:Status", 1)]
    body = E("Provision:EASProvisionDoc", *[E("Provision:" + k, v) for k, v in POLICY])
    reply = [E("Provision:PolicyType", "MS-EAS-Provisioning-WBXML"), E("Provision:Status", 1),
             E("Provision:PolicyKey", key), E("Provision:Data", body)]
    out.append(E("Provision:Policies", E("Provision:Policy", *reply)))
    return E("Provision:Provision", *out)


def test_policy_answer_is_the_whole_tree_encoded():
    assert commands._policy_parts() is not None, "the codec encodes the key inline: the template applies"
    rng = random.Random(5)
    keys = ["100000000", str(2**31 - 1)] + [str(rng.randrange(10**8, 2**31)) for _ in range(200)]
    for key in keys:
        got = commands._policy_answer(key)
        assert got == encode(policy_tree(key)), key
        root = decode(got)
        assert text(root, "Provision:Policies", "Provision:Policy", "Provision:PolicyKey") == key
        doc = find(root, "Provision:Policies", "Provision:Policy", "Provision:Data", "Provision:EASProvisionDoc")
        assert len(list(kids(doc))) == len(POLICY)


def test_policy_answer_without_template_is_the_same(monkeypatch):
    monkeypatch.setattr(commands, "_policy_parts", lambda: None)
    assert commands._policy_answer("123456789") == encode(policy_tree("123456789"))


def test_first_folder_sync_is_the_whole_tree_encoded():
    adds = [E("FolderHierarchy:Add", E("FolderHierarchy:ServerId", sid),
              E("FolderHierarchy:ParentId", "0"), E("FolderHierarchy:DisplayName", name),
              E("FolderHierarchy:Type", ftype)) for sid, name, ftype, _ in FOLDERS]
    want = encode(E("FolderHierarchy:FolderSync", E("FolderHierarchy:Status", 1),
                    E("FolderHierarchy:SyncKey", 1),
                    E("FolderHierarchy:Changes", E("FolderHierarchy:Count", len(adds)), *adds)))
    assert commands._first_folder_sync() == want
    root = decode(want)
    assert text(root, "FolderHierarchy:SyncKey") == "1"
    assert len(list(kids(find(root, "FolderHierarchy:Changes"), "FolderHierarchy:Add"))) == len(FOLDERS)
