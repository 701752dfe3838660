"""Email security over EAS answers: the Transform a Decision carries.

``transforms_for(policy, managed=, device_id=, user=)`` compiles a policy for one
device (cheap; the policy engine caches the result per snapshot and device). The
transform it returns rewrites, in place with the codec's span scanner and splice
writer, only the strings that change:

- Sync (Add/Change ``AirSyncBase:Body`` Type 1/2/4, 2.5's ``Email:Body`` and
  ``Email:MIMEData``) and Search results: links, MIME attachments, classification,
  the S/MIME exemption (``Email:MessageClass`` IPM.Note.SMIME* or the MIME type);
  in ``AirSyncBase:Attachments`` an encrypted attachment is renamed as the device
  will get it (``x.pdf.segenc``) and a blocked one's element is cut out (the whole
  list when all are blocked; renamed ``x.png (removed).txt`` where the codec
  cannot cut it byte-exactly).
- ItemOperations Fetch (inline ``Data`` or multipart parts) and GetAttachment: the
  attachment bytes are encrypted or replaced by the block note; a fetched message
  (.eml) is rebuilt with its own attachments judged. The file name comes from the
  Sync answers this worker carried (a bounded cache keyed by user and FileReference,
  which also keeps the type the bytes showed, so later lists name files as fetched);
  the stricter of name and magic bytes decides.
- An answer with more than ``security.max_spans`` strings and elements is not read:
  under an attachment or classification policy the device gets the command's
  "server error" Status instead (links alone: it passes as it came).
"""
from __future__ import annotations

import gzip
import html
import logging
import os
import re
import threading
import zlib
from collections import OrderedDict
from contextlib import nullcontext

import pybase64

from seg_fast import refshare
from seg_fast.content._mime import join, utf8_text, utf8_text_parts
from seg_fast.content.attachments import (ENVELOPE_CONTENT_TYPE, block_note, decoded_scratch, envelope_name,
                                          envelope_size, extension, file_type, seal, sealed_base64,
                                          sealed_content_type)
from seg_fast.content.fetchstream import PASS
from seg_fast.content.keys import Keyring
from seg_fast.content.message import (MESSAGE_TYPES, NESTED_NAME, ContentPlan, is_smime_class, template_message,
                                      transform_mime, transform_text)
from seg_fast.content.model import EmailSecurityPolicy
from seg_fast.content.settings import ContentSettings
from seg_fast.errors import ConfigError, ContentError, SegFastError, SpanLimitError

log = logging.getLogger(__name__)

COMMANDS = frozenset({"Sync", "ItemOperations", "GetAttachment", "Search"})
WBXML_TYPE = b"application/vnd.ms-sync.wbxml"
MULTIPART_TYPE = b"application/vnd.ms-sync.multipart"
BLOCKED_SUFFIX = " (removed).txt"
BLOCK_NOTE_TYPE = "text/plain"
# MS-ASCMD "server error" status of each command whose answer the pipeline refuses.
_SERVER_ERROR = {"Sync": 5, "ItemOperations": 3, "Search": 3}

# Elements whose strings the transform reads or rewrites.
_TAGS = (
    "AirSyncBase:Type", "AirSyncBase:Data", "AirSyncBase:Truncated",
    "AirSyncBase:DisplayName", "AirSyncBase:FileReference", "AirSyncBase:EstimatedDataSize",
    "AirSyncBase:ContentType", "Email:MessageClass",
    "Email:Body", "Email:BodyTruncated", "Email:MIMEData", "Email:MIMETruncated",
    "Email:DisplayName", "Email:AttName", "Email:AttSize",
    "ItemOperations:Data", "ItemOperations:Part", "ItemOperations:Total",
)
# Whole elements the transform may cut out: a blocked attachment leaves the list.
_ELEMENTS = ("AirSyncBase:Attachment", "AirSyncBase:Attachments", "Email:Attachment", "Email:Attachments")
# What one message (or one fetched attachment) sits in.
_ITEMS = ("AirSync:Add", "AirSync:Change", "AirSync:Fetch", "Search:Result", "ItemOperations:Fetch")


class _Runtime:
    """Per worker: settings, the keyring (loaded on first need) and the FileReference cache.
    Large answers are transformed in a worker thread (proxy/exchange.py), beside the loop's
    own small ones: the caches change under a lock."""

    def __init__(self, settings: ContentSettings):
        self.settings = settings
        self._keys: Keyring | None = None
        self._lock = threading.Lock()
        self.files: OrderedDict[tuple[str, str], str] = OrderedDict()
        # (user, FileReference) -> the file type its bytes showed (a Type 4 body, a fetch):
        # a later Type 1/2 list of the same attachment then names it as it will be fetched.
        self.kinds: OrderedDict[tuple[str, str], str] = OrderedDict()

    @property
    def keys(self) -> Keyring:
        if self._keys is None:
            self._keys = Keyring.from_settings(self.settings)
        return self._keys

    def remember(self, user: str, ref: str, name: str, *, share: bool = True) -> None:
        key = (user.lower(), ref)
        with self._lock:
            self.files[key] = name
            self.files.move_to_end(key)
            while len(self.files) > self.settings.file_reference_cache:
                self.files.popitem(last=False)
        if share:   # to the serve's other workers (a fetch may land on any): refshare.py
            refshare.publish(refshare.NAME, key, name)

    def name_of(self, user: str, ref: str) -> str:
        return self.files.get((user.lower(), ref), "")

    def remember_kind(self, user: str, ref: str, kind: str, *, share: bool = True) -> None:
        key = (user.lower(), ref)
        with self._lock:
            self.kinds[key] = kind
            self.kinds.move_to_end(key)
            while len(self.kinds) > self.settings.file_reference_cache:
                self.kinds.popitem(last=False)
        if share:
            refshare.publish(refshare.KIND, key, kind)

    def kind_of(self, user: str, ref: str) -> str:
        return self.kinds.get((user.lower(), ref), "")


