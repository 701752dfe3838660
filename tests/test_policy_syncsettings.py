"""Sync Settings: hidden folder classes vanish from FolderSync and Sync of them is refused."""
from __future__ import annotations

import shutil
import subprocess

from conftest import REAL_SERVER

from seg_fast.eas.request import EasRequest
from seg_fast.eas.wbxml import Element, decode, encode
from seg_fast.policy.model import FOLDER_CLASSES
from seg_fast.policy.syncsettings import FolderRegistry, sync_settings_transforms

FH = "FolderHierarchy:"
HIDE = FOLDER_CLASSES["calendar"] | FOLDER_CLASSES["contacts"]


def req(command="FolderSync", device_id="DEV1"):
    return EasRequest(method="POST", path="/Microsoft-Server-ActiveSync", command=command, user="jdoe",
                      device_id=device_id, protocol_version="14.1")


def folder(tag, sid, parent, name, ftype):
    return Element(FH + tag, [Element(FH + "ServerId", text=sid), Element(FH + "ParentId", text=parent),
                              Element(FH + "DisplayName", text=name), Element(FH + "Type", text=str(ftype))])


def foldersync(*changes, synckey="1"):
    return encode(Element(FH + "FolderSync", [
        Element(FH + "Status", text="1"), Element(FH + "SyncKey", text=synckey),
        Element(FH + "Changes", [Element(FH + "Count", text=str(len(changes))), *changes])]))


def sync_request(*collection_ids):
    return encode(Element("AirSync:Sync", [Element("AirSync:Collections", [
        Element("AirSync:Collection", [Element("AirSync:SyncKey", text="1"),
                                       Element("AirSync:CollectionId", text=c)]) for c in collection_ids])]))


def test_real_server_answer_without_hidden_folders_is_untouched():
    reg = FolderRegistry()
    fs, _ = sync_settings_transforms(HIDE, reg)
    body = (REAL_SERVER / "fsync.resp.wbxml").read_bytes()
    assert fs.transform_answer(req(), 200, [], body) is body
    assert reg.folders("dev1")["f1394081"] == 2          # learned: Inbox
    assert len(reg.folders("dev1")) == 5


def test_hidden_folders_removed_and_count_fixed(tmp_path):
    reg = FolderRegistry()
    fs, guard = sync_settings_transforms(HIDE, reg)
    body = foldersync(folder("Add", "1", "0", "Inbox", 2), folder("Add", "2", "0", "Calendar", 8),
                      folder("Add", "3", "0", "Contacts", 9), folder("Add", "4", "2", "Team cal", 1),
                      folder("Add", "5", "0", "Tasks", 7), synckey="0")
    out = fs.transform_answer(req(), 200, [], body)
    root = decode(out)
    changes = root.find(FH + "Changes")
    assert [a.findtext(FH + "DisplayName") for a in changes.findall(FH + "Add")] == ["Inbox", "Tasks"]
    assert changes.findtext(FH + "Count") == "2"
    # libwbxml agrees on the rewritten answer
    if shutil.which("wbxml2xml"):
        (tmp_path / "o.wbxml").write_bytes(out)
        subprocess.run(["wbxml2xml", "-l", "ACTIVESYNC", "-o", str(tmp_path / "o.xml"), str(tmp_path / "o.wbxml")],
                       check=True, capture_output=True)
        xml = (tmp_path / "o.xml").read_text()
        assert "<Count>2</Count>" in xml and "Calendar" not in xml and "Team cal" not in xml
    # Sync of a hidden folder (or one under it) is refused; of a visible one it passes.
    for cid in ("2", "3", "4"):
        assert guard.transform_request(req("Sync"), sync_request("1", cid)) is None
    ok = sync_request("1", "5")
    assert guard.transform_request(req("Sync"), ok) is ok
    # Another device is unaffected.
    assert guard.transform_request(req("Sync", "DEV2"), sync_request("2")) is not None
    # Ping naming a hidden folder too.
    ping = encode(Element("Ping:Ping", [Element("Ping:Folders", [Element("Ping:Folder", [
        Element("Ping:Id", text="3"), Element("Ping:Class", text="Contacts")])])]))
    assert guard.transform_request(req("Ping"), ping) is None


def test_incremental_foldersync_and_registry_sharing():
    reg = FolderRegistry()
    fs, guard = sync_settings_transforms(HIDE, reg)
    fs.transform_answer(req(), 200, [], foldersync(folder("Add", "2", "0", "Calendar", 8), synckey="0"))
    # A later answer: a sub-folder under the calendar, and the calendar deleted.
    out = fs.transform_answer(req(), 200, [], foldersync(folder("Add", "9", "2", "Sub", 1)))
    assert decode(out).find(FH + "Changes").findall(FH + "Add") == []
    learned = reg.take_learned()
    assert set(learned) == {"dev1"}
    other = FolderRegistry()            # another worker loads what this one learned
    other.load(learned)
    _, guard2 = sync_settings_transforms(HIDE, other)
    assert guard2.transform_request(req("Sync"), sync_request("9")) is None
    delete = Element(FH + "Delete", [Element(FH + "ServerId", text="2")])
    out = fs.transform_answer(req(), 200, [], foldersync(delete))
    assert decode(out).find(FH + "Changes").findall(FH + "Delete") == []   # the device never knew it
    assert guard.transform_request(req("Sync"), sync_request("2")) is not None


def test_error_answers_pass():
    fs, _ = sync_settings_transforms(HIDE, FolderRegistry())
    assert fs.transform_answer(req(), 500, [], b"oops") == b"oops"
    err = encode(Element(FH + "FolderSync", [Element(FH + "Status", text="9")]))
    assert fs.transform_answer(req(), 200, [], err) is err
