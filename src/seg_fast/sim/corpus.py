"""The deterministic message corpus of BENCH-PROFILE.md.

``Corpus(seed).message(i)`` is a pure function of ``(seed, i)``: every run, every
process and every peer (the simulator, the fleet, the content benchmark) sees the
same bytes. Each message carries all its renderings (HTML for Body Type 2, plain
text for Type 1, the RFC 822 message for Type 4) so the device's BodyPreference
picks one; the expensive ones are built on first use.

Profile (per message, independent draws):
- HTML body 10-60 KB with 5-40 hyperlinks to a mix of ``DOMAINS``, about 70% in
  ``href`` attributes and 30% bare in the text;
- MIME: multipart/alternative text + HTML (the HTML quoted-printable, as mail
  clients send it); 25% carry one attachment (multipart/mixed) with sizes 60%
  50 KB, 30% 300 KB, 9% 2 MB, 1% 10 MB and types PDF, DOCX, PNG, ZIP made with
  their real structure and magic bytes;
- 5% are S/MIME signed (multipart/signed, application/pkcs7-signature): real
  signatures, deterministic, made with the fixed test key of smime.py;
- 10% carry an ``X-Classification`` header.
``body_type`` (2 or 4, half each) is the profile's hint for which body a fleet
device asks for.
"""
from __future__ import annotations

import binascii
import functools
import io
import random
import struct
import zipfile
import zlib
from datetime import datetime, timedelta, timezone

from seg_fast.sim.smime import sign_detached

# The 20 link domains; the profile's rewrite include-list is the first 10.
DOMAINS: tuple[str, ...] = (
    "contoso.com", "fabrikam.com", "northwindtraders.com", "adventure-works.com",
    "tailspintoys.com", "wingtiptoys.com", "woodgrovebank.com", "litwareinc.com",
    "proseware.com", "lucernepublishing.com", "fourthcoffee.com", "alpineskihouse.com",
    "cpandl.com", "humongousinsurance.com", "margiestravel.com", "treyresearch.net",
    "wideworldimporters.com", "graphicdesigninstitute.com", "blueyonderairlines.com",
    "coho-winery.com",
)
REWRITE_DOMAINS: tuple[str, ...] = DOMAINS[:10]

CLASSIFICATIONS: tuple[str, ...] = ("Public", "Internal", "Confidential", "Restricted")

# (bytes, weight) per BENCH-PROFILE.md
ATTACHMENT_SIZES: tuple[tuple[int, int], ...] = (
    (50 * 1024, 60), (300 * 1024, 30), (2 * 1024 * 1024, 9), (10 * 1024 * 1024, 1),
)
ATTACHMENT_KINDS: dict[str, str] = {
    "pdf": "application/pdf",
    "docx": "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
    "png": "image/png",
    "zip": "application/zip",
}

P_ATTACHMENT = 0.25
P_SIGNED = 0.05
P_CLASSIFIED = 0.10
HTML_MIN, HTML_MAX = 10 * 1024, 60 * 1024
LINKS_MIN, LINKS_MAX = 5, 40
P_HREF = 0.7

RECIPIENT = "user@seg-fast.test"
EPOCH = datetime(2026, 11, 2, 8, 0, tzinfo=timezone.utc)

_WORDS = (
    "the quarterly report budget meeting review project team update schedule "
    "customer order invoice shipment delivery contract renewal proposal draft final "
    "please find attached below regarding following discussed yesterday tomorrow next "
    "week month status action items owner deadline approval request feedback notes "
    "agenda minutes summary results numbers forecast sales revenue margin cost growth "
    "market strategy plan launch product service support ticket issue resolved open "
    "priority high low medium risk compliance policy security access account password "
    "device mobile office remote travel expense receipt payment vendor partner client "
    "thanks regards best kind let know if you have any questions we will and for with "
    "on in at by from to of a an is are was were be this that these those our your"
).split()
_FIRST = ("Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi", "Ivan",
          "Judy", "Mallory", "Niaj", "Olivia", "Peggy", "Rupert", "Sybil", "Trent", "Victor")