_runtime = _Runtime(ContentSettings())


class ContentCounts:
    """What the pipeline did in this worker, for its statistics (stats.py reads it when it
    writes the snapshot): attachments by action each time their content passes (a MIME
    body, a fetch), and links rewritten. Counted under a lock: a large answer's transform
    runs in a worker thread beside the loop's."""

    __slots__ = ("attachments", "links", "_lock")

    def __init__(self):
        self.attachments = {"encrypt": 0, "block": 0, "allow": 0}
        self.links = 0
        self._lock = threading.Lock()

    def add(self, action: str) -> None:
        with self._lock:
            self.attachments[action] = self.attachments.get(action, 0) + 1

    def add_links(self, n: int) -> None:
        with self._lock:
            self.links += n

    def outcome(self, out) -> None:
        """A MIME body's transform (message.Outcome): acted on, and judged but let through."""
        acted = set()
        with self._lock:
            self.links += out.links
            for name, action, _ in out.attachments:
                acted.add(name)
                self.attachments[action] = self.attachments.get(action, 0) + 1
            # Outcome.kinds names every top-level attachment judged, allowed or not.
            self.attachments["allow"] += sum(1 for name in out.kinds if name not in acted)


counts = ContentCounts()


def configure(settings: ContentSettings, keys: Keyring | None = None) -> None:
    """Set the worker's content settings (and keyring, for tests); call at start-up."""
    global _runtime
    _runtime = _Runtime(settings)
    _runtime._keys = keys


def transforms_for(policy: EmailSecurityPolicy | None, *, managed: bool, device_id: str, user: str) -> tuple:
    """The transforms one device's requests get under ``policy`` (None: no email security)."""
    if policy is None:
        return ()
    att = policy.attachments_for(managed)
    encrypts = att.default == "encrypt" or "encrypt" in att.file_types.values()
    keys = None
    if encrypts:
        try:
            keys = _runtime.keys
        except ConfigError as e:
            # Without the master key nothing can be sealed: ContentPlan blocks instead.
            log.error("attachment encryption unavailable, blocking instead: %s", e)
    plan = ContentPlan(policy, managed=managed, device_id=device_id, user=user, keys=keys,
                       default_message=_runtime.settings.default_block_message,
                       link_attributes=_runtime.settings.link_attributes)
    return (EmailSecurityTransform(plan),) if plan.active else ()


def no_policy_transforms(*, managed: bool, device_id: str, user: str) -> tuple:
    """The guide's "Block Attachments": what devices get while the policy source is
    unreachable or the snapshot is empty (ContentSettings.block_attachments_without_policy)."""
    s = _runtime.settings
    if not s.block_attachments_without_policy:
        return ()
    plan = ContentPlan(None, managed=managed, device_id=device_id, user=user, keys=None,
                       no_policy_block=True, default_message=s.default_block_message)
    return (EmailSecurityTransform(plan),)


def _header(headers, name: bytes) -> bytes:
    for k, v in headers:
        if k.lower() == name:
            return v.strip().lower()
    return b""


class _Refused(Exception):
    """An answer past the pipeline's limits that must not reach the device as it is."""


