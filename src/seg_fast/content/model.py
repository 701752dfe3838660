"""Email security policy documents (guide chapter 5): hyperlinks, attachments,
classification and the S/MIME exemption.

One ``EmailSecurityPolicy`` sits in the policy snapshot as it is; the content
pipeline compiles it once per snapshot and device (``pipeline.transforms_for``).
"""
from __future__ import annotations

from typing import Literal

import msgspec

from seg_fast.errors import PolicyError

LinkMode = Literal["all", "include", "exclude"]
AttachmentAction = Literal["encrypt", "block", "allow"]
ClassificationAction = Literal["allow", "block"]

DEFAULT_BLOCK_MESSAGE = "This attachment was removed by your organisation's email security policy."
DEFAULT_CLASSIFICATION_TEMPLATE = (
    "This message is classified {tag} and can only be read in an approved mail app.")


def _is_scheme(s: str) -> bool:
    return (0 < len(s) <= 32 and s[0].isascii() and s[0].isalpha()
            and all(c.isascii() and (c.isalnum() or c in "+-.") for c in s))


class _Doc(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    pass


class HyperlinkPolicy(_Doc):
    """Rewrite http(s) links so they open in the secure browser."""

    enabled: bool = False
    mode: LinkMode = "all"
    # Include: only these domains (and their subdomains); Exclude: all but these.
    domains: list[str] = []
    # Source scheme -> secure-browser scheme.
    scheme_map: dict[str, str] = msgspec.field(
        default_factory=lambda: {"http": "awb", "https": "awbs"})

    def __post_init__(self) -> None:
        for src, dst in self.scheme_map.items():
            if not _is_scheme(src) or not _is_scheme(dst):
                raise PolicyError(f"hyperlinks.scheme_map: {src!r} -> {dst!r} is not a URL scheme")
            # A target that is itself a source would make rewriting non-idempotent.
            if dst.lower() in {s.lower() for s in self.scheme_map}:
                raise PolicyError(f"hyperlinks.scheme_map: target {dst!r} is also a source")
        if len(self.scheme_map) > 8:
            raise PolicyError("hyperlinks.scheme_map: at most 8 schemes")
        for d in self.domains:
            if not d or any(c in d for c in " /:@\t\r\n"):
                raise PolicyError(f"hyperlinks.domains: {d!r} is not a domain name")
            try:
                d.strip().lower().lstrip("*").strip(".").encode("idna")
            except UnicodeError:
                raise PolicyError(f"hyperlinks.domains: {d!r} is not a domain name") from None


class AttachmentPolicy(_Doc):
    """What happens to attachments, per file type (extension and magic bytes)."""

    # File type ("pdf", "docx", "png", "zip", ...) -> action; ``default`` for the rest.
    file_types: dict[str, AttachmentAction] = {}
    default: AttachmentAction = "allow"
    # Text put in place of a blocked attachment; empty: the gateway's default message.
    block_message: str = ""

    def action_for(self, file_type: str) -> AttachmentAction:
        return self.file_types.get(file_type, self.default)


class ClassificationTag(_Doc):
    tag: str
    # User-Agent patterns (fnmatch, case-insensitive) of the mail apps that may read it.
    allowed_clients: list[str] = []
    # What the other mail apps get.
    others: ClassificationAction = "block"
    # Body the others get when blocked; "{tag}" is replaced by the tag.
    template: str = DEFAULT_CLASSIFICATION_TEMPLATE


class ClassificationPolicy(_Doc):
    enabled: bool = False
    # MIME header holding the tag (also matched in the message class "IPM.Note.<tag>").
    header: str = "X-Classification"
    tags: list[ClassificationTag] = []
    # Messages with no tag, or a tag not listed.
    untagged: ClassificationAction = "allow"
    untagged_template: str = "This message can only be read in an approved mail app."

    def __post_init__(self) -> None:
        if not self.header or any(c in self.header for c in ": \t\r\n"):
            raise PolicyError(f"classification.header: {self.header!r} is not a header name")


class EmailSecurityPolicy(_Doc):
    """Hyperlink, attachment and classification policies, one document in the snapshot."""

    hyperlinks: HyperlinkPolicy = HyperlinkPolicy()
    # Managed devices (enrolled): encrypt per file type is the usual choice.
    managed_attachments: AttachmentPolicy = AttachmentPolicy()
    # Unmanaged devices: allow encrypted, block, or allow unencrypted.
    unmanaged_attachments: AttachmentPolicy = AttachmentPolicy()
    classification: ClassificationPolicy = ClassificationPolicy()
    # Guide: "Skip Attachment & Hyperlink transformations for S/MIME signed emails".
    skip_smime: bool = True
    # With no policy at all (source unreachable, empty snapshot) the gateway's
    # ContentSettings.block_attachments_without_policy decides (pipeline.no_policy_transforms).

    def attachments_for(self, managed: bool) -> AttachmentPolicy:
        return self.managed_attachments if managed else self.unmanaged_attachments
