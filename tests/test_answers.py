"""The blocked answer per protocol version and command, checked with our codec and
with libwbxml's wbxml2xml as an independent oracle."""
from __future__ import annotations

import shutil
import subprocess
from xml.etree import ElementTree

import pytest

from seg_fast.eas import codepages
from seg_fast.eas.answers import BLOCKED_SHAPES, blocked_answer, speaks_status_codes, unavailable_answer
from seg_fast.eas.wbxml import decode

WBXML2XML = shutil.which("wbxml2xml")


def libwbxml_tree(body: bytes, tmp_path) -> ElementTree.Element:
    src, dst = tmp_path / "a.wbxml", tmp_path / "a.xml"
    src.write_bytes(body)
    subprocess.run([WBXML2XML, "-l", "ACTIVESYNC", "-o", str(dst), str(src)], check=True, capture_output=True)
    return ElementTree.fromstring(dst.read_bytes().split(b"?>", 1)[1].split(b">", 1)[1])


def local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


@pytest.mark.parametrize("version", ["2.5", "12.0", "12.1", None, "", "x.y"])
@pytest.mark.parametrize("command", sorted(BLOCKED_SHAPES) + ["GetAttachment"])
def test_old_protocols_get_403(command, version):
    status, headers, body = blocked_answer(command, version)
    assert status == 403 and body == b""
    assert dict(headers)[b"content-length"] == b"0"


@pytest.mark.parametrize("version", ["14.0", "14.1", "16.0", "16.1"])
@pytest.mark.parametrize("command", sorted(BLOCKED_SHAPES))
def test_new_protocols_get_status_129(command, version, tmp_path):
    status, headers, body = blocked_answer(command, version)
    h = dict(headers)
    assert status == 200
    assert h[b"content-type"] == b"application/vnd.ms-sync.wbxml"
    assert int(h[b"content-length"]) == len(body)
    root_tag, containers = BLOCKED_SHAPES[command]
    # Our codec
    root = decode(body)
    assert root.tag == root_tag
    node = root
    for tag in containers:
        node = node.find(tag)
        assert node is not None
    ns = root_tag.split(":")[0]
    assert node.findtext(f"{ns}:Status") == "129"
    # libwbxml, independently: same element names, Status 129 at the same depth
    if WBXML2XML is None:
        pytest.skip("libwbxml2-utils not installed")
    if codepages.PAGE_OF_NAMESPACE[ns] > codepages.LIBWBXML_LAST_PAGE:
        return   # libwbxml predates this page (Find, 16.1)
    tree = libwbxml_tree(body, tmp_path)
    assert local(tree.tag) == root_tag.split(":")[1]
    node = tree
    for tag in containers:
        node = node[0]
        assert local(node.tag) == tag.split(":")[1]
    assert [local(c.tag) for c in node] == ["Status"]
    assert node[0].text == "129"


def test_command_without_wbxml_answer_gets_403_on_new_protocols():
    assert blocked_answer("GetAttachment", "14.1")[0] == 403
    assert blocked_answer(None, "16.1")[0] == 403
    assert blocked_answer("Notify", "16.1")[0] == 403


def test_other_statuses_and_helpers():
    s, _, body = blocked_answer("Sync", "16.1", status=130)
    assert s == 200 and decode(body).findtext("AirSync:Status") == "130"
    assert speaks_status_codes("14.0") and not speaks_status_codes("12.1")
    status, headers, body = unavailable_answer(60)
    assert status == 503 and dict(headers)[b"retry-after"] == b"60" and body == b""
