"""One message's email-security transform: links, attachments, classification and the
S/MIME exemption, over a whole RFC 822 message or over a bare text/HTML body.

``ContentPlan`` is a policy compiled for one device and user (pipeline.transforms_for
builds it once per snapshot and device); ``transform_mime`` and ``transform_text``
are pure functions of bytes and a plan. Only the parts that change are rebuilt; every
other byte of the message is copied through as it came.
"""
from __future__ import annotations

import binascii
import fnmatch
import re
from urllib.parse import quote

import pybase64

from seg_fast.content._links import LinkRewriter
from seg_fast.content._mime import (Part, b64decode_lines, b64encode_lines, join, line_ending, qp_decode, qp_encode,
                                    qp_locate, strip_breaks, walk)
from seg_fast.content.attachments import (ENVELOPE_CONTENT_TYPE, block_note, decoded_scratch, envelope_name,
                                          file_type, known_type, sealed_base64, sealed_content_type, stricter)
from seg_fast.content.keys import Keyring
from seg_fast.content.model import ClassificationPolicy, EmailSecurityPolicy, HyperlinkPolicy
from seg_fast.errors import MIMEError

SMIME_TYPES = frozenset({"multipart/signed", "application/pkcs7-mime", "application/x-pkcs7-mime"})
# A message attached to a message (a forward as attachment): its attachments are judged
# one by one like the outer message's, unless the policy names the "eml" type itself.
MESSAGE_TYPES = frozenset({"message/rfc822", "message/global"})
# Messages inside messages deeper than this are blocked whole (each level costs a walk).
MAX_NESTED_MESSAGES = 8
NESTED_NAME = "attached message.eml"
# Charsets whose bytes are not ASCII-compatible: links cannot be found bytewise.
_WIDE_CHARSETS = ("utf-16", "utf-32", "ucs-2", "ucs-4", "utf-7")
_DROP_ON_REPLACE = frozenset({"content-type", "content-transfer-encoding", "content-disposition"})
UNREADABLE_TEMPLATE = "This message could not be checked by the email gateway and was withheld."
# Bytes of a decoded attachment the file-type check looks at.
_HEAD = 64
# Copies of a message this large or larger are made without the GIL (_mime.join).
_BIG_COPY = 256 * 1024
# A piece of a gathered message this large stays a piece of its own (splice).
_OWN_CHUNK = 32 * 1024


class Outcome:
    """What the transform did to one message (the Sync answer's attachment list
    follows it)."""

    __slots__ = ("links", "attachments", "kinds", "smime_skipped", "classification_blocked", "unreadable", "texts")

    def __init__(self):
        self.links = 0
        # (original name, action, new name or "") per attachment acted on.
        self.attachments: list[tuple[str, str, str]] = []
        # Attachment name -> the file type that decided its action (its bytes' when known).
        self.kinds: dict[str, str] = {}
        self.smime_skipped = False
        self.classification_blocked = False
        # The message was past the walker's limits and replaced by a notice.
        self.unreadable = False
        # New bodies that are base64 text (ASCII, no NUL) by construction: a check of the
        # rebuilt message as UTF-8 need not read their megabytes.
        self.texts: list[bytes] = []

    @property
    def changed(self) -> bool:
        return bool(self.links or self.attachments or self.classification_blocked or self.unreadable)