class EmailSecurityTransform:
    """Transform (hooks.py) applying one device's compiled email security policy."""

    commands = COMMANDS
    # A pure function of the answer and the plan (shared state under locks): the proxy may
    # run it in a worker thread (proxy/exchange.py, large answers).
    in_thread = True

    def __init__(self, plan: ContentPlan):
        self.plan = plan

    def transform_answer(self, req, status: int, headers, body: bytes) -> bytes:
        return self.transform_answer_and_headers(req, status, headers, body)[1]

    def transform_answer_and_headers(self, req, status: int, headers, body: bytes):
        """(headers, body): a GetAttachment answer whose attachment was sealed or blocked
        gets the Content-Type (and Content-Disposition file name) of what it now holds."""
        return self._transform(req, status, headers, body, False)

    def transform_answer_parts(self, req, status: int, headers, body: bytes):
        """(headers, body) as transform_answer_and_headers, except that a spliced WBXML
        answer comes as a list of parts (splice_parts: its unchanged runs of 32 KB or more
        point into ``body``), for the proxy to write with writev and never join."""
        return self._transform(req, status, headers, body, True)

    def _transform(self, req, status: int, headers, body: bytes, gather: bool):
        if status != 200 or not body:
            return headers, body
        ctype = _header(headers, b"content-type")
        encoding = _header(headers, b"content-encoding")
        try:
            raw = _gunzip(body, _runtime.settings.max_transform_bytes) if encoding == b"gzip" else body
            if req.command == "GetAttachment":
                new, headers = self._get_attachment(req, headers, raw)
            elif ctype.startswith(MULTIPART_TYPE):
                new = self._multipart(req, raw)
            elif ctype.startswith(WBXML_TYPE) or (not ctype and raw[:1] == b"\x03"):
                # gzip needs the bytes whole: parts only for an answer sent as spliced
                new = self._wbxml(req, raw, None, gather and encoding != b"gzip")
            else:
                return headers, body
        except _Refused as e:
            new, headers = self._refusal(req, headers, str(e))
        except ContentError:
            raise
        except (SegFastError, ValueError) as e:
            raise ContentError(f"{req.command} answer: {e}") from None
        if new is raw:
            return headers, body
        return headers, (gzip.compress(new, 1) if encoding == b"gzip" else new)

    def _refusal(self, req, headers, why: str):
        """(body, headers): the command's own "server error" answer in place of one the
        pipeline will not transform (the device retries later; nothing unchecked passes)."""
        from seg_fast.eas.answers import status_body

        code = _SERVER_ERROR.get(req.command)
        body = status_body(req.command, code) if code is not None else None
        if body is None:
            raise ContentError(f"{req.command} answer: {why}")
        log.warning("%s answer refused: %s; the device gets Status %d", req.command, why, code)
        out = [(k, v) for k, v in headers if k.lower() != b"content-type"]
        out.append((b"Content-Type", WBXML_TYPE))
        return body, out

    # -- answers ----------------------------------------------------------------------
    def _multipart(self, req, raw: bytes) -> bytes:
        from seg_fast.eas.multipart import build_multipart, parse_multipart

        parts = [bytes(p) for p in parse_multipart(raw)]
        new_parts = list(parts)
        new_parts[0] = self._wbxml(req, parts[0], new_parts)
        if all(a is b for a, b in zip(parts, new_parts)):
            return raw
        return build_multipart(new_parts)

    def _wbxml(self, req, raw: bytes, parts: list | None, gather: bool = False) -> bytes | list:
        from seg_fast.eas.wbxml import scan, splice, splice_parts

        # the same bytes either way; as parts, the unchanged runs point into raw
        write = splice_parts if gather else splice
        limit = _runtime.settings.max_spans
        try:
            spans = scan(raw, _TAGS, elements=_ELEMENTS, max_spans=limit)
        except SpanLimitError:
            why = f"more than security.max_spans ({limit}) strings and elements"
            if self.plan.touches_attachments or self.plan.classification:
                raise _Refused(why) from None
            # Links alone: an unrewritten link opens in the ordinary browser; nothing leaks.
            log.warning("%s answer passed untransformed: %s", req.command, why)
            return raw
        if not spans:
            return raw
        items: dict[int, list] = {}
        for sp in spans:
            item = _item_of(sp)
            if item is not None:
                items.setdefault(item, []).append(sp)
        edits: list = []
        renames: list = []
        for item_spans in items.values():
            self._item(req, raw, item_spans, parts, edits, renames)
        if not edits:
            return raw
        try:
            return _write(write, gather, raw, edits)
        except ValueError:
            if not renames:
                raise
            # Cuts that are fine one by one but not together: rename those attachments instead.
            return _write(write, gather, raw, [e for e in edits if e[1] is not None] + renames)

    def _item(self, req, raw: bytes, spans: list, parts: list | None, edits: list, renames: list) -> None:
        plan = self.plan
        user = req.user or plan.user
        text = lambda sp: raw[sp.offset:sp.offset + sp.length].decode("utf-8", "replace")
        mclass = next((text(s) for s in spans if s.tag == "Email:MessageClass"), "")
        exempt = plan.skip_smime and is_smime_class(mclass)
        verdict = None
        if plan.classification:
            tag = plan.classification.tag_from_message_class(mclass)
            verdict = plan.classification.verdict(tag, req.user_agent or "")
        blocked_all = verdict is not None
        # What a MIME body's transform did, by attachment name (it saw the magic bytes).
        acted: dict[str, str] = {}
        kinds: dict[str, str] = {}      # ... and the file type its bytes showed
        # Bodies, grouped by their Body element (2.5 bodies by the item).
        bodies: dict[object, dict[str, object]] = {}
        for sp in spans:
            if sp.tag in ("AirSyncBase:Type", "AirSyncBase:Data", "AirSyncBase:Truncated",
                          "AirSyncBase:EstimatedDataSize", "ItemOperations:Part") \
                    and sp.within("AirSyncBase:Body") is not None:
                # A multipart ItemOperations answer carries the body in a Part.
                bodies.setdefault(sp.within("AirSyncBase:Body"), {})[sp.tag.split(":")[1]] = sp
            elif sp.tag in ("Email:Body", "Email:BodyTruncated"):
                bodies.setdefault("25text", {"Type": "1"})[
                    "Data" if sp.tag == "Email:Body" else "Truncated"] = sp
            elif sp.tag in ("Email:MIMEData", "Email:MIMETruncated"):
                bodies.setdefault("25mime", {"Type": "4"})[
                    "Data" if sp.tag == "Email:MIMEData" else "Truncated"] = sp
        for body in bodies.values():
            data_sp = body.get("Data")
            part_idx = None
            if data_sp is None:
                part_sp = body.get("Part")
                part_idx = _int(raw, part_sp) if part_sp is not None else None
                if part_idx is None:
                    continue
                if parts is None or not 0 < part_idx < len(parts):
                    raise ContentError("ItemOperations Part names no part of the answer")
            t = body.get("Type")
            btype = t if isinstance(t, str) else (text(t) if t is not None else "1")
            tr = body.get("Truncated")
            truncated = tr is not None and text(tr).strip() in ("1", "true")
            if part_idx is not None:
                data = parts[part_idx]
            elif verdict is None and btype.strip() == "4":
                # A MIME body is read where it lies (megabytes with an attachment), not copied.
                data = memoryview(raw)[data_sp.offset:data_sp.offset + data_sp.length]
            else:
                data = raw[data_sp.offset:data_sp.offset + data_sp.length]
            resized = True
            texts = ()
            if verdict is not None:
                new = _template_body(verdict, btype.strip(), data)
            elif btype.strip() == "4":
                if exempt:
                    continue
                # a rebuilt message in the answer itself: as chunks, spliced in as parts
                new, outcome = transform_mime(data, plan, client=req.user_agent or "", truncated=truncated,
                                              gather=part_idx is None)
                counts.outcome(outcome)
                blocked_all = blocked_all or outcome.classification_blocked or outcome.unreadable
                exempt = exempt or outcome.smime_skipped
                acted.update((name, action) for name, action, _ in outcome.attachments)
                kinds.update(outcome.kinds)
                resized = bool(outcome.attachments or outcome.classification_blocked or outcome.unreadable)
                texts = outcome.texts
                if not outcome.attachments and plan.touches_attachments and not truncated:
                    acted["\0all"] = "allow"
            elif exempt or btype.strip() not in ("1", "2"):
                continue
            else:
                new, n_links = transform_text(data, plan, truncated=truncated)
                counts.add_links(n_links)
                resized = False
            if new is data or (_size(new) == len(data) and _joined(new) == bytes(data)):
                continue
            if part_idx is None:
                edits.append((data_sp, _as_kind(data_sp, new, texts=texts)))
            else:
                parts[part_idx] = new
            size_sp = body.get("EstimatedDataSize")
            if size_sp is not None and not truncated and resized:
                # Attachments sealed or removed, or a template in place of the message:
                # the estimate follows (a few bytes per rewritten link do not matter).
                edits.append((size_sp, _as_kind(size_sp, str(_size(new)).encode())))
        self._attachment_list(req, raw, spans, user, exempt, blocked_all, acted, kinds, edits, renames)
        self._fetched(req, raw, spans, parts, user, edits)

    def _attachment_list(self, req, raw, spans, user, exempt, blocked_all, acted, kinds, edits, renames) -> None:
        """Attachments of a Sync/Search item: remember their names; act as the MIME body's
        transform did when there is one, else by the name: an encrypted one is renamed,
        a blocked one leaves the list (or is renamed where the codec cannot cut it)."""
        plan = self.plan
        elements = {sp.offset: sp for sp in spans if sp.kind == "element"}
        cut: dict[int, list] = {}       # Attachments offset -> its Attachment elements to cut
        groups: dict[int, dict[str, object]] = {}
        for sp in spans:
            at = sp.within("AirSyncBase:Attachment")
            if at is None:
                at = sp.within("Email:Attachment")
            if at is None or sp.tag not in ("AirSyncBase:DisplayName", "AirSyncBase:FileReference",
                                            "AirSyncBase:EstimatedDataSize", "Email:DisplayName",
                                            "Email:AttName", "Email:AttSize"):
                continue
            groups.setdefault(at, {})[sp.tag.split(":")[1]] = sp
        for at, g in groups.items():
            name_sp = g.get("DisplayName")
            ref_sp = g.get("FileReference") or g.get("AttName")
            size_sp = g.get("EstimatedDataSize") or g.get("AttSize")
            name = _str(raw, name_sp) if name_sp is not None else ""
            ref = _str(raw, ref_sp) if ref_sp is not None else ""
            if ref:
                _runtime.remember(user, ref, "\0exempt\0" + name if exempt else name)
                if name in kinds:
                    _runtime.remember_kind(user, ref, kinds[name])
            if exempt:
                continue
            kind, named_action = plan.action(name, b"", _runtime.kind_of(user, ref) if ref else "")
            if blocked_all:
                action = "block"
            elif name in acted:
                action = acted[name]
            elif "\0all" in acted:
                action = "allow"  # the whole MIME body was seen and nothing was acted on
            elif extension(name) == "eml":
                action = plan.message_action() or "allow"   # fetched, its attachments are judged
            else:
                action = named_action  # no bytes here: the name (and what earlier bytes showed)
            if action == "allow" or name_sp is None:
                continue
            if action == "encrypt":
                new_name = envelope_name(name)
                edits.append((name_sp, new_name))
                if size_sp is not None:
                    est = _int(raw, size_sp)
                    if est is not None:
                        # What the device will fetch: the envelope of this many bytes.
                        kind = kinds.get(name, kind)
                        size = envelope_size(name or "attachment", sealed_content_type(name, kind), est)
                        edits.append((size_sp, _as_kind(size_sp, str(size).encode())))
            else:
                rename = [(name_sp, name + BLOCKED_SUFFIX)]
                if size_sp is not None:
                    note = block_note(name, plan.block_message).encode()
                    rename.append((size_sp, _as_kind(size_sp, str(len(note)).encode())))
                el = elements.get(at)
                parent = el.within(el.tag + "s") if el is not None else None
                if parent is not None and el.removable(raw):
                    cut.setdefault(parent, []).append(el)
                    renames.extend(rename)        # if the cuts cannot all be made together
                else:
                    edits.extend(rename)
        for parent, gone in cut.items():
            listed = sum(1 for sp in elements.values() if sp.tag == gone[0].tag and sp.within(sp.tag + "s") == parent)
            whole = elements.get(parent)
            if listed == len(gone) and whole is not None and whole.removable(raw):
                edits.append((whole, None))      # every attachment blocked: no empty list left
            else:
                edits.extend((el, None) for el in gone)

    def _fetched(self, req, raw, spans, parts, user, edits) -> None:
        """An ItemOperations Fetch of one attachment: inline Data or a multipart Part."""
        ref_sp = next((s for s in spans if s.tag == "AirSyncBase:FileReference"
                       and s.within("AirSyncBase:Attachment") is None), None)
        data_sp = next((s for s in spans if s.tag == "ItemOperations:Data"), None)
        part_sp = next((s for s in spans if s.tag == "ItemOperations:Part"), None)
        if ref_sp is None or (data_sp is None and part_sp is None):
            return
        ref = _str(raw, ref_sp)
        ctype_sp = next((s for s in spans if s.tag == "AirSyncBase:ContentType"), None)
        ctype = _str(raw, ctype_sp) if ctype_sp is not None else "application/octet-stream"
        # A byte range of an attachment cannot be sealed on its own: it is blocked.
        ranged = any(s.tag == "ItemOperations:Total" for s in spans)
        text = data_sp is not None and data_sp.kind == "str"
        if text:
            # Base64 read where it lies (megabytes, not copied first), decoded into this
            # thread's scratch buffer and, sealed, encoded from there: base64 comes back.
            src = memoryview(raw)[data_sp.offset:data_sp.offset + data_sp.length]
            try:
                held = decoded_scratch(src)
            except ValueError:
                try:      # not strict base64: the lenient decoder skips stray bytes
                    held = nullcontext(pybase64.b64decode(src))
                except ValueError:
                    raise ContentError("ItemOperations Data is not base64") from None
            with held as blob:
                result = self._transform_file(user, ref, ctype, blob, ranged, as_base64=True)
        else:
            if data_sp is not None:
                blob = raw[data_sp.offset:data_sp.offset + data_sp.length]
            else:
                idx = _int(raw, part_sp)
                if parts is None or idx is None or not 0 < idx < len(parts):
                    raise ContentError("ItemOperations Part names no part of the answer")
                blob = parts[idx]
            result = self._transform_file(user, ref, ctype, blob, ranged)
        if result is None:
            return
        new_blob, new_ctype, _ = result
        if text:
            edits.append((data_sp, _as_kind(data_sp, new_blob, ascii=True)))
        elif data_sp is not None:
            edits.append((data_sp, new_blob))
        else:
            parts[idx] = new_blob
        if ctype_sp is not None:
            edits.append((ctype_sp, _as_kind(ctype_sp, new_ctype.encode())))

    def _get_attachment(self, req, headers, raw: bytes):
        """GetAttachment: the answer body is the attachment itself; (body, headers)."""
        ref, ctype, given = _attachment_facts(req, headers)
        result = self._transform_file(req.user or self.plan.user, ref, ctype, raw, name=given)
        if result is None:
            return raw, headers
        new, new_ctype, new_name = result
        return new, _attachment_headers(headers, new_ctype, new_name)

    def stream_attachment(self, req, status: int, headers, head: bytes, length: int):
        """For proxy/sealstream.py: what the whole path would do with a GetAttachment answer
        of ``length`` bytes whose first min(length, 4096) are ``head``: None (read it whole),
        PASS (as it is) or (the answer's new headers, the envelope header, its key): the
        envelope is that header, AES-GCM of the body under the key (nonce and AAD from the
        header), its tag; ``length`` + len(header) + 16 bytes."""
        if status != 200 or req.command != "GetAttachment" or _header(headers, b"content-encoding") \
                or len(head) < min(length, _VERDICT_BYTES):
            return None
        ref, ctype, given = _attachment_facts(req, headers)
        got = self._sealing(req.user or self.plan.user, ref, ctype, head, given)
        if got is None or got == PASS:
            return got
        shown, env_head, key = got
        return _attachment_headers(headers, ENVELOPE_CONTENT_TYPE, envelope_name(shown)), env_head, key

    def _sealing(self, user: str, ref: str, ctype: str, head: bytes, name: str = ""):
        """A streamed file's verdict from its first bytes: PASS (as it is), None (not to
        seal: the whole path), or (the name the envelope records, its header, its key)."""
        from seg_fast.content.attachments import _head

        name, kind, action = self._verdict(user, ref, ctype, head[:_VERDICT_BYTES], False, name)
        if action is None:
            return PASS
        if action == "allow":
            counts.add("allow")
            return PASS
        if action != "encrypt":
            return None               # blocked, or a message to rebuild: the whole path
        plan = self.plan
        counts.add("encrypt")
        shown = name or (f"attachment.{kind}" if kind else "attachment")
        return (shown, *_head(plan.keys, plan.device_id, plan.user, shown, sealed_content_type(shown, kind)))

    def _transform_file(self, user: str, ref: str, ctype: str, blob: bytes, ranged: bool = False,
                        name: str = "", as_base64: bool = False):
        """(new bytes, new content type, new file name) or None to leave the attachment as it is.
        ``as_base64``: the new bytes as base64 text (an ItemOperations Data string)."""
        plan = self.plan
        name, kind, action = self._verdict(user, ref, ctype, bytes(blob[:_VERDICT_BYTES]), ranged, name)
        if action is None:
            return None
        if action == _WHOLE_MESSAGE:
            return _encoded(self._attached_message(name, blob, ranged), as_base64)
        if action == "allow":
            counts.add("allow")
            return None
        shown = name or (f"attachment.{kind}" if kind else "attachment")
        if action == "encrypt" and not ranged:
            counts.add("encrypt")
            # The content type is the file's (not the answer's): ItemOperations,
            # GetAttachment and a Type 4 body seal one file the same way.
            args = (plan.keys, plan.device_id, plan.user, shown, sealed_content_type(shown, kind), blob)
            # as base64: encoded from the envelope where it is built (no copy of it kept)
            return (sealed_base64(*args) if as_base64 else seal(*args)), ENVELOPE_CONTENT_TYPE, envelope_name(shown)
        return _encoded(self._blocked(shown), as_base64)

    def _verdict(self, user: str, ref: str, ctype: str, head: bytes, ranged: bool, name: str = ""):
        """(name, file type, action) for a fetched file from its first _VERDICT_BYTES bytes
        (``head``; all of them when it is shorter): action None when it is exempt (an S/MIME
        item's), _WHOLE_MESSAGE when it is a message to rebuild (which needs it whole)."""
        plan = self.plan
        name = _runtime.name_of(user, ref) or name
        if name.startswith("\0exempt\0"):
            return name, "", None
        if _is_message(name, ctype, head):
            return name, "eml", plan.message_action() or _WHOLE_MESSAGE
        head = head[:64]
        if ref and not ranged:
            _runtime.remember_kind(user, ref, file_type(name, head))
        kind, action = plan.action(name, head)
        return name, kind, action

    def stream_fetch(self, req, status: int, headers, prefix: bytes, lay, whole=()):
        """For proxy/sealstream.py: what the whole path would do with an ItemOperations answer
        of fetchstream.Layout ``lay`` whose first bytes are ``prefix`` (through the Data
        string's first min(HEAD_CHARS, lay.data_len) characters): None (read it whole: the
        whole path decides), PASS (it would leave the answer as it is) or a
        fetchstream.FetchSeal making the sealed answer's bytes. ValueError: the Data string
        does not start as strict base64 (the whole path's lenient decode may take it).
        ``whole``: (user lower-cased, FileReference) pairs to leave to the whole path."""
        from seg_fast.content.fetchstream import HEAD_CHARS, FetchSeal, _Decoder
        from seg_fast.eas.wbxml import scan, splice

        if status != 200 or req.command != "ItemOperations" or _header(headers, b"content-encoding"):
            return None
        ctype_h = _header(headers, b"content-type")
        if not (ctype_h.startswith(WBXML_TYPE) or not ctype_h):
            return None
        # The document as the whole path's scanner sees it, the Data string cut short.
        depth = len(lay.tail) - 1
        probe = prefix[:lay.start] + b"AAAA" + lay.tail
        try:
            spans = scan(probe, _TAGS, elements=_ELEMENTS, max_spans=_runtime.settings.max_spans)
        except SegFastError:
            return None
        ref_sp = next((s for s in spans if s.tag == "AirSyncBase:FileReference"), None)
        data_sp = next((s for s in spans if s.tag == "ItemOperations:Data"), None)
        if ref_sp is None or data_sp is None or data_sp.kind != "str" or depth != len(data_sp.path) + 1:
            return None
        ctype_sp = next((s for s in spans if s.tag == "AirSyncBase:ContentType"), None)
        ctype = _str(probe, ctype_sp) if ctype_sp is not None else "application/octet-stream"
        decoder = _Decoder()
        text = prefix[lay.start:lay.start + min(HEAD_CHARS, lay.data_len)]
        plain = decoder.feed(text)
        if len(plain) < _VERDICT_BYTES and len(text) < lay.data_len:
            return None
        ref = _str(probe, ref_sp)
        user = req.user or self.plan.user
        if (user.lower(), ref) in whole:
            return None
        got = self._sealing(user, ref, ctype, plain)
        if got is None or got == PASS:
            return got
        _shown, head, key = got
        mark = "\x01seg-fast:" + os.urandom(12).hex() + "\x01"
        edits = [(data_sp, mark)]
        if ctype_sp is not None:
            edits.append((ctype_sp, _as_kind(ctype_sp, ENVELOPE_CONTENT_TYPE.encode())))
        out = splice(probe, edits)
        at = out.find(mark.encode("ascii"))
        return FetchSeal(out[:at], out[at + len(mark):], lay.tail, head, key, decoder, plain, user, ref)

    def _blocked(self, shown: str):
        counts.add("block")
        return block_note(shown, self.plan.block_message).encode("utf-8"), BLOCK_NOTE_TYPE, shown + BLOCKED_SUFFIX

    def _attached_message(self, name: str, blob, ranged: bool):
        """A fetched message (.eml): rebuilt with its attachments judged at every depth
        (kept a message, so the device opens it as one), or blocked when it cannot be."""
        plan = self.plan
        shown = name or NESTED_NAME
        if ranged:
            # A byte range of a message cannot be checked.
            return self._blocked(shown) if plan.touches_attachments else None
        data = bytes(blob)
        new, outcome = transform_mime(data, plan, nested=1)
        counts.outcome(outcome)
        if outcome.unreadable:
            return self._blocked(shown)
        if new is data or new == data:
            return None
        return new, "message/rfc822", shown


