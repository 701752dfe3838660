"""The [security] section of the gateway config: content pipeline and attachment keys."""
from __future__ import annotations

import msgspec

from seg_fast.content.model import DEFAULT_BLOCK_MESSAGE


class ContentSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    # Largest answer the pipeline buffers to transform; past it the device gets an error.
    max_transform_bytes: int = 64 * 1024 * 1024
    # 32 random bytes (raw, or 64 hex characters); kept outside the policy store.
    # Created with mode 0600 on first use when missing.
    master_key_file: str = "seg-fast-master.key"
    # Per-device key generations written by `seg-fast keys rotate` (JSON).
    key_state_file: str = "seg-fast-keys.json"
    # Guide "Block Attachments": with no policy (source unreachable, empty snapshot).
    block_attachments_without_policy: bool = True
    # Guide "Default Message for Blocked Attachments".
    default_block_message: str = DEFAULT_BLOCK_MESSAGE
    # FileReference -> (name, content type) entries remembered per worker.
    file_reference_cache: int = 20_000
    # Most strings and elements the pipeline reads out of one WBXML answer (a Sync of
    # 512 items needs some 10,000). Past it the answer is not transformed: with an
    # attachment or classification policy the device gets the command's "server error"
    # status (nothing passes unchecked); with links alone it passes as it came.
    max_spans: int = 100_000
    # HTML attributes whose links open in the secure browser; links in the text always
    # do. "href" alone keeps <img src> and CSS url() images loading; add "src",
    # "background", "style" (CSS url()) ... to send those through the secure browser too.
    link_attributes: tuple[str, ...] = ("href",)
    # Seal a fetched attachment (ItemOperations inline Data, GetAttachment) of 256 KB or
    # more while its answer streams to the device, not after reading it whole
    # (proxy/sealstream.py): the same envelope, the device's wait no longer read + seal + write.
    stream_seal: bool = True

    def __post_init__(self) -> None:
        if len(self.link_attributes) > 16 or not all(
                0 < len(a) <= 32 and a.isascii() and all(c.isalnum() or c in "-_:" for c in a)
                for a in self.link_attributes):
            raise ValueError("link_attributes: at most 16 HTML attribute names (letters, digits, - _ :)")
