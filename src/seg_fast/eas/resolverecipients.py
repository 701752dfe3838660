"""ResolveRecipients: certificates from the directory where the mail server had none.

A device that encrypts a message asks ResolveRecipients with
``Options/CertificateRetrieval`` 2 (full certificates). For each resolved
recipient the mail server answers without certificates (no ``Certificates``, or
``Certificates/Status`` 7: none valid), the gateway asks LDAP (ldapcerts.py) and
puts what it found into the answer, re-encoded (MS-ASCMD 2.2.3.23.1):
``Certificates`` = ``Status`` 1, ``CertificateCount``, ``RecipientCount`` 1, one
``Certificate`` (base64 DER) each; or ``Status`` 8 with the count that was not
returned when the request's ``MaxCertificates`` would be passed. Recipients the
mail server had certificates for are left as they are; mini certificates
(CertificateRetrieval 3) are Microsoft's own format and are not synthesized.
One object per transaction: it reads the request, then rewrites the answer.
"""
from __future__ import annotations

import base64

from seg_fast.eas.wbxml import Element, WBXMLError, decode, encode
from seg_fast.ldapcerts import looks_like_address

NS = "ResolveRecipients:"
COMMANDS = frozenset({"ResolveRecipients"})
# A device's request holds its recipients (Exchange takes at most 100) and options:
# far fewer elements than this; a larger one is forwarded untouched.
MAX_REQUEST_ELEMENTS = 50_000
# The mail server's answer is read whole to be rewritten: some 21 elements and strings per
# recipient (10,000 recipients: 210,000). Past this it passes untouched (a tree costs about
# 100 bytes an element: bounded memory and loop time per request).
MAX_ANSWER_ELEMENTS = 400_000
# Children of Recipient in schema order: Certificates goes after the first three and Availability.
_BEFORE_CERTIFICATES = {NS + "Type", NS + "DisplayName", NS + "EmailAddress", NS + "Availability"}


def _text(el: Element | None, tag: str) -> str | None:
    if el is None:
        return None
    for c in el.children:
        if c.tag == tag:
            if c.text is not None:
                return c.text.strip()
            if c.opaque is not None:
                return bytes(c.opaque).decode("utf-8", "replace").strip()
            return ""
    return None


def _find(el: Element, tag: str) -> Element | None:
    for c in el.children:
        if c.tag == tag:
            return c
    return None


def _int(value: str | None, default: int) -> int:
    try:
        return int(value) if value is not None else default
    except ValueError:
        return default


class CertificateFill:
    """Request transform (reads the options) and async answer transform (adds certificates)."""

    commands = COMMANDS
    __slots__ = ("lookup", "incidents", "max_lookups", "retrieval", "max_certificates")

    def __init__(self, lookup, incidents=None):
        self.lookup = lookup
        self.incidents = incidents
        self.max_lookups = lookup.settings.max_lookups_per_request
        self.retrieval = 1
        self.max_certificates = None

    def transform_request(self, req, body: bytes) -> bytes:
        try:
            root = decode(body, max_elements=MAX_REQUEST_ELEMENTS)
        except WBXMLError:
            return body               # the mail server answers a broken request itself
        if root.tag != NS + "ResolveRecipients":
            return body
        options = _find(root, NS + "Options")
        if options is not None:
            self.retrieval = _int(_text(options, NS + "CertificateRetrieval"), 1)
            limit = _text(options, NS + "MaxCertificates")
            self.max_certificates = _int(limit, 9999) if limit is not None else None
        return body

    def transform_answer(self, req, status, headers, body: bytes) -> bytes:
        return body                   # the work is async (transform_answer_async)

    async def transform_answer_async(self, req, status, headers, body: bytes) -> bytes:
        if self.retrieval != 2 or not body.startswith(b"\x03\x01"):
            return body
        try:
            root = decode(body, max_elements=MAX_ANSWER_ELEMENTS)
        except WBXMLError as exc:
            if self.incidents is not None:
                self.incidents.note("smime_answer_not_read", error=str(exc)[:200])
            return body
        if root.tag != NS + "ResolveRecipients" or _text(root, NS + "Status") != "1":
            return body
        present = sum(1 for el in root.iter() if el.tag == NS + "Certificate")
        wanted: list[tuple[Element, str]] = []
        skipped = 0
        for resp in root.children:
            if resp.tag != NS + "Response" or _text(resp, NS + "Status") != "1":
                continue
            for rcpt in resp.children:
                if rcpt.tag != NS + "Recipient":
                    continue
                certs = _find(rcpt, NS + "Certificates")
                if certs is not None and _text(certs, NS + "Status") != "7":
                    continue          # the mail server answered for this one (certificates, or limit 8)
                email = _text(rcpt, NS + "EmailAddress") or ""
                if not looks_like_address(email):
                    continue
                if len(wanted) >= self.max_lookups:
                    skipped += 1
                    continue
                wanted.append((rcpt, email))
        if skipped and self.incidents is not None:
            self.incidents.note("smime_lookups_capped", recipients=skipped,
                                limit="smime.max_lookups_per_request")
        if not wanted:
            return body
        try:
            found = await self.lookup.lookup([email for _, email in wanted])
        except Exception as exc:      # noqa: BLE001 - a lookup bug must cost the fill, not the answer
            if self.incidents is not None:
                self.incidents.exception("smime_lookup_error", exc, "")
            return body
        if found is None:
            return body               # directory unavailable: the mail server's answer as it was
        changed = False
        for rcpt, email in wanted:
            certs = found.get(email.lower())
            if not certs:
                continue
            if self.max_certificates is not None and present + len(certs) > self.max_certificates:
                block = [Element(NS + "Status", text="8"), Element(NS + "CertificateCount", text=str(len(certs))),
                         Element(NS + "RecipientCount", text="1")]
            else:
                present += len(certs)
                block = [Element(NS + "Status", text="1"), Element(NS + "CertificateCount", text=str(len(certs))),
                         Element(NS + "RecipientCount", text="1")]
                block += [Element(NS + "Certificate", text=base64.b64encode(der).decode("ascii")) for der in certs]
            _put_certificates(rcpt, Element(NS + "Certificates", children=block))
            changed = True
        return encode(root) if changed else body


def _put_certificates(rcpt: Element, certs: Element) -> None:
    kids = rcpt.children
    for i, c in enumerate(kids):
        if c.tag == NS + "Certificates":
            kids[i] = certs
            return
    at = len(kids)
    for i, c in enumerate(kids):
        if c.tag not in _BEFORE_CERTIFICATES:
            at = i
            break
    kids.insert(at, certs)