# What a fetched file's verdict reads of it (_is_message: a message's header block).
_VERDICT_BYTES = 4096
_WHOLE_MESSAGE = "message"    # _verdict: a message to rebuild with its attachments judged


def _attachment_facts(req, headers) -> tuple[str, str, str]:
    """A GetAttachment answer's (FileReference, content type, the file name its
    Content-Disposition gives or "")."""
    disposition = next((v for k, v in headers if k.lower() == b"content-disposition"), None)
    given = _disposition_filename(disposition) if disposition is not None else ""
    ctype = next((v for k, v in headers if k.lower() == b"content-type"), b"application/octet-stream")
    return req.params.get("AttachmentName", ""), ctype.decode("latin-1").strip(), given


def _attachment_headers(headers, new_ctype: str, new_name: str) -> list:
    """A GetAttachment answer's headers for what it now holds: its Content-Type, and the
    Content-Disposition's file name."""
    out = []
    for k, v in headers:
        low = k.lower()
        if low == b"content-type":
            continue
        if low == b"content-disposition":
            v = _disposition_with(v, new_name)
        out.append((k, v))
    if new_ctype == BLOCK_NOTE_TYPE:
        new_ctype += "; charset=utf-8"
    out.append((b"Content-Type", new_ctype.encode("ascii")))
    return out


