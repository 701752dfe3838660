"""What a fleet device expects of email security ("on"), checked answer by answer.

The policy is BENCH-PROFILE's (``seg_fast.sim.sizing.policy_file`` loads the same
constants): Include-mode hyperlink rewriting for ``REWRITE_DOMAINS``, pdf/docx/zip
sealed for managed devices, png blocked for unmanaged ones, S/MIME exempt,
classification allowing the fleet's client. Each function compares what the
device got through the gateway with what the simulator sent (the *direct* answer:
the same corpus message, in process) and returns why it is wrong, or None.

- Bodies, under the link oracle: the answer with ``awbs://``/``awb://`` turned back
  into ``https://``/``http://`` is the direct body, byte for byte; every rewritten
  link names a listed domain and every link left alone an unlisted one.
- Sealed attachments: an envelope (never the plain bytes), opened with the
  device's key and compared with the original byte for byte.
- Blocked attachments: absent (from the attachment list, from the MIME body, their
  bytes nowhere), the block note in their place.
"""
from __future__ import annotations

import binascii
import email
import email.policy
import re
import zlib

from seg_fast.content.attachments import (ENVELOPE_CONTENT_TYPE, ENVELOPE_MAGIC, envelope_name, extension,
                                          open_envelope)
from seg_fast.errors import SegFastError
from seg_fast.sim import checks
from seg_fast.sim.corpus import REWRITE_DOMAINS

ENCRYPT_MANAGED: tuple[str, ...] = ("pdf", "docx", "zip")
BLOCK_UNMANAGED: tuple[str, ...] = ("png",)
BLOCKED_SUFFIX = " (removed).txt"      # where the gateway cannot cut a blocked entry out
# Whole-MIME comparisons (a parse of both messages) run on 1 in SAMPLE_EVERY items;
# every fetched envelope is opened.
SAMPLE_EVERY = 10

SCHEMES = frozenset(("awbs", "awb", "https", "http"))
_HOST = re.compile(r"[A-Za-z0-9.-]+")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_LISTED: dict[str, bool] = {}       # host -> listed(host), for the hosts bodies name (bounded)


def listed(url_or_host: str) -> bool:
    """Is the URL's (or host's) domain on the include list?"""
    host = url_or_host.split("://", 1)[-1].split("/", 1)[0].split("?", 1)[0].lower()
    return any(host == d or host.endswith("." + d) for d in REWRITE_DOMAINS)


def links(s: str):
    """(start, scheme, host) of each link in ``s``, in order: what
    ``re.finditer(r"\b(awbs|awb|https|http)://([A-Za-z0-9.-]+)", s)`` finds, by looking for
    ``://`` rather than trying the pattern at every character (the whole check of a ~37 KB
    body: ~165 µs of CPU, not ~1.2 ms; it was a sixth of a security-on shard's busy time)."""
    end = 0                         # where the last link ended: the next scheme starts at or after it
    i = s.find("://")
    while i >= 0:
        # the scheme is the whole run of word characters before "://" (\b before it)
        j = i
        while j > 0 and i - j <= 5 and (s[j - 1].isalnum() or s[j - 1] == "_"):
            j -= 1
        scheme = s[j:i]
        m = _HOST.match(s, i + 3) if j >= end and scheme in SCHEMES else None
        if m is not None:
            yield j, scheme, m.group()
            end = m.end()
            i = s.find("://", end)
        else:
            i = s.find("://", i + 3)


def unrewrite(s: str) -> str:
    return s.replace("awbs://", "https://").replace("awb://", "http://")


def links_ok(got: str, direct: str) -> str | None:
    """Include mode over one body: only listed domains' schemes changed, nothing else."""
    if unrewrite(got) != direct:
        return "body differs from the direct body beyond link schemes"
    known = _LISTED
    for _, scheme, host in links(got):
        rewritten = scheme.startswith("awb")
        is_listed = known.get(host)
        if is_listed is None:
            is_listed = listed(host)
            if len(known) < 4096:
                known[host] = is_listed
        if rewritten != is_listed:
            return (f"{scheme}://{host}: "
                    + ("an unlisted domain rewritten" if rewritten else "a listed domain not rewritten"))
    return None


