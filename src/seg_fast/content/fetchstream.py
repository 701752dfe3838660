"""An ItemOperations Fetch answer sealed while it streams (proxy/sealstream.py does the I/O).

The whole path (pipeline.py ``_fetched``) reads the answer whole, decodes its one inline
``ItemOperations:Data`` string, seals the file (attachments.py envelope) and splices the
new base64 in. For the common answer (one Fetch of one attachment: Status, FileReference,
Properties with ContentType and Data, nothing else) the same bytes can be made a piece at a
time: ``layout`` finds where the Data string starts in the answer's first bytes, the
pipeline decides from the first decoded bytes as the whole path would
(``EmailSecurityTransform.stream_fetch``), and a ``FetchSeal`` then turns each arriving
piece of base64 into its piece of the sealed envelope's base64 in one compiled pass
(``_gcm.TextSeal``: strict base64 decode carrying up to 3 characters, AES-GCM, base64
encode carrying up to 2 bytes; ``_Decoder`` takes line breaks out first). Anything else is
the whole path's (``layout`` returns None).
"""
from __future__ import annotations

import binascii

import pybase64

from seg_fast.content._gcm import TextSeal
from seg_fast.content._mime import strip_breaks

# The Data string must start within this many bytes of the answer, or the whole path reads it.
PREFIX_LIMIT = 64 * 1024
# Base64 characters of 4,096 bytes: what the decision reads (magic bytes, a message's header block).
HEAD_CHARS = 4096 // 3 * 4 + 4
NEED_MORE = "need more"
PASS = "pass"                 # EmailSecurityTransform.stream_fetch: the answer passes as it is

_ITEMOPS, _AIRSYNCBASE = 20, 17
# The only elements such an answer may hold before its Data: (page, token) -> name.
_ALLOWED = {
    (_ITEMOPS, 0x05): "ItemOperations", (_ITEMOPS, 0x0D): "Status", (_ITEMOPS, 0x0E): "Response",
    (_ITEMOPS, 0x06): "Fetch", (_ITEMOPS, 0x0B): "Properties", (_ITEMOPS, 0x0C): "Data",
    (_AIRSYNCBASE, 0x11): "FileReference", (_AIRSYNCBASE, 0x17): "ContentType",
}
_DATA_PATH = ("ItemOperations", "Response", "Fetch", "Properties", "Data")
_STR_I, _END, _SWITCH, _OPAQUE = 0x03, 0x01, 0x00, 0xC3


class Layout:
    """Where the Data string lies in an answer of ``length`` bytes: its base64 text is
    ``body[start:start + data_len]``, then ``tail`` (its NUL and the ENDs that close the
    document), which the answer must end with exactly."""

    __slots__ = ("start", "data_len", "tail")

    def __init__(self, start: int, depth: int, length: int):
        self.start = start
        self.tail = b"\x00" + b"\x01" * depth
        self.data_len = length - start - len(self.tail)


def _mb_u_int32(b: bytes, i: int) -> tuple[int, int]:
    """(value, next offset); (-1, i) when the bytes end first; ValueError when too long."""
    value = 0
    for k in range(5):
        if i + k >= len(b):
            return -1, i
        c = b[i + k]
        value = (value << 7) | (c & 0x7F)
        if not c & 0x80:
            return value, i + k + 1
    raise ValueError("mb_u_int32 too long")


def layout(prefix: bytes, length: int):
    """The answer's Layout from its first bytes, NEED_MORE, or None when the answer is not
    one Fetch of one inline Data string (the whole path's then)."""
    try:
        return _layout(prefix, length)
    except ValueError:
        return None