class ContentPlan:
    """An EmailSecurityPolicy compiled for one device and user."""

    def __init__(self, policy: EmailSecurityPolicy | None, *, managed: bool, device_id: str, user: str,
                 keys: Keyring | None, no_policy_block: bool = True, default_message: str = "",
                 link_attributes: tuple[str, ...] = ("href",)):
        self.device_id = device_id
        self.user = user
        self.keys = keys
        self.default_message = default_message
        if policy is None:
            # No policy (source unreachable, empty snapshot): the guide's Block Attachments.
            self.links = None
            self.file_actions: dict[str, str] = {}
            self.default_action = "block" if no_policy_block else "allow"
            self.block_message = default_message
            self.classification = None
            self.skip_smime = True
            return
        hl = policy.hyperlinks
        self.links = _rewriter(hl, tuple(link_attributes)) if hl.enabled else None
        att = policy.attachments_for(managed)
        self.file_actions = {k.lower().lstrip("."): v for k, v in att.file_types.items()}
        self.default_action = att.default
        self.block_message = att.block_message or default_message
        self.classification = _classifier(policy.classification) if policy.classification.enabled else None
        self.skip_smime = policy.skip_smime
        if keys is None:
            # No usable key: what should be encrypted is blocked instead (fail closed).
            self.file_actions = {k: ("block" if v == "encrypt" else v) for k, v in self.file_actions.items()}
            if self.default_action == "encrypt":
                self.default_action = "block"

    @property
    def touches_attachments(self) -> bool:
        return self.default_action != "allow" or any(a != "allow" for a in self.file_actions.values())

    @property
    def active(self) -> bool:
        return bool(self.links or self.touches_attachments or self.classification)

    @property
    def strictest(self) -> str:
        """The strictest action of the policy: what a name that tells nothing calls for."""
        out = self.default_action
        for a in self.file_actions.values():
            out = stricter(a, out)
        return out

    def action(self, name: str, head: bytes, seen: str = "") -> tuple[str, str]:
        """(file type, action) for an attachment: the stricter of what its name and its
        bytes (``head``, or the type ``seen`` in its bytes earlier) call for, so a ZIP
        named holiday.png is handled as a ZIP, and an .exe holding a PNG as an .exe.
        A name without an extension, or with one that names no kind of file, could hide
        anything: it calls for the policy's strictest action (a list, which has only the
        names, then says what the fetch will do)."""
        by_name = file_type(name, b"")
        if name and by_name not in self.file_actions and not known_type(by_name):
            named = self.strictest
        else:
            named = self.file_actions.get(by_name, self.default_action)
        kind = file_type(name, head) if head else seen
        if not kind:
            return by_name, named
        action = self.file_actions.get(kind, self.default_action)
        if stricter(named, action) != action:
            return by_name, named
        return kind, action

    def message_action(self) -> str | None:
        """What an attached message gets as a whole: the policy's own "eml" rule, else
        None: it stays a message and its attachments are judged one by one (at every depth;
        an "eml": "allow" rule means the same, never that its attachments go unchecked)."""
        action = self.file_actions.get("eml")
        return action if action in ("encrypt", "block") else None


# Compiled rewriters of the last few hyperlink policies: every device of a snapshot
# shares one (a domain list from CSV can be long). Keyed by identity, the policy kept.
_REWRITERS: dict[tuple[int, tuple[str, ...]], tuple[HyperlinkPolicy, LinkRewriter]] = {}


def _rewriter(hl: HyperlinkPolicy, attributes: tuple[str, ...]) -> LinkRewriter:
    key = (id(hl), attributes)
    hit = _REWRITERS.get(key)
    if hit is not None and hit[0] is hl:
        return hit[1]
    if len(_REWRITERS) >= 8:
        _REWRITERS.clear()
    rw = LinkRewriter(hl.scheme_map, hl.mode, hl.domains, attributes)
    _REWRITERS[key] = (hl, rw)
    return rw


_CLASSIFIERS: dict[int, tuple[ClassificationPolicy, "_Classifier"]] = {}


def _classifier(pol: ClassificationPolicy) -> "_Classifier":
    """One per policy object, as _rewriter: a plan is made per request, and compiling the
    tags' client patterns (fnmatch.translate) each time was most of what a plan cost."""
    hit = _CLASSIFIERS.get(id(pol))
    if hit is not None and hit[0] is pol:
        return hit[1]
    if len(_CLASSIFIERS) >= 8:
        _CLASSIFIERS.clear()
    c = _CLASSIFIERS[id(pol)] = (pol, _Classifier(pol))
    return c[1]