_LAST = ("Smith", "Jones", "Brown", "Taylor", "Wilson", "Davies", "Evans", "Thomas",
         "Roberts", "Walker", "Wright", "Green", "Hall", "Wood", "Clarke", "Hughes")


class Message:
    """One corpus message. ``html``, ``text``, ``mime`` and ``attachments`` are
    built on first access and then kept."""

    __slots__ = ("index", "seed", "subject", "sender", "to", "date", "message_id",
                 "classification", "signed", "body_type", "_plan", "__dict__")

    def __init__(self, seed: int, index: int):
        self.seed = seed
        self.index = index
        rng = random.Random(_mix(seed, index))
        first, last = rng.choice(_FIRST), rng.choice(_LAST)
        domain = rng.choice(DOMAINS)
        self.sender = f"{first} {last} <{first.lower()}.{last.lower()}@{domain}>"
        self.to = RECIPIENT
        self.subject = " ".join(rng.choices(_WORDS, k=rng.randint(3, 8))).capitalize() + f" #{index}"
        self.date = EPOCH + timedelta(minutes=index)
        self.message_id = f"<corpus.{seed}.{index}@seg-fast.test>"
        self.body_type = 2 if rng.random() < 0.5 else 4
        has_attachment = rng.random() < P_ATTACHMENT
        self.signed = rng.random() < P_SIGNED
        self.classification = rng.choice(CLASSIFICATIONS) if rng.random() < P_CLASSIFIED else None
        # What the lazy parts need, drawn now so every part depends only on (seed, i).
        att = None
        if has_attachment:
            ext = rng.choice(tuple(ATTACHMENT_KINDS))
            size = rng.choices([s for s, _ in ATTACHMENT_SIZES], [w for _, w in ATTACHMENT_SIZES])[0]
            att = (f"{rng.choice(_WORDS)}-{index}.{ext}", ext, size)
        self._plan = (rng.randint(HTML_MIN + 1536, HTML_MAX - 2048), rng.randint(LINKS_MIN, LINKS_MAX),
                      att, rng.getrandbits(64))

    # -- bodies ----------------------------------------------------------------------
    @functools.cached_property
    def _bodies(self) -> tuple[str, str, tuple[str, ...]]:
        target, nlinks, _, sub = self._plan
        rng = random.Random(sub)
        links = [_url(rng) for _ in range(nlinks)]
        head = f'<html><head><meta charset="utf-8"><title>{self.subject}</title></head><body>\n'
        # Paragraphs until the target size (links counted in), then the links go
        # into random places among them: the size stays within one paragraph of it.
        size = len(head) + 16 + sum(len(u) + 30 for u in links)
        paras: list[list[str]] = []
        while size < target:
            words = rng.choices(_WORDS, k=rng.randint(40, 120))
            paras.append(words)
            size += sum(map(len, words)) + len(words) + 8
        hparas = [list(w) for w in paras]
        tparas = [list(w) for w in paras]
        for url in links:
            p = rng.randrange(len(paras))
            pos = rng.randrange(len(paras[p]))
            if rng.random() < P_HREF:
                anchor = " ".join(rng.choices(_WORDS, k=rng.randint(1, 4)))
                hparas[p][pos] += f' <a href="{url.replace("&", "&amp;")}">{anchor}</a>'
                tparas[p][pos] += f" {anchor} <{url}>"
            else:
                hparas[p][pos] += " " + url.replace("&", "&amp;")
                tparas[p][pos] += " " + url
        html = [head]
        for words in hparas:
            para = " ".join(words)
            html.append(f"<p>{para[0].upper()}{para[1:]}.</p>\n")
        text = [_wrap(" ".join(words)) for words in tparas]
        html.append("</body></html>\n")
        return "".join(html), "\n\n".join(text) + "\n", tuple(links)

    @property
    def html(self) -> str:
        return self._bodies[0]

    @property
    def text(self) -> str:
        return self._bodies[1]

    @property
    def links(self) -> tuple[str, ...]:
        """Every URL in the message, in generation order (the oracle for rewriters)."""
        return self._bodies[2]

    @property
    def attachment_size(self) -> int | None:
        """The size of the message's attachment (None: it has none), known without building it."""
        att = self._plan[2]
        return att[2] if att is not None else None

    @functools.cached_property
    def attachments(self) -> list[tuple[str, str, bytes]]:
        att = self._plan[2]
        if att is None:
            return []
        name, ext, size = att
        return [(name, ATTACHMENT_KINDS[ext], _MAKERS[ext](random.Random(self._plan[3] ^ 0xA77), size))]

    @functools.cached_property
    def mime(self) -> bytes:
        b = f"=_seg{self.seed}_{self.index}"
        alt = (f'Content-Type: multipart/alternative; boundary="{b}a"\r\n\r\n'
               f"--{b}a\r\n"
               'Content-Type: text/plain; charset="utf-8"\r\nContent-Transfer-Encoding: 7bit\r\n\r\n'
               + self.text.replace("\n", "\r\n") +
               f"\r\n--{b}a\r\n"
               'Content-Type: text/html; charset="utf-8"\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n'
               ).encode() + _qp(self.html) + f"\r\n--{b}a--\r\n".encode()
        entity = alt
        for name, ctype, data in self.attachments:
            entity = (f'Content-Type: multipart/mixed; boundary="{b}m"\r\n\r\n--{b}m\r\n'.encode()
                      + alt + f"\r\n--{b}m\r\n".encode()
                      + (f'Content-Type: {ctype}; name="{name}"\r\nContent-Transfer-Encoding: base64\r\n'
                         f'Content-Disposition: attachment; filename="{name}"\r\n\r\n').encode()
                      + _b64_lines(data) + f"--{b}m--\r\n".encode())
        if self.signed:
            entity = signed_entity(entity, f"{b}s")
        head = (f"From: {self.sender}\r\nTo: {self.to}\r\nSubject: {self.subject}\r\n"
                f"Date: {self.date.strftime('%a, %d %b %Y %H:%M:%S +0000')}\r\n"
                f"Message-ID: {self.message_id}\r\nMIME-Version: 1.0\r\n")
        if self.classification:
            head += f"X-Classification: {self.classification}\r\n"
        return head.encode() + entity


    def __repr__(self) -> str:
        return f"<Message seed={self.seed} index={self.index} body_type={self.body_type}>"