def _encoded(result, as_base64: bool):
    """A _transform_file result with its bytes as base64 text when asked."""
    if result is None or not as_base64:
        return result
    return (pybase64.b64encode(result[0]),) + tuple(result[1:])


def _is_message(name: str, ctype: str, blob) -> bool:
    """Whether a fetched attachment is a message: named .eml, typed message/rfc822, or
    (no magic bytes saying otherwise) starting with a MIME header block."""
    if extension(name) == "eml" or ctype.split(";", 1)[0].strip().lower() in MESSAGE_TYPES:
        return True
    head = bytes(blob[:4096])
    if file_type("", head):
        return False
    end = head.find(b"\n\n")
    end2 = head.find(b"\r\n\r\n")
    block = head[:min(e for e in (end, end2, len(head)) if e >= 0)].lower()
    first = block.split(b"\n", 1)[0]
    return (_HEADER_LINE.match(first) is not None
            and (b"\nmime-version:" in b"\n" + block or b"\ncontent-type: multipart/" in b"\n" + block))


_HEADER_LINE = re.compile(rb"^[!-9;-~]+:")

_UNSAFE_IN_QUOTED = bytes(c if 0x20 <= c < 0x7f and c not in b'"\\?' else 0x5f for c in range(256))


def _disposition_filename(value: bytes) -> str:
    """The file name a Content-Disposition header gives (filename*= or filename=), or ""."""
    from email.message import Message

    m = Message()
    m["Content-Disposition"] = value.decode("latin-1")
    name = m.get_filename("")
    return name.replace("\r", "").replace("\n", "")