class _Classifier:
    def __init__(self, pol: ClassificationPolicy):
        self.header = pol.header.lower()
        self.tags = {
            t.tag.strip().lower(): (t.tag, [re.compile(fnmatch.translate(p), re.I) for p in t.allowed_clients],
                                    t.others, t.template)
            for t in pol.tags
        }
        self.untagged = pol.untagged
        self.untagged_template = pol.untagged_template

    def verdict(self, tag: str | None, client: str) -> str | None:
        """The template body when this client may not read the message, else None."""
        entry = self.tags.get(tag.strip().lower()) if tag else None
        if entry is None:
            return self.untagged_template if self.untagged == "block" else None
        name, patterns, others, template = entry
        if any(p.match(client or "") for p in patterns):
            return None
        return template.replace("{tag}", name) if others == "block" else None

    def tag_from_message_class(self, message_class: str) -> str | None:
        # "IPM.Note.Confidential": the tag as the last component of the class.
        last = message_class.rsplit(".", 1)[-1].strip().lower()
        return last if last in self.tags else None


def is_smime_class(message_class: str) -> bool:
    return message_class.lower().startswith("ipm.note.smime")


# --- whole messages ------------------------------------------------------------------

def transform_mime(data: bytes, plan: ContentPlan, *, client: str = "", truncated: bool = False,
                   nested: int = 0, gather: bool = False) -> tuple[bytes, Outcome]:
    """The message with the plan applied, and what was done. ``truncated``: the
    message was cut by the server (its last part may be incomplete). ``nested``: how
    many messages this one sits in (an attachment fetched alone is 1); classification
    and the S/MIME exemption are the outer message's, so they apply at 0 only.
    ``data`` may be a memoryview (read where it lies). ``gather``: a large rebuilt
    message comes as a list of chunks (splice), not joined."""
    out = Outcome()
    if not plan.active or not data:
        return data, out
    extra = (plan.classification.header,) if plan.classification else ()
    try:
        parts = walk(data, extra)
    except MIMEError:
        if not plan.touches_attachments and not plan.classification:
            return data, out
        # Past the walker's limits: what it holds cannot be checked, so it is not sent.
        out.unreadable = True
        return template_message(data, UNREADABLE_TEMPLATE), out
    top: Part = parts[0]
    eol = line_ending(data)
    if nested:
        return _parts(data, parts, plan, out, eol, truncated, nested, gather), out
    if plan.classification:
        # Classification applies to signed mail too: the exemption is for rewrites.
        template = plan.classification.verdict(top.headers.get(plan.classification.header), client)
        if template is not None:
            out.classification_blocked = True
            return template_message(data, template), out
    if plan.skip_smime and top.content_type in SMIME_TYPES:
        out.smime_skipped = True
        return data, out
    return _parts(data, parts, plan, out, eol, truncated, nested, gather), out


def _parts(data: bytes, parts: list, plan: ContentPlan, out: Outcome, eol: bytes, truncated: bool,
           nested: int, gather: bool = False) -> bytes:
    """The walked message with every leaf (and attached message) transformed."""
    edits: list[tuple[int, int, bytes]] = []
    n = len(data)
    # Messages each part sits in, within this walk (7bit attached messages are walked).
    inside = [0] * len(parts)
    skip_to = -1
    for p in parts:
        if p.parent >= 0:
            inside[p.index] = inside[p.parent] + (parts[p.parent].content_type in MESSAGE_TYPES)
        if p.start < skip_to:
            continue                                   # within an attached message handled whole
        cut = truncated and p.end >= n
        if p.content_type in MESSAGE_TYPES and p.index > 0:
            edit = _attached_message(data, p, plan, out, eol, cut, nested + inside[p.index] + 1)
            if edit is not False:
                if edit is not None:
                    edits.append(edit)
                skip_to = p.end
                continue
        if p.multipart or p.children:
            continue
        if p.is_attachment:
            if plan.touches_attachments:
                edit = _attachment(data, p, plan, out, eol, cut)
                if edit is not None:
                    edits.append(edit)
        elif plan.links is not None and p.content_type in ("text/plain", "text/html"):
            edits += _text_part(data, p, plan.links, out, cut)
    return splice(data, edits, gather)


