"""What a fleet device's check reads from a Sync or Fetch answer, as a small record.

The device checks each answer against what it knows (new SyncKey, ServerIds not seen
before, body sizes, FileReferences and attachment sizes). Decoding a whole answer for
that (megabytes of body and base64) cost the load side about as much as the
simulator spent building it. But an answer the device received byte for byte as the
simulator sent it (``fleet.Device.checked``) says exactly what the simulator built,
so the simulator records these facts as it builds the answer (each Sync item's from
its cached template, once per template: splice.py) and the device checks the record.
Where the bytes may differ (email security on: the gateway rewrites Sync and
ItemOperations), the device decodes the answer and takes the same record from the
tree (``sync_of``, ``fetch_of``), then runs the same checks. A sample of
byte-checked answers is decoded as well and must give the recorded facts
(``fleet_eas.CROSSCHECK_EVERY``), so a simulator whose record and bytes disagree
fails the run.
"""
from __future__ import annotations

from typing import NamedTuple

from seg_fast.sim.tree import find, kids, text

# A Type 4 body must show a MIME header block within this many bytes (a truncated
# first download still holds it)
MIME_HEAD_WITHIN = 4096


class Item(NamedTuple):
    """One Sync Add's ApplicationData (12.0+ shape; other shapes give Nones)."""
    body: bool                     # an AirSyncBase:Body is there
    body_type: str | None          # its Type
    data_len: int                  # bytes of Body/Data (-1: no Data element)
    estimated: str | None          # Body/EstimatedDataSize
    truncated: bool                # Body/Truncated is "1"
    mime_head: bool                # a header block (CRLFCRLF) within MIME_HEAD_WITHIN bytes
    # (FileReference, EstimatedDataSize, DisplayName) per attachment; a recorded
    # template's FileReferences hold splice.HOLE where the item's ServerId goes
    attachments: tuple[tuple[str | None, str | None, str], ...]


class Sync(NamedTuple):
    """A Sync answer as the device reads it: its first Collection."""
    top: str | None                # a top-level Status (the whole request failed)
    collection: bool               # a Collection is there
    status: str | None             # the Collection's Status
    sync_key: str | None
    more: bool                     # MoreAvailable
    adds: tuple[tuple[str | None, Item], ...]   # (ServerId, the item), in answer order


class Fetch(NamedTuple):
    """An ItemOperations answer's first Fetch, as the device reads it."""
    status: str | None             # ItemOperations Status
    fetch_status: str | None       # the Fetch's Status (None: no Fetch)
    data_len: int                  # bytes of Properties/Data once base64-decoded (-1: no Data)


def _index(el) -> dict:
    # an element's children by tag (the first of each): one pass for several look-ups
    if el is None:
        return {}
    return {c.tag: c for c in reversed(el.children)}


def _text(el) -> str | None:
    if el is None:
        return None
    if el.text is not None:
        return el.text
    return el.opaque.decode("utf-8", "replace") if el.opaque is not None else ""


def raw_data(el) -> bytes:
    """An element's content as bytes (opaque, or the UTF-8 of inline text)."""
    return el.opaque if el.opaque is not None else (el.text or "").encode()


def item_of(data) -> tuple[Item, bytes | None]:
    """The facts of one ApplicationData element, and its body's bytes (None: no Data)."""
    fields = _index(data)
    parts = _index(fields.get("AirSyncBase:Body"))
    content = parts.get("AirSyncBase:Data")
    raw = raw_data(content) if content is not None else None
    atts = tuple((_text(a.get("AirSyncBase:FileReference")), _text(a.get("AirSyncBase:EstimatedDataSize")),
                  _text(a.get("AirSyncBase:DisplayName")) or "")
                 for a in map(_index, kids(fields.get("AirSyncBase:Attachments"), "AirSyncBase:Attachment")))
    item = Item("AirSyncBase:Body" in fields, _text(parts.get("AirSyncBase:Type")),
                -1 if raw is None else len(raw),
                _text(parts.get("AirSyncBase:EstimatedDataSize")),
                _text(parts.get("AirSyncBase:Truncated")) == "1",
                raw is not None and b"\r\n\r\n" in raw[:MIME_HEAD_WITHIN],
                atts)
    return item, raw


def with_server_id(item: Item, hole: str, sid: str) -> Item:
    """A template's facts for the item ``sid`` (its FileReferences filled in)."""
    if not item.attachments:
        return item
    return item._replace(attachments=tuple((ref.replace(hole, sid) if ref else ref, size, name)
                                           for ref, size, name in item.attachments))


def sync_of(root) -> tuple[Sync, list[bytes | None]]:
    """The facts of a decoded Sync answer, and each Add's body bytes (for the oracle)."""
    top = text(root, "AirSync:Status")
    coll = find(root, "AirSync:Collections", "AirSync:Collection")
    if top is not None or coll is None:
        return Sync(top, coll is not None, None, None, False, ()), []
    adds = []
    raws = []
    for add in kids(find(coll, "AirSync:Commands"), "AirSync:Add"):
        item, raw = item_of(find(add, "AirSync:ApplicationData"))
        adds.append((text(add, "AirSync:ServerId"), item))
        raws.append(raw)
    return Sync(None, True, text(coll, "AirSync:Status"), text(coll, "AirSync:SyncKey"),
                find(coll, "AirSync:MoreAvailable") is not None, tuple(adds)), raws


def base64_len(t: str) -> int:
    """The decoded length of base64 text, without decoding it."""
    t = t.rstrip()
    return len(t) // 4 * 3 - t.endswith("=") - t.endswith("==")


def fetch_of(root) -> Fetch:
    """The facts of a decoded ItemOperations answer (its first Fetch)."""
    status = text(root, "ItemOperations:Status")
    f = find(root, "ItemOperations:Response", "ItemOperations:Fetch")
    if f is None:
        return Fetch(status, None, -1)
    d = find(f, "ItemOperations:Properties", "ItemOperations:Data")
    if d is None:
        n = -1
    elif d.opaque is not None:
        n = len(d.opaque)
    else:
        n = base64_len(d.text or "")
    return Fetch(status, text(f, "ItemOperations:Status"), n)
