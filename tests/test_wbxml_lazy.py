"""The lazy tree a canonical document decodes to: every way of reading or changing it
gives what a fully built tree gives, and encode copies an untouched subtree only while
its element is unchanged."""
from __future__ import annotations

import copy
import pickle
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from seg_fast.eas import codepages
from seg_fast.eas.wbxml import Element, decode, encode

TAGS = sorted(t for t in codepages.TOKENS if t not in codepages.ALIASES)


def tree(rng: random.Random, depth: int = 0) -> Element:
    el = Element(rng.choice(TAGS))
    if rng.random() < 0.5:
        el.text = rng.choice(["1", "caf\u00e9", "x" * 70, "\u65e5\u672c" * 40, ""])
    if rng.random() < 0.2:
        el.opaque = rng.randbytes(rng.randint(0, 200))
    if depth < 5 and rng.random() < 0.6:
        el.children = [tree(rng, depth + 1) for _ in range(rng.randint(1, 4))]
    return el


def built(data: bytes) -> Element:
    root = decode(data)
    list(root.iter())           # every Element built
    return root


@settings(max_examples=60)
@given(st.integers(0, 2**32), st.integers(0, 3))
def test_an_edit_anywhere_encodes_like_a_built_tree(seed, edit):
    rng = random.Random(seed)
    data = encode(tree(rng))
    lazy, full = decode(data), built(data)
    assert lazy == full and encode(lazy) == data
    # reach one element through the lazy view and change it
    nodes = list(full.iter())
    k = rng.randrange(len(nodes))
    path, el = [], lazy
    target = nodes[k]
    # walk the lazy tree to the same position (document order)
    order = list(lazy.iter())
    el = order[k]
    assert el.tag == target.tag
    if edit == 0:
        el.text = target.text = "changed"
    elif edit == 1:
        el.opaque = target.opaque = b"\x00\x01"
    elif edit == 2:
        el.tag = target.tag = "Email:Subject"
    else:
        el.children = target.children = [Element("AirSync:Status", text="9")]
    assert encode(lazy) == encode(full)
    assert decode(encode(lazy)) == full


def test_untouched_subtrees_are_copied_and_edits_inside_them_are_not_lost():
    root = Element("AirSync:Sync", [Element("AirSync:Collections", [
        Element("AirSync:Collection", [Element("Email:Subject", text="a"),
                                       Element("AirSyncBase:Body", [Element("AirSyncBase:Data", text="b")])]),
        Element("AirSync:Collection", [Element("Email2:ConversationId", opaque=b"\x01")])])])
    data = encode(root)
    lazy = decode(data)
    assert encode(lazy) == data
    # an element's own text changed while its children were never read
    coll = lazy.children[0]
    coll.text = "t"
    root.children[0].text = "t"
    assert encode(lazy) == encode(root)
    deep = decode(data)
    deep.find("AirSync:Collections").children[0].find("AirSyncBase:Body").children[0].text = "new"
    assert decode(encode(deep)).children[0].children[0].children[1].children[0].text == "new"


def test_copies_and_pickles_of_lazy_trees():
    data = encode(tree(random.Random(5)))
    lazy = decode(data)
    for other in (copy.deepcopy(lazy), copy.copy(lazy), pickle.loads(pickle.dumps(lazy))):
        assert other == built(data)
        assert encode(other) == data


@pytest.mark.parametrize("doc", [
    b"\x03\x01\x6a\x00\x00\x00\x45\x01",                  # a redundant SWITCH_PAGE
    b"\x03\x01\x6a\x00\x45\x03a\x00\x03b\x00\x01",        # a split string
    b"\x03\x01\x6a\x00\x45\x01",                          # content flag, no content
    b"\x03\x02\x6a\x00\x05",                              # another public id in the header
])
def test_irregular_documents_stay_lossless(doc):
    assert encode(decode(doc)) == doc