def _attached_message(data: bytes, p: Part, plan: ContentPlan, out: Outcome, eol: bytes, cut: bool,
                      depth: int):
    """The edit for an attached message ``depth`` messages deep, None for none, or False
    when the walk already holds its parts (the caller then goes through them)."""
    whole = plan.message_action()
    if plan.touches_attachments and (whole is not None or depth > MAX_NESTED_MESSAGES):
        # The policy's "eml" rule, or too deep to check: the message as one file.
        return _attachment(data, p, plan, out, eol, cut,
                           action=whole if depth <= MAX_NESTED_MESSAGES else "block", kind="eml")
    if depth > MAX_NESTED_MESSAGES:
        return None                                    # links alone: too deep to bother, as it came
    if p.children or p.body_start >= p.end:
        return False
    if p.cte not in ("base64", "quoted-printable"):
        return False                                   # not walked (past the walker): nothing inside
    # Encoded (RFC 2046 wants 7bit, mail clients do it anyway): decode, transform, encode.
    if cut:
        return _block(data, p, plan, out, eol, p.filename or NESTED_NAME) if plan.touches_attachments else None
    try:
        inner = _decode_body(memoryview(data)[p.body_start:p.end], p.cte)
    except (binascii.Error, ValueError):
        inner = None
    if inner is None:
        return _block(data, p, plan, out, eol, p.filename or NESTED_NAME) if plan.touches_attachments else None
    new, sub = transform_mime(inner, plan, nested=depth)
    out.links += sub.links
    out.attachments += sub.attachments
    if sub.unreadable:
        return _block(data, p, plan, out, eol, p.filename or NESTED_NAME)
    if new is inner or new == inner:
        return None
    body = b64encode_lines(new, 76, eol) if p.cte == "base64" else qp_encode(new, eol)
    return p.body_start, p.end, body


def template_message(data: bytes, template: str) -> bytes:
    """The message with its body replaced by ``template`` (its headers kept but the
    Content-* ones): what a client not allowed to read a classified message gets."""
    eol = line_ending(data)
    try:
        top = walk(data, max_parts=1, max_depth=0, headers_only=True)[0]
    except MIMEError:
        top = None
    body = template.encode("utf-8") + eol
    if top is None:
        return b"".join(h + eol for h in _text_headers(eol)) + eol + body
    return _replace_part(data, top, _text_headers(eol), body, eol)


def transform_text(data: bytes, plan: ContentPlan, *, truncated: bool = False) -> tuple[bytes, int]:
    """A bare plain-text or HTML body (Sync Body Type 1/2): links only."""
    if plan.links is None or not data:
        return data, 0
    return plan.links.rewrite(data, truncated)


def splice(data: bytes, edits: list[tuple[int, int, bytes]], gather: bool = False):
    """``data`` with each (start, end) range replaced by bytes (or a tuple of bytes
    chunks); ranges sorted and disjoint. ``gather`` (a large message): the result as a
    list of chunks, each of _OWN_CHUNK or more bytes as it is (a sealed attachment's new
    text, an unchanged run of ``data`` as a view), the small ones between joined: for
    the WBXML answer's own parts, never copied whole."""
    if not edits:
        return data
    view = memoryview(data)
    chunks, pos = [], 0
    for start, end, new in edits:
        chunks.append(view[pos:start])
        if isinstance(new, tuple):
            chunks.extend(new)
        else:
            chunks.append(new)
        pos = end
    chunks.append(view[pos:])
    if gather and len(data) >= _BIG_COPY:
        out, small = [], []
        for c in chunks:
            if len(c) >= _OWN_CHUNK:
                if small:
                    out.append(b"".join(small))
                    small = []
                out.append(c)
            elif len(c):
                small.append(c)
        if small:
            out.append(b"".join(small))
        return out
    # join: the copy (megabytes with a sealed attachment) without the GIL
    return join(chunks) if len(data) >= _BIG_COPY else b"".join(chunks)