class Corpus:
    """Messages by index; the last ``cache`` messages asked for are kept built."""

    def __init__(self, seed: int = 1, cache: int = 256):
        self.seed = seed
        self.message = functools.lru_cache(maxsize=cache)(self._build)

    def _build(self, index: int) -> Message:
        if index < 0:
            raise IndexError("corpus index must be >= 0")
        return Message(self.seed, index)

    def __getitem__(self, index: int) -> Message:
        return self.message(index)


# -- helpers ---------------------------------------------------------------------------

def _mix(seed: int, index: int) -> int:
    return (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)


def _url(rng: random.Random) -> str:
    domain = rng.choice(DOMAINS)
    host = domain if rng.random() < 0.5 else rng.choice(("www.", "mail.", "docs.", "portal.")) + domain
    path = "/".join(rng.choices(_WORDS, k=rng.randint(1, 3)))
    query = "" if rng.random() < 0.4 else f"?id={rng.randrange(10**6)}" + (
        f"&ref={rng.choice(_WORDS)}" if rng.random() < 0.5 else "")
    return f"{rng.choice(('https', 'https', 'http'))}://{host}/{path}{query}"


def _wrap(line: str, width: int = 76) -> str:
    # Greedy wrap at spaces; a word longer than the width (a URL) gets its own line.
    out = []
    while len(line) > width:
        cut = line.rfind(" ", 0, width + 1)
        if cut <= 0:
            cut = line.find(" ", width)
            if cut < 0:
                break
        out.append(line[:cut])
        line = line[cut + 1:]
    out.append(line)
    return "\n".join(out)