def _disposition_with(value: bytes, name: str) -> bytes:
    """The Content-Disposition header with its file name replaced (type and no other
    parameter kept: the size or dates of the original no longer apply)."""
    kind = value.split(b";", 1)[0].strip()
    if not kind or b"=" in kind:
        kind = b"attachment"
    # The name comes from mail: no quote, backslash or control byte reaches the header.
    ascii_name = name.encode("ascii", "replace").translate(_UNSAFE_IN_QUOTED)
    out = kind + b'; filename="' + ascii_name + b'"'
    if not name.isascii():
        from urllib.parse import quote
        out += b"; filename*=UTF-8''" + quote(name, safe="").encode("ascii")
    return out


def _item_of(sp):
    for tag, off in zip(reversed(sp.path), reversed(sp.path_offsets)):
        if tag in _ITEMS:
            return off
    return None


def _str(raw: bytes, sp) -> str:
    return raw[sp.offset:sp.offset + sp.length].decode("utf-8", "replace").strip()


def _int(raw: bytes, sp):
    try:
        return int(raw[sp.offset:sp.offset + sp.length])
    except ValueError:
        return None


class _Text:
    """A large inline string's UTF-8 bytes (checked: valid, no NUL), to be written as
    the ``str`` it decodes to would be, without decoding and re-encoding megabytes (held,
    not a bytes subclass: making one would copy them); bytes, or a list of chunks."""

    __slots__ = ("data",)

    def __init__(self, data: bytes):
        self.data = data