def expected_body(direct: str) -> bytes | None:
    """The body the include list asks for: ``direct`` with each listed link's scheme
    rewritten (https -> awbs, http -> awb), as UTF-8; None unless it passes ``links_ok``
    (it always should: made by this oracle's own reading of the links, not the gateway's)."""
    out, at = [], 0
    for i, scheme, host in links(direct):
        if scheme in ("https", "http") and listed(host):
            out += [direct[at:i], "awbs" if scheme == "https" else "awb"]
            at = i + len(scheme)
    got = "".join(out) + direct[at:]
    return got.encode() if links_ok(got, direct) is None else None


_EXPECTED: dict[str, bytes | None] = {}     # direct body -> expected_body (bounded)
_UNSET = object()


def body_ok(got: bytes, direct: str) -> str | None:
    """``links_ok`` over an answer's bytes. The fleet's pool repeats its messages, so the
    expected body is made once per direct body and an answer byte for byte equal to it
    passes at the cost of a comparison (that body passed ``links_ok`` when it was made);
    any other answer gets the whole check and its reason."""
    want = _EXPECTED.get(direct, _UNSET)
    if want is _UNSET:
        if len(_EXPECTED) >= 1024:
            _EXPECTED.clear()
        want = _EXPECTED[direct] = expected_body(direct)
    if got == want:
        return None
    try:
        return links_ok(got.decode("utf-8"), direct)
    except UnicodeDecodeError:
        return "HTML body is not UTF-8"


def action(ext: str, managed: bool) -> str:
    if managed and ext in ENCRYPT_MANAGED:
        return "encrypt"
    if not managed and ext in BLOCK_UNMANAGED:
        return "block"
    return "keep"


def sampled(device_id: str, server_id: str) -> bool:
    return zlib.crc32(f"{device_id}/{server_id}".encode()) % SAMPLE_EVERY == 0


def _b64_head(data: bytes) -> bytes:
    """The first base64 line of ``data`` as the MIME body carries it."""
    return binascii.b2a_base64(data[:57], newline=False)


def attachment_list_ok(listed_names: list[str], msg, managed: bool) -> str | None:
    """The Sync item's AirSyncBase:Attachments (display names) against the message's
    attachments: kept ones by name, sealed ones as ``name.segenc``, blocked ones absent
    (or renamed as removed where the gateway cannot cut the entry out)."""
    names = list(listed_names)
    for name, _ctype, _data in msg.attachments:
        act = "keep" if msg.signed else action(extension(name), managed)     # S/MIME is exempt
        if act == "block":
            if name in names:
                return f"blocked attachment {name} still listed"
            if name + BLOCKED_SUFFIX in names:
                names.remove(name + BLOCKED_SUFFIX)
            continue
        want = name if act == "keep" else envelope_name(name)
        if want not in names:
            return f"attachment list {listed_names!r}: {want!r} missing"
        names.remove(want)
    if names:
        return f"attachment list {listed_names!r}: {names!r} should not be there"
    return None


def mime_cheap_ok(got: bytes, msg, managed: bool) -> str | None:
    """Every item: S/MIME untouched, and no sealed or blocked attachment's bytes left."""
    if msg.signed:
        return None if got == msg.mime else "S/MIME message changed (it is exempt)"
    for name, _ctype, data in msg.attachments:
        act = action(extension(name), managed)
        if act != "keep" and _b64_head(data) in got:
            return f"attachment {name} ({act}) still in the MIME body in the clear"
    return None


