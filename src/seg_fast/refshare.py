"""What one worker learns of an attachment, passed to the serve's other workers.

The content pipeline remembers, per (user, FileReference), the attachment's name as a Sync
or Search answer listed it (marked when the message was S/MIME and so exempt) and the file
type its bytes showed (content/pipeline.py ``_Runtime.remember``/``remember_kind``). A
device's next request may land on another worker (SO_REUSEPORT): an ItemOperations Fetch
there did not know the name (it sealed a PDF as "attachment.pdf", the name sniffed from its
bytes) nor the exemption (it sealed an attachment of a signed message). So the pipeline
``publish``es each entry; the worker sends it to the control process over its channel
(proxy/channel.py), which passes it to every other worker, where ``received`` puts it in the
local cache (``share=False``: not sent on again). Best effort and bounded like the cache
itself (``security.file_reference_cache`` entries per worker, least recently used out): a
message a full socket does not take is dropped. The control process keeps a copy of the
latest entries (``Table``, twice ``file_reference_cache``: names and kinds) and sends it, in
batches, to a worker started later (one restarted after a crash). What travels: the user, the FileReference, the name (or the file
type); never mail content, and only between the processes of one serve.
"""
from __future__ import annotations

from collections import OrderedDict

import msgspec

from seg_fast.proxy import channel

MAGIC = b"SFRF1"                  # one entry, from the worker that learnt it
BATCH = b"SFRFB"                  # many, from the control process to a worker started later
NAME, KIND = 0, 1
MAX_FIELD = 1024                  # bytes of user, ref or value: longer entries stay local
BATCH_BYTES = 32 * 1024           # a batch message's size, about

_Entry = tuple[int, str, str, str]
_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(_Entry).decode
_decode_batch = msgspec.msgpack.Decoder(list[_Entry]).decode


def publish(what: int, key: tuple[str, str], value: str) -> None:
    """From the pipeline (any thread): (user lowered, FileReference) -> name (NAME) or file type (KIND)."""
    if channel._worker_sock is None:
        return                    # outside a serve: one check
    user, ref = key
    if len(user) > MAX_FIELD or len(ref) > MAX_FIELD or len(value) > MAX_FIELD:
        return
    channel.send(MAGIC + _encode((what, user, ref, value)))


def received(message: bytes) -> None:
    """Another worker's entry (channel.handlers): into this worker's cache, not published again."""
    try:
        entry = _decode(message[len(MAGIC):])
    except (msgspec.DecodeError, msgspec.ValidationError):
        return
    _learn((entry,))


def received_batch(message: bytes) -> None:
    """What the other workers had learnt before this one started (channel.handlers)."""
    try:
        entries = _decode_batch(message[len(BATCH):])
    except (msgspec.DecodeError, msgspec.ValidationError):
        return
    _learn(entries)


def _learn(entries) -> None:
    from seg_fast.content import pipeline

    runtime = pipeline._runtime   # looked up now: configure() replaces it
    if not _takes_share(runtime):
        return                    # a pipeline that would publish it again: never a loop
    for what, user, ref, value in entries:
        if what == NAME:
            runtime.remember(user, ref, value, share=False)
        elif what == KIND:
            runtime.remember_kind(user, ref, value, share=False)


class Table:
    """The control process's copy (channel.Hub's ``kept``): the latest value per (kind, user,
    FileReference), at most ``limit`` entries (least recently learnt out), replayed in batches
    to a worker started later (a restarted one)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.entries: OrderedDict[tuple[int, str, str], str] = OrderedDict()

    def note(self, message: bytes) -> None:
        if not message.startswith(MAGIC):
            return
        try:
            what, user, ref, value = _decode(message[len(MAGIC):])
        except (msgspec.DecodeError, msgspec.ValidationError):
            return
        key = (what, user, ref)
        self.entries[key] = value
        self.entries.move_to_end(key)
        while len(self.entries) > self.limit:
            self.entries.popitem(last=False)

    def replay(self) -> list[bytes]:
        batches, batch, size = [], [], 0
        for (what, user, ref), value in self.entries.items():
            batch.append((what, user, ref, value))
            size += len(user) + len(ref) + len(value) + 8
            if size >= BATCH_BYTES:
                batches.append(BATCH + _encode(batch))
                batch, size = [], 0
        if batch:
            batches.append(BATCH + _encode(batch))
        return batches


def _takes_share(runtime) -> bool:
    kind = type(runtime)
    known = _shares.get(kind)
    if known is None:
        import inspect

        known = all("share" in inspect.signature(getattr(kind, name)).parameters
                    for name in ("remember", "remember_kind"))
        _shares[kind] = known
    return known


_shares: dict[type, bool] = {}
