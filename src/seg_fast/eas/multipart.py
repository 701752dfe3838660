"""ItemOperations multipart bodies (``application/vnd.ms-sync.multipart``, MS-ASCMD).

Layout, all integers 32-bit signed little-endian:
``count | (offset, length) * count | parts...``; offsets count from the start of
the body. Part 0 is the WBXML answer; its ``ItemOperations:Part`` elements name
the later parts (raw attachment or item bytes) by index.
"""
from __future__ import annotations

import struct
from collections.abc import Iterable

from seg_fast.errors import MultipartError

CONTENT_TYPE = "application/vnd.ms-sync.multipart"
_INT32_MAX = 0x7FFFFFFF
# a count this large cannot describe a real answer and would make us allocate
MAX_PARTS = 100_000


def parse_multipart(body) -> list[memoryview]:
    """The parts of a multipart body, as zero-copy views into ``body``.

    Raises MultipartError for a body too short for its header, a part count below
    1 or above MAX_PARTS, negative values, or a part that starts inside the header
    or runs past the end of the body.
    """
    view = memoryview(body).cast("B")
    size = len(view)
    if size < 4:
        raise MultipartError(f"body of {size} bytes has no part count", 0)
    (count,) = struct.unpack_from("<i", view, 0)
    if count < 1 or count > MAX_PARTS:
        raise MultipartError(f"part count {count} out of range 1..{MAX_PARTS}", 0)
    header_end = 4 + 8 * count
    if header_end > size:
        raise MultipartError(f"{count} parts need a {header_end}-byte header; "
                             f"the body has {size} bytes", size)
    parts = []
    for i in range(count):
        at = 4 + 8 * i
        offset, length = struct.unpack_from("<ii", view, at)
        if offset < 0 or length < 0:
            raise MultipartError(f"part {i}: negative offset or length", at)
        if offset < header_end:
            raise MultipartError(f"part {i} starts at {offset}, inside the "
                                 f"{header_end}-byte header", at)
        if offset + length > size:
            raise MultipartError(f"part {i} ({offset}+{length}) runs past the end "
                                 f"of the {size}-byte body", at)
        parts.append(view[offset:offset + length])
    return parts


def build_multipart(parts: Iterable) -> bytes:
    """A multipart body holding ``parts`` (bytes-like) in order, packed back to back."""
    blobs = [memoryview(p).cast("B") for p in parts]
    if not blobs:
        raise MultipartError("a multipart body needs at least one part")
    if len(blobs) > MAX_PARTS:
        raise MultipartError(f"more than {MAX_PARTS} parts")
    offset = 4 + 8 * len(blobs)
    header = [struct.pack("<i", len(blobs))]
    for blob in blobs:
        if offset + len(blob) > _INT32_MAX:
            raise MultipartError("multipart body larger than 2 GiB")
        header.append(struct.pack("<ii", offset, len(blob)))
        offset += len(blob)
    return b"".join(header + blobs)