def _charset_ok(p: Part) -> bool:
    cs = p.params.get("charset", "").lower()
    return not cs.startswith(_WIDE_CHARSETS)


def _text_part(data: bytes, p: Part, links: LinkRewriter, out: Outcome, cut: bool) -> list:
    """Edits rewriting the links of one text part."""
    if not _charset_ok(p) or p.body_start >= p.end:
        return []
    body = memoryview(data)[p.body_start:p.end]
    if p.cte == "base64":
        if cut:
            return []  # a cut base64 part cannot be re-encoded faithfully
        try:
            text = pybase64.b64decode(body)
        except (binascii.Error, ValueError):
            return []
        new, count = links.rewrite(text)
        if not count:
            return []
        out.links += count
        return [(p.body_start, p.end, b64encode_lines(new, 76, line_ending(body)))]
    if p.cte == "quoted-printable":
        return _qp_part(data, p, links, out, cut)
    # 7bit, 8bit and binary: rewrite in place.
    new, count = links.rewrite(body, cut)
    if not count:
        return []
    out.links += count
    return [(p.body_start, p.end, new)]


def _qp_part(data: bytes, p: Part, links: LinkRewriter, out: Outcome, cut: bool) -> list:
    """Links in a quoted-printable part: found in the decoded text (soft line breaks
    may split them), replaced in the encoded text where each scheme's bytes lie, so
    the rest of the part stays byte for byte; re-encoded whole only when a line would
    grow past 76 characters."""
    body = memoryview(data)[p.body_start:p.end]
    text = qp_decode(body)
    found = links.find(text, cut)
    if not found:
        return []
    seg = bytes(body)
    marks = []
    for off, length, _new in found:
        marks += [off, off + length - 1]
    locs = qp_locate(body, marks)
    base = p.body_start
    edits = []
    for k, (_off, _length, new) in enumerate(found):
        start, end = base + locs[2 * k][0], base + locs[2 * k + 1][1]
        if locs[2 * k][0] < 0 or locs[2 * k + 1][1] < 0 or not _fits(seg, start - base, end - base, len(new)):
            edits = None
            break
        edits.append((start, end, new))
    if edits is not None:
        out.links += len(found)
        return edits
    if cut:
        return []  # a cut part is never re-encoded
    out.links += len(found)
    return [(p.body_start, p.end, qp_encode(links.rewrite(text)[0], line_ending(body)))]


def _fits(body: bytes, start: int, end: int, new_len: int) -> bool:
    """The encoded line holding body[start:end] (the part's body) stays within 76
    characters with new_len bytes in place of that range (soft breaks inside the range
    disappear)."""
    line_start = body.rfind(b"\n", 0, start) + 1
    line_end = body.find(b"\n", end)
    if line_end < 0:
        line_end = len(body)
    if line_end > end and body[line_end - 1] == 13:
        line_end -= 1
    return (start - line_start) + new_len + (line_end - end) <= 76


def _decode_body(body: memoryview, cte: str) -> bytes:
    if cte == "base64":
        try:
            return b64decode_lines(body)    # one pass, line breaks and all, without the GIL
        except ValueError:
            return pybase64.b64decode(body)  # stray bytes: the lenient decoder skips them
    if cte == "quoted-printable":
        return binascii.a2b_qp(bytes(body))
    return bytes(body)