# Inline strings this large are _Text (a body with a sealed attachment, a fetched file).
_BIG_TEXT = 64 * 1024


def _size(new) -> int:
    return sum(map(len, new)) if type(new) is list else len(new)


def _joined(new) -> bytes:
    return join(new) if type(new) is list else new


def _as_kind(sp, new, ascii: bool = False, texts=()):
    """The value for splice: text stays an inline string when it is valid UTF-8.
    ``ascii``: ``new`` is known to be ASCII without NUL (base64): not scanned again.
    ``new`` may be a list of chunks (a rebuilt message): kept so when it is large text;
    the chunks in ``texts`` are such ASCII (Outcome.texts): each is checked as one "A"
    (an ASCII byte ends a character the same way, however many there are)."""
    if type(new) is list:
        if sp.kind != "opaque" and _size(new) >= _BIG_TEXT and utf8_text_parts(
                [b"A" if any(c is t for t in texts) else c for c in new]):
            return _Text(new)
        new = join(new)
    if sp.kind == "opaque":
        return new
    if ascii and len(new) >= _BIG_TEXT:
        return _Text(new)
    if len(new) >= _BIG_TEXT:
        # written as OPAQUE when not text, which EAS clients read for Data too
        return _Text(new) if utf8_text(new) else new
    try:
        value = new.decode("utf-8")
    except UnicodeDecodeError:
        return new  # written as OPAQUE, which EAS clients read for Data too
    return new if "\0" in value else value