def _qp(text: str) -> bytes:
    return binascii.b2a_qp(text.encode(), istext=True).replace(b"\n", b"\r\n")


def signed_entity(entity: bytes, boundary: str) -> bytes:
    """``entity`` wrapped in multipart/signed with a real detached S/MIME signature."""
    sig = sign_detached(entity)
    return (f'Content-Type: multipart/signed; protocol="application/pkcs7-signature"; '
            f'micalg=sha-256; boundary="{boundary}"\r\n\r\n'
            "This is a cryptographically signed message in MIME format.\r\n\r\n"
            f"--{boundary}\r\n").encode() + entity + (
            f"\r\n--{boundary}\r\n"
            'Content-Type: application/pkcs7-signature; name="smime.p7s"\r\n'
            "Content-Transfer-Encoding: base64\r\n"
            'Content-Disposition: attachment; filename="smime.p7s"\r\n\r\n').encode() + (
            _b64_lines(sig) + f"\r\n--{boundary}--\r\n".encode())


def _b64_lines(data: bytes) -> bytes:
    enc = binascii.b2a_base64(data, newline=False)
    return b"".join(enc[k:k + 76] + b"\r\n" for k in range(0, len(enc), 76))


def _filler(rng: random.Random, n: int) -> bytes:
    return rng.randbytes(max(0, n))


def _make_pdf(rng: random.Random, size: int) -> bytes:
    head = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n"
    objs = [b"<< /Type /Catalog /Pages 2 0 R >>",
            b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R >>"]
    stream_len = max(0, size - 420)
    objs.append(b"<< /Length %d >>\nstream\n" % stream_len + _filler(rng, stream_len) + b"\nendstream")
    out = bytearray(head)
    offsets = []
    for k, body in enumerate(objs, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % k + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objs) + 1, xref)
    return bytes(out)


def _zip(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, data in members:
            zf.writestr(zipfile.ZipInfo(name, date_time=(2026, 1, 1, 0, 0, 0)), data)
    return buf.getvalue()


def _make_zip(rng: random.Random, size: int) -> bytes:
    return _zip([("data.bin", _filler(rng, size - 200))])


_DOCX_TYPES = (b'<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'
               b'<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
               b'<Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
               b'<Default Extension="xml" ContentType="application/xml"/>'
               b'<Default Extension="bin" ContentType="application/octet-stream"/>'
               b'<Override PartName="/word/document.xml" ContentType="application/vnd.openxmlformats-'
               b'officedocument.wordprocessingml.document.main+xml"/></Types>')
_DOCX_RELS = (b'<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'
              b'<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">'
              b'<Relationship Id="rId1" Type="http://schemas.openxmlformats.org/officeDocument/2006/'
              b'relationships/officeDocument" Target="word/document.xml"/></Relationships>')
_DOCX_DOC = (b'<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'
             b'<w:document xmlns:w="http://schemas.openxmlformats.org/wordprocessingml/2006/main">'
             b"<w:body><w:p><w:r><w:t>Corpus document</w:t></w:r></w:p></w:body></w:document>")


def _make_docx(rng: random.Random, size: int) -> bytes:
    return _zip([("[Content_Types].xml", _DOCX_TYPES), ("_rels/.rels", _DOCX_RELS),
                 ("word/document.xml", _DOCX_DOC), ("word/media/blob.bin", _filler(rng, size - 1700))])


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _make_png(rng: random.Random, size: int) -> bytes:
    width = 256
    height = max(1, (size - 100) // (width + 1))
    raw = bytearray(_filler(rng, height * (width + 1)))
    raw[:: width + 1] = bytes(height)          # filter byte 0 (None) on every row
    return (b"\x89PNG\r\n\x1a\n"
            + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + _png_chunk(b"IDAT", zlib.compress(bytes(raw), 0))
            + _png_chunk(b"IEND", b""))


_MAKERS = {"pdf": _make_pdf, "docx": _make_docx, "png": _make_png, "zip": _make_zip}