def _head(body: memoryview, cte: str) -> bytes:
    """The first decoded bytes of an attachment (for its magic bytes)."""
    try:
        if cte == "base64":
            text = strip_breaks(body[:_HEAD * 2])
            return pybase64.b64decode(text[:len(text) // 4 * 4])[:_HEAD]
        return _decode_body(body[:_HEAD * 4], cte)[:_HEAD]
    except (binascii.Error, ValueError):
        return b""


def _attachment(data: bytes, p: Part, plan: ContentPlan, out: Outcome, eol: bytes, cut: bool,
                action: str | None = None, kind: str = ""):
    body = memoryview(data)[p.body_start:p.end]
    name = p.filename
    if action is None:
        kind, action = plan.action(name, _head(body, p.cte))
    out.kinds[name] = kind
    if action == "allow":
        return None
    shown = name or (f"attachment.{kind}" if kind else "attachment")
    if action == "encrypt" and not cut:
        new_body = _sealed_body(plan, shown, kind, body, p.cte, eol)
        if new_body is not None:
            new_name = envelope_name(shown)
            headers = [
                b"Content-Type: " + ENVELOPE_CONTENT_TYPE.encode() + b"; " + _param("name", new_name),
                b"Content-Transfer-Encoding: base64",
                b"Content-Disposition: attachment; " + _param("filename", new_name),
            ]
            out.attachments.append((name, "encrypt", new_name))
            out.texts.append(new_body)
            return _part_edit(data, p, headers, new_body, eol)
    # Block (or an encryption that cannot be done faithfully: fail closed).
    return _block(data, p, plan, out, eol, shown)


def _sealed_body(plan: ContentPlan, shown: str, kind: str, body: memoryview, cte: str, eol: bytes):
    """An attachment's body sealed, as the base64 lines of its new part; None when its
    bytes cannot be read. Base64 (the rule) is decoded into this thread's scratch buffer
    and sealed from there: of the megabytes, only the new text is fresh memory."""
    args = (plan.keys, plan.device_id, plan.user, shown, sealed_content_type(shown, kind))
    if cte == "base64":
        try:
            with decoded_scratch(body) as plain:
                return sealed_base64(*args, plain, 76, eol)
        except ValueError:
            pass                       # not strict base64: the lenient decode below
    try:
        plain = _decode_body(body, cte)
    except (binascii.Error, ValueError):
        return None
    return sealed_base64(*args, plain, 76, eol)


def _block(data: bytes, p: Part, plan: ContentPlan, out: Outcome, eol: bytes, shown: str):
    """The edit putting the block note in the part's place."""
    note = block_note(shown, plan.block_message).replace("\r\n", eol.decode()).encode("utf-8")
    out.attachments.append((p.filename, "block", ""))
    return _part_edit(data, p, _text_headers(eol), note, eol)


def _text_headers(eol: bytes) -> list[bytes]:
    return [b"Content-Type: text/plain; charset=utf-8", b"Content-Transfer-Encoding: 8bit",
            b"Content-Disposition: inline"]


def _param(key: str, value: str) -> bytes:
    if value.isascii() and value.isprintable():
        return f'{key}="' .encode() + value.replace("\\", "\\\\").replace('"', '\\"').encode() + b'"'
    return f"{key}*=utf-8''{quote(value, safe='')}".encode("ascii")


def _kept_headers(data: bytes, p: Part) -> list[bytes]:
    """The part's header lines (folded lines kept whole) but its Content-Type,
    Content-Transfer-Encoding and Content-Disposition."""
    block = bytes(data[p.start:p.body_start])
    lines = block.splitlines(keepends=True)
    kept: list[bytes] = []
    drop = False
    for line in lines:
        if not line.strip():
            break
        if line[:1] in (b" ", b"\t"):
            if not drop and kept:
                kept[-1] += line
            continue
        name = line.split(b":", 1)[0].strip().lower().decode("latin-1")
        drop = name in _DROP_ON_REPLACE
        if not drop:
            kept.append(line)
    return kept


def _part_edit(data: bytes, p: Part, headers: list[bytes], body: bytes, eol: bytes):
    kept = _kept_headers(data, p)
    block = b"".join(kept) + b"".join(h + eol for h in headers) + eol
    # Header and body stay separate chunks: splice joins everything in one copy.
    return p.start, p.end, (block, body)


def _replace_part(data: bytes, p: Part, headers: list[bytes], body: bytes, eol: bytes) -> bytes:
    start, end, new = _part_edit(data, p, headers, body, eol)
    return splice(data, [(start, end, new)])