def _layout(b: bytes, length: int):
    n = min(len(b), PREFIX_LIMIT)
    more = NEED_MORE if len(b) < min(length, PREFIX_LIMIT) else None
    if n < 1:
        return more
    if b[0] != 0x03:
        return None
    i = 1
    for k in range(3):                # public id, charset, string table length
        v, i = _mb_u_int32(b, i)
        if v < 0:
            return more
        if k == 1 and v != 0x6A:
            return None               # not UTF-8
        if k == 2 and v != 0:
            return None               # a string table: not this path's
    page = 0
    stack: list[str] = []
    fetches = 0
    while i < n:
        tok = b[i]
        if tok == _SWITCH:
            if i + 1 >= n:
                return more
            page = b[i + 1]
            i += 2
        elif tok == _END:
            if not stack:
                return None
            stack.pop()
            if not stack:
                return None           # the document ended before any Data
            i += 1
        elif tok == _STR_I:
            if not stack or stack[-1] not in ("Status", "FileReference", "ContentType"):
                return None
            end = b.find(b"\x00", i + 1, n)
            if end < 0:
                return more
            i = end + 1
        elif tok == _OPAQUE:
            if not stack or stack[-1] not in ("Status", "FileReference", "ContentType"):
                return None
            size, j = _mb_u_int32(b, i + 1)
            if size < 0 or j + size > n:
                return more
            i = j + size
        elif tok & 0x80 or (tok & 0x3F) < 0x05:
            return None               # attributes, or a global token this path does not take
        else:
            name = _ALLOWED.get((page, tok & 0x3F))
            if name is None:
                return None
            if not tok & 0x40:
                if name == "Data":
                    return None       # an empty <Data/>: the whole path's
                i += 1
                continue
            stack.append(name)
            i += 1
            if name == "Fetch":
                fetches += 1
                if fetches > 1:
                    return None
            if name == "Data":
                if tuple(stack) != _DATA_PATH:
                    return None
                if i >= n:
                    return more
                if b[i] != _STR_I:
                    return None       # opaque Data: the whole path's
                out = Layout(i + 1, len(stack), length)
                return out if out.data_len >= 0 else None
    return more


class _Decoder:
    """Base64 text a piece at a time, exactly as the whole path's strict decode
    (b64decode_lines: pybase64's validate=True after line breaks, LF or CRLF, are taken
    out): ValueError where that would fail. It decodes the text the verdict reads; from then
    on FetchSeal's TextSeal carries the quads and this only takes line breaks out (``unbreak``)."""

    __slots__ = ("carry", "cr", "padded")

    def __init__(self):
        self.carry = b""              # up to 3 characters of an incomplete quad
        self.cr = False               # the last piece ended with CR (a CRLF across pieces)
        self.padded = False           # a quad with "=" was decoded: nothing may follow

    def unbreak(self, text) -> bytes:
        """``text`` without its line breaks (a CR it ends with held for the next piece)."""
        text = bytes(text)
        if self.cr:
            text = b"\r" + text
            self.cr = False
        if text.endswith(b"\r"):
            text = text[:-1]
            self.cr = True
        if b"\n" in text or b"\r" in text:
            text = strip_breaks(text)
        return text

    def feed(self, text) -> bytes:
        text = self.unbreak(text)
        if self.carry:
            text = self.carry + text
        whole = len(text) // 4 * 4
        self.carry = text[whole:]
        if not whole:
            return b""
        if self.padded:
            raise ValueError("base64 text after its padding")
        try:
            out = pybase64.b64decode(text[:whole] if whole != len(text) else text, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("not strict base64 text") from None
        self.padded = text[whole - 1] == 0x3D
        return out


class FetchSeal:
    """The sealed answer's bytes as the answer's arrive. ``first`` (the new WBXML up to the
    Data string, the envelope header's base64 and that of the pieces decoded so far) goes
    out first; ``step(text)`` per piece of the Data string's base64; ``end(tail)`` with the
    answer's last bytes (the Data string's NUL and the ENDs), which must be Layout.tail."""

    __slots__ = ("first", "user", "ref", "_dec", "_seal", "_tail_in", "_tail_out")

    def __init__(self, wbxml_head: bytes, wbxml_tail: bytes, tail_in: bytes, envelope_head: bytes, key: bytes,
                 decoder: _Decoder, plain: bytes, user: str = "", ref: str = ""):
        self.user, self.ref = user, ref   # whose FileReference was fetched
        self._dec = decoder               # its line-break rules; TextSeal carries the quads from here
        self._seal = TextSeal(key, envelope_head[14:26], envelope_head, decoder.carry, decoder.padded)
        self._tail_in, self._tail_out = tail_in, wbxml_tail
        self.first = wbxml_head + self._seal.encode(envelope_head) + self._seal.seal(plain)

    def step(self, text) -> bytes:
        return self._seal.text(self._dec.unbreak(text))

    def end(self, tail) -> bytes:
        if bytes(tail) != self._tail_in:
            raise ValueError("the answer does not end right after its Data string")
        if self._dec.cr:
            raise ValueError("base64 text ends with CR")
        return self._seal.finish() + self._tail_out
