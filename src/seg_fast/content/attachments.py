"""Attachments: file type by extension and magic bytes, the encryption envelope,
and the note that replaces a blocked attachment.

The envelope format is documented in docs/envelope.md.
"""
from __future__ import annotations

import mimetypes
import os
import struct
import threading

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from seg_fast.content._gcm import HAVE_LIBCRYPTO, gcm_seal_into
from seg_fast.content._mime import b64decode_lines_into, b64encode_lines, decoded_room, writable_bytes
from seg_fast.content.keys import Keyring
from seg_fast.errors import EnvelopeError

ENVELOPE_MAGIC = b"SGFE"
ENVELOPE_VERSION = 1
ENVELOPE_SUFFIX = ".segenc"
ENVELOPE_CONTENT_TYPE = "application/vnd.seg-fast.envelope"
_FIXED = struct.Struct(">4sBB8s12s")  # magic, version, flags, key id, nonce
TAG_BYTES = 16
# Bytes an envelope adds besides the name and content type.
ENVELOPE_OVERHEAD = _FIXED.size + 4 + TAG_BYTES

# Magic bytes -> file type; ZIP and OLE2 are containers refined by extension.
_MAGIC: list[tuple[bytes, str]] = [
    (b"%PDF-", "pdf"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpg"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"PK\x03\x04", "zip"),
    (b"PK\x05\x06", "zip"),
    (b"PK\x07\x08", "zip"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "ole"),
    (b"{\\rtf", "rtf"),
    (b"\x1f\x8b", "gz"),
    (b"7z\xbc\xaf\x27\x1c", "7z"),
    (b"Rar!\x1a\x07", "rar"),
    (b"MZ", "exe"),
    (b"II*\x00", "tif"),
    (b"MM\x00*", "tif"),
    (ENVELOPE_MAGIC, "segenc"),
]
_ZIP_BASED = {"docx", "xlsx", "pptx", "docm", "xlsm", "pptm", "odt", "ods", "odp", "jar", "apk", "epub"}
_OLE_BASED = {"doc", "xls", "ppt", "msg", "vsd"}
_ALIASES = {"jpeg": "jpg", "tiff": "tif", "htm": "html"}


def extension(name: str) -> str:
    base = name.rsplit("/", 1)[-1].rsplit("\\", 1)[-1]
    if "." not in base:
        return ""
    ext = base.rsplit(".", 1)[1].strip().lower()
    return _ALIASES.get(ext, ext)


def file_type(name: str, head: bytes) -> str:
    """The file's type: the magic bytes when they are known (a ``.pdf`` that is a ZIP
    is a ZIP; a ``.docx`` ZIP is a docx), else the extension."""
    ext = extension(name)
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            if kind == "zip" and ext in _ZIP_BASED:
                return ext
            if kind == "ole":
                return ext if ext in _OLE_BASED else "doc"
            return kind
    return ext


# How strict an action is: a name never weakens what the bytes call for, nor the reverse.
_STRICTNESS = {"allow": 0, "encrypt": 1, "block": 2}


def stricter(a: str, b: str) -> str:
    return a if _STRICTNESS[a] >= _STRICTNESS[b] else b


def sealed_content_type(name: str, kind: str) -> str:
    """The content type an envelope records: from the file type that decided (the bytes'
    when known), else the name; the same for a file however it is fetched (Type 4 body,
    ItemOperations, GetAttachment), so its envelope size can be told in advance."""
    for candidate in (f"file.{kind}" if kind else "", name):
        guess = mimetypes.guess_type(candidate, strict=False)[0] if candidate else None
        if guess:
            return guess
    return "application/octet-stream"


def envelope_size(name: str, content_type: str, size: int) -> int:
    """Bytes of the envelope sealing ``size`` bytes under this name and content type."""
    return (ENVELOPE_OVERHEAD + min(len(name.encode("utf-8")), 0xFFFF)
            + min(len(content_type.encode("utf-8")), 0xFFFF) + size)


def known_type(kind: str) -> bool:
    """Whether a file type (an extension) names a kind of file: one with magic bytes, or
    one the system's MIME table knows. An unknown one says nothing about the bytes."""
    if not kind:
        return False
    if kind in _KNOWN or kind in _ZIP_BASED or kind in _OLE_BASED:
        return True
    return mimetypes.guess_type("file." + kind, strict=False)[0] is not None


_KNOWN = {kind for _magic, kind in _MAGIC}


def envelope_name(name: str) -> str:
    """The name the secure viewer claims."""
    return (name or "attachment") + ENVELOPE_SUFFIX


def _head(keys: Keyring, device_id: str, user: str, name: str, content_type: str) -> tuple[bytes, bytes]:
    """(envelope header, key)."""
    key_id, key = keys.current(device_id, user)
    nb = name.encode("utf-8")[:0xFFFF]
    ct = content_type.encode("utf-8")[:0xFFFF]
    return (_FIXED.pack(ENVELOPE_MAGIC, ENVELOPE_VERSION, 0, key_id, os.urandom(12))
            + struct.pack(">H", len(nb)) + nb + struct.pack(">H", len(ct)) + ct), key


def _seal_into(head: bytes, key: bytes, view: memoryview, out: memoryview) -> None:
    """The envelope of ``view`` written into ``out`` (exactly its size), the ciphertext
    where it ends up. The header is authenticated too: a renamed envelope does not open.
    AES-GCM by OpenSSL without the GIL (_gcm: a transform in a worker thread leaves the
    event loop free meanwhile), else by cryptography a megabyte per call (it holds the
    GIL while it runs)."""
    out[:len(head)] = head
    if HAVE_LIBCRYPTO:
        gcm_seal_into(key, head[14:26], head, view, out[len(head):])
        return
    enc = Cipher(algorithms.AES(key), modes.GCM(head[14:26])).encryptor()
    enc.authenticate_additional_data(head)
    pos = len(head)
    for at in range(0, len(view), _SEAL_CHUNK):
        # GCM is a stream mode: each call writes as many bytes as it reads; the room
        # update_into asks for (a block more) is there (the tag's place at least).
        pos += enc.update_into(view[at:at + _SEAL_CHUNK], out[pos:])
    enc.finalize()
    out[pos:] = enc.tag


def seal(keys: Keyring, device_id: str, user: str, name: str, content_type: str, data) -> bytes:
    """The envelope holding ``data`` for this device and user."""
    head, key = _head(keys, device_id, user, name, content_type)
    if len(data) < _SEAL_CHUNK:
        return head + AESGCM(key).encrypt(head[14:26], bytes(data), head)
    view = memoryview(data)
    sealed, out = writable_bytes(len(head) + len(view) + TAG_BYTES)
    with out:
        _seal_into(head, key, view, out)
    return sealed


def sealed_base64(keys: Keyring, device_id: str, user: str, name: str, content_type: str, data,
                  width: int = 0, eol: bytes = b"\r\n") -> bytes:
    """The base64 text of ``seal(...)`` in lines of ``width`` (0: one line), as a MIME
    body or an ItemOperations Data string carries it. The envelope itself is built in
    this thread's scratch buffer: only the text is new memory (a fresh 10 MB buffer
    costs ~2,500 page faults the first time it is written)."""
    view = memoryview(data)
    head, key = _head(keys, device_id, user, name, content_type)
    size = len(head) + len(view) + TAG_BYTES
    with _Scratch(_ENVELOPE, size) as out:
        _seal_into(head, key, view, out)
        return b64encode_lines(out, width, eol)


# Attachments this large are sealed a piece at a time (seal).
_SEAL_CHUNK = 1 << 20
# Per thread: buffers reused by every transform it runs (an attachment's plain bytes, its
# envelope), up to this size; anything larger gets a buffer of its own.
_KEEP_SCRATCH = 16 << 20
_PLAIN, _ENVELOPE = 0, 1
_local = threading.local()


class _Scratch:
    """``with _Scratch(which, size) as view``: a writable memoryview of ``size`` bytes of
    this thread's buffer ``which`` (_PLAIN, _ENVELOPE), valid inside the block only. While
    one is in use (a message attached to a fetched message sealing its own attachments),
    the inner block gets a buffer of its own: nothing overwrites what a caller still reads."""

    __slots__ = ("which", "size", "view", "kept")

    def __init__(self, which: int, size: int):
        self.which = which
        self.size = size

    def __enter__(self) -> memoryview:
        bufs = getattr(_local, "bufs", None)
        if bufs is None:
            bufs = _local.bufs = [memoryview(b""), memoryview(b"")]
            _local.busy = [False, False]
        self.kept = not _local.busy[self.which] and self.size <= _KEEP_SCRATCH
        buf = bufs[self.which] if self.kept else None
        if buf is None or len(buf) < self.size:
            # A new one, not resized (a view someone still holds stays valid), and not
            # zeroed (a bytearray would be, with the GIL held: megabytes): every byte
            # read from it is written first.
            buf = writable_bytes(self.size)[1]
            if self.kept:
                bufs[self.which] = buf
        if self.kept:
            _local.busy[self.which] = True
        self.view = buf[:self.size]
        return self.view

    def __exit__(self, *exc) -> None:
        self.view.release()
        if self.kept:
            _local.busy[self.which] = False


def decoded_scratch(text) -> "_Decoded":
    """The bytes base64 text decodes to (strictly, line breaks allowed: b64decode_lines),
    decoded now into this thread's _PLAIN buffer (ValueError when it is not strict
    base64); ``with decoded_scratch(text) as plain``: a view of them, valid inside the
    block only (sealed_base64 reads them from there)."""
    return _Decoded(text)


class _Decoded:
    __slots__ = ("room", "view")

    def __init__(self, text):
        self.room = _Scratch(_PLAIN, decoded_room(len(text)))
        buf = self.room.__enter__()
        try:
            n = b64decode_lines_into(text, buf)
        except BaseException:
            self.room.__exit__()
            raise
        self.view = buf[:n]

    def __enter__(self) -> memoryview:
        return self.view

    def __exit__(self, *exc) -> None:
        self.view.release()
        self.room.__exit__()


def parse_header(blob: bytes) -> tuple[int, bytes, bytes, str, str, int]:
    """(version, key id, nonce, name, content type, offset of the ciphertext)."""
    if len(blob) < _FIXED.size + 4 + TAG_BYTES:
        raise EnvelopeError("not an attachment envelope (too short)")
    magic, version, _flags, key_id, nonce = _FIXED.unpack_from(blob)
    if magic != ENVELOPE_MAGIC:
        raise EnvelopeError("not an attachment envelope (bad magic)")
    if version != ENVELOPE_VERSION:
        raise EnvelopeError(f"unsupported envelope version {version}")
    pos = _FIXED.size
    fields = []
    for _ in range(2):
        if pos + 2 > len(blob):
            raise EnvelopeError("damaged envelope header")
        (n,) = struct.unpack_from(">H", blob, pos)
        if pos + 2 + n > len(blob) - TAG_BYTES:
            raise EnvelopeError("damaged envelope header")
        try:
            fields.append(blob[pos + 2:pos + 2 + n].decode("utf-8"))
        except UnicodeDecodeError:
            raise EnvelopeError("damaged envelope header") from None
        pos += 2 + n
    return version, key_id, nonce, fields[0], fields[1], pos


def open_envelope(keys: Keyring, device_id: str, user: str, blob: bytes) -> tuple[str, str, bytes]:
    """(original name, content type, data); EnvelopeError when it is not this
    device and user's, or damaged."""
    _v, key_id, nonce, name, ctype, pos = parse_header(blob)
    key = keys.key_for_id(key_id, device_id, user)
    if key is None:
        raise EnvelopeError("envelope was sealed with another master key")
    try:
        data = AESGCM(key).decrypt(nonce, blob[pos:], blob[:pos])
    except InvalidTag:
        raise EnvelopeError("envelope does not open: wrong device or user, or damaged") from None
    return name, ctype, data


def block_note(name: str, message: str) -> str:
    """The text that takes a blocked attachment's place."""
    return f"Attachment removed: {name or 'attachment'}\r\n{message}\r\n"