def mime_full_ok(got: bytes, msg, managed: bool, opener) -> str | None:
    """A sampled item: both messages parsed; bodies under the link oracle, each
    attachment kept, sealed (opened, compared byte for byte) or replaced by the note."""
    if msg.signed:
        return mime_cheap_ok(got, msg, managed)
    try:
        m = email.message_from_bytes(got, policy=email.policy.default)
        leaves = [p for p in m.walk() if not p.is_multipart()]
    except Exception as exc:       # the stdlib parser on a damaged message
        return f"MIME does not parse: {type(exc).__name__}"
    body = {}
    rest = []
    memo: dict[int, bytes] = {}
    for p in leaves:
        ct = p.get_content_type()
        if ct in ("text/plain", "text/html") and ct not in body and not p.get_filename():
            body[ct] = p
        else:
            rest.append(p)
    for ct, direct in (("text/plain", msg.text), ("text/html", msg.html)):
        if ct not in body:
            return f"no {ct} body part"
        text_ = body[ct].get_content().replace("\r\n", "\n")
        why = links_ok(text_, direct.replace("\r\n", "\n"))
        if why:
            return f"{ct}: {why}"
    for name, ctype, data in msg.attachments:
        act = action(extension(name), managed)
        if act == "keep":
            if not any(_payload(p, memo) == data for p in rest):
                return f"attachment {name} (kept) missing or changed"
        elif act == "encrypt":
            env = [p for p in rest if p.get_content_type() == ENVELOPE_CONTENT_TYPE
                   and p.get_filename() == envelope_name(name)]
            if len(env) != 1:
                return f"attachment {name}: no envelope {envelope_name(name)!r} in its place"
            why = envelope_ok(_payload(env[0], memo), data, opener)
            if why:
                return f"attachment {name}: {why}"
        else:
            if any(p.get_content_type() == ctype or _payload(p, memo).startswith(PNG_MAGIC)
                   for p in rest):
                return f"attachment {name} (blocked) still in the message"
            if not any(p.get_content_type() == "text/plain" and name in p.get_content() for p in rest):
                return f"attachment {name} (blocked): no block note in its place"
    return None


def _payload(part, memo: dict[int, bytes]) -> bytes:
    """``part.get_payload(decode=True) or b""``, decoded once per part; base64 in
    slices (``checks.b64decode``: this runs in the oracle's thread, and the email
    package decodes a 13 MB part in one call that holds the GIL ~60-90 ms)."""
    got = memo.get(id(part))
    if got is None:
        got = None
        if part.get("content-transfer-encoding", "").strip().lower() == "base64":
            raw = part.get_payload()
            if isinstance(raw, str):
                try:
                    got = checks.b64decode(raw)
                except (ValueError, binascii.Error):
                    got = None      # not plain base64: the email package's lenient decode
        if got is None:
            got = part.get_payload(decode=True) or b""
        memo[id(part)] = got
    return got


def envelope_ok(blob: bytes, original: bytes, opener) -> str | None:
    """An envelope that opens (``opener(blob) -> bytes``) to the original, byte for byte
    (one memcmp: it had hashed both with SHA-256, ~8 ms a 10 MB attachment on the load core)."""
    if not blob.startswith(ENVELOPE_MAGIC):
        return "not sealed (no envelope)"
    if original[:4096] in blob:
        return "envelope carries the plain bytes"
    try:
        opened = opener(blob)
    except SegFastError as exc:
        return f"envelope does not open: {exc}"
    if opened != original:
        return "envelope opens to other bytes"
    return None


def fetched_ok(got: bytes, name: str, original: bytes, managed: bool, opener, exempt: bool = False
               ) -> str | None:
    """An ItemOperations Fetch of an attachment through the gateway. An S/MIME
    message's attachment (``exempt``) comes as it is, or (a worker that no longer
    remembers which message it belongs to judges it by its bytes) as policy says."""
    if exempt and got == original:
        return None
    act = action(extension(name), managed)
    if act == "keep":
        return None if got == original else f"{name}: {len(got)} bytes, not the original's {len(original)}"
    if act == "encrypt":
        return envelope_ok(got, original, opener)
    if got.startswith(PNG_MAGIC) or original[:4096] in got:
        return f"{name} (blocked) fetched in the clear"
    return None


class Opener:
    """Opens envelopes with the keys the gateway seals with (its master key file and
    key state), loaded on first use: the gateway makes the key when it starts."""

    def __init__(self, key_file: str, state_file: str) -> None:
        self.key_file, self.state_file = key_file, state_file
        self._ring = None

    def __call__(self, device_id: str, user: str, blob: bytes) -> bytes:
        if self._ring is None:
            from seg_fast.content.keys import Keyring, load_master_key

            self._ring = Keyring(load_master_key(self.key_file), self.state_file or None)
        return open_envelope(self._ring, device_id, user, blob)[2]
