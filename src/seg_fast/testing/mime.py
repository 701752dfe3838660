"""Hypothesis strategies for RFC 5322 / MIME messages in the shapes real mail has.

``mime_messages()`` draws small messages: plain text, multipart/alternative,
multipart/mixed with real-format attachments (PDF, DOCX, PNG, ZIP: the makers of
the simulator's corpus), inline images in multipart/related, an attached
message/rfc822, and S/MIME (multipart/signed with a real detached signature, or
application/pkcs7-mime signed-data ``smime.p7m``), signed with the corpus's fixed
test key (sim/smime.py). ``corpus_messages()`` draws whole messages of the
corpus itself (10-60 KB HTML, attachments up to ``max_attachment`` bytes).
Every message parses with Python's ``email`` package.
"""
from __future__ import annotations

import random

from hypothesis import strategies as st

from seg_fast.sim.corpus import _MAKERS, ATTACHMENT_KINDS, Corpus, _b64_lines, _qp, signed_entity
from seg_fast.sim.smime import signer

_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x17F, blacklist_categories=("Cs",)),
                min_size=1, max_size=60)
_name = st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12)
SHAPES = ("plain", "alternative", "attachment", "inline", "attached-message", "signed", "p7m")


def _alternative(body: str, boundary: str) -> bytes:
    html = f"<html><body><p>{body}</p><a href=\"https://contoso.com/x\">link</a></body></html>"
    return (f'Content-Type: multipart/alternative; boundary="{boundary}"\r\n\r\n--{boundary}\r\n'
            'Content-Type: text/plain; charset="utf-8"\r\nContent-Transfer-Encoding: 8bit\r\n\r\n'
            f"{body}\r\n--{boundary}\r\n"
            'Content-Type: text/html; charset="utf-8"\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n'
            ).encode() + _qp(html) + f"\r\n--{boundary}--\r\n".encode()


@st.composite
def attachments(draw, max_size: int = 4096) -> tuple[str, str, bytes]:
    """(file name, content type, bytes) in a real file format."""
    ext = draw(st.sampled_from(sorted(ATTACHMENT_KINDS)))
    size = draw(st.integers(2048, max(2048, max_size)))
    blob = _MAKERS[ext](random.Random(draw(st.integers(0, 2**32))), size)
    return f"{draw(_name)}.{ext}", ATTACHMENT_KINDS[ext], blob


def _attachment_part(name: str, ctype: str, blob: bytes, disposition: str = "attachment",
                     cid: str | None = None) -> bytes:
    head = (f'Content-Type: {ctype}; name="{name}"\r\nContent-Transfer-Encoding: base64\r\n'
            f'Content-Disposition: {disposition}; filename="{name}"\r\n')
    if cid:
        head += f"Content-ID: <{cid}>\r\n"
    return head.encode() + b"\r\n" + _b64_lines(blob)


def _pkcs7_signed_data(entity: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.serialization import pkcs7
    key, cert = signer()
    return (pkcs7.PKCS7SignatureBuilder().set_data(entity).add_signer(cert, key, hashes.SHA256())
            .sign(serialization.Encoding.DER, [pkcs7.PKCS7Options.Binary, pkcs7.PKCS7Options.NoAttributes]))


@st.composite
def mime_messages(draw, sender: str = "fuzz@seg-fast.test", shapes=SHAPES, max_attachment: int = 4096) -> bytes:
    shape = draw(st.sampled_from(shapes))
    body = draw(_text)
    b = f"=_fuzz{draw(st.integers(0, 10**6))}"
    if shape == "plain":
        entity = f'Content-Type: text/plain; charset="utf-8"\r\nContent-Transfer-Encoding: 8bit\r\n\r\n{body}\r\n'.encode()
    elif shape == "alternative":
        entity = _alternative(body, b + "a")
    elif shape in ("attachment", "signed", "p7m"):
        parts = draw(st.lists(attachments(max_attachment), min_size=1 if shape == "attachment" else 0, max_size=2))
        entity = _alternative(body, b + "a")
        if parts:
            entity = (f'Content-Type: multipart/mixed; boundary="{b}m"\r\n\r\n--{b}m\r\n'.encode() + entity
                      + b"".join(f"\r\n--{b}m\r\n".encode() + _attachment_part(*p) for p in parts)
                      + f"--{b}m--\r\n".encode())
        if shape == "signed":
            entity = signed_entity(entity, f"{b}s")
        elif shape == "p7m":
            entity = ('Content-Type: application/pkcs7-mime; smime-type=signed-data; name="smime.p7m"\r\n'
                      "Content-Transfer-Encoding: base64\r\n"
                      'Content-Disposition: attachment; filename="smime.p7m"\r\n\r\n').encode() + _b64_lines(
                          _pkcs7_signed_data(entity))
    elif shape == "inline":
        name, ctype, blob = "image.png", "image/png", _MAKERS["png"](random.Random(draw(st.integers(0, 99))), 2048)
        html = f'<html><body><p>{body}</p><img src="cid:img1@fuzz"></body></html>'
        entity = (f'Content-Type: multipart/related; boundary="{b}r"; type="text/html"\r\n\r\n--{b}r\r\n'
                  'Content-Type: text/html; charset="utf-8"\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n'
                  ).encode() + _qp(html) + f"\r\n--{b}r\r\n".encode() + _attachment_part(
                      name, ctype, blob, "inline", "img1@fuzz") + f"--{b}r--\r\n".encode()
    else:   # attached-message
        inner = draw(mime_messages(sender, ("plain", "alternative", "attachment"), max_attachment))
        entity = (f'Content-Type: multipart/mixed; boundary="{b}m"\r\n\r\n--{b}m\r\n'
                  f'Content-Type: text/plain; charset="utf-8"\r\n\r\n{body}\r\n--{b}m\r\n'
                  'Content-Type: message/rfc822\r\nContent-Disposition: attachment; filename="fwd.eml"\r\n\r\n'
                  ).encode() + inner + f"\r\n--{b}m--\r\n".encode()
    to = draw(st.sampled_from(["user@seg-fast.test", "alice@contoso.com", "bob@example.com"]))
    head = (f"From: {sender}\r\nTo: {to}\r\nSubject: {draw(_text)}\r\n"
            "Date: Sun, 29 Nov 2026 08:00:00 +0000\r\n"
            f"Message-ID: <fuzz.{draw(st.integers(0, 10**9))}@seg-fast.test>\r\nMIME-Version: 1.0\r\n")
    # A subject is one header line: encode what is not plain ASCII (RFC 2047).
    if not head.isascii():
        from email.header import Header
        subject = head.split("Subject: ", 1)[1].split("\r\n", 1)[0]
        encoded = Header(subject, "utf-8").encode(linesep="\r\n")
        head = head.replace(f"Subject: {subject}\r\n", f"Subject: {encoded}\r\n")
    return head.encode() + entity


def corpus_messages(seed: int = 1, max_attachment: int = 64 * 1024) -> st.SearchStrategy[bytes]:
    """Messages of the simulator's corpus (``Corpus(seed)``) with small attachments."""
    corpus = Corpus(seed, cache=16)
    return (st.integers(0, 5000).filter(lambda i: (corpus.message(i).attachment_size or 0) <= max_attachment)
            .map(lambda i: corpus.message(i).mime))