def _write(write, gather: bool, raw: bytes, edits: list):
    """splice/splice_parts with the _Text values in: what writing each as its ``str``
    writes (STR_I, its UTF-8 bytes, NUL). As parts, the splice writes a short marker in
    its place and the marker is then cut out of its part around the bytes themselves: the
    megabytes are neither decoded, nor encoded, nor copied (with the GIL held, which would
    stall the event loop behind a transform in a worker thread)."""
    if not any(type(v) is _Text for _, v in edits):
        return write(raw, edits)
    if not gather:
        return write(raw, [(sp, _joined(v.data).decode("utf-8") if type(v) is _Text else v) for sp, v in edits])
    marks = {}
    out = []
    for sp, v in edits:
        if type(v) is _Text:
            mark = "\x01seg-fast:" + os.urandom(12).hex() + "\x01"   # unguessable: not in any answer
            marks[mark.encode("ascii")] = v.data
            v = mark
        out.append((sp, v))
    parts = write(raw, out)
    for mark, value in marks.items():
        for k, part in enumerate(parts):
            if type(part) is bytes:
                at = part.find(mark)
                if at >= 0:
                    pieces = value if type(value) is list else [value]
                    parts[k:k + 1] = [part[:at], *map(memoryview, pieces), part[at + len(mark):]]
                    break
        else:
            raise AssertionError("spliced marker not found")
    return [p for p in parts if len(p)]


def _template_body(template: str, btype: str, data: bytes) -> bytes:
    if btype == "2":
        return f"<html><body><p>{html.escape(template)}</p></body></html>".encode("utf-8")
    if btype == "4":
        return template_message(data, template)
    return template.encode("utf-8")


def _gunzip(body: bytes, limit: int) -> bytes:
    d = zlib.decompressobj(wbits=31)
    out = d.decompress(body, limit + 1)
    if len(out) > limit or d.unconsumed_tail:
        raise ContentError("gzip answer larger than security.max_transform_bytes")
    return out
