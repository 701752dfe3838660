"""The message corpus: deterministic, in the proportions of BENCH-PROFILE.md, and
made of real MIME and real file formats (Python's email, zipfile and zlib are the
oracles)."""
from __future__ import annotations

import hashlib
import io
import re
import shutil
import struct
import subprocess
import sys
import zipfile
import zlib
from collections import Counter
from email import policy
from email.parser import BytesParser

import pytest

from seg_fast.sim.corpus import (ATTACHMENT_KINDS, ATTACHMENT_SIZES, CLASSIFICATIONS, DOMAINS,
                                 REWRITE_DOMAINS, Corpus)

N = 2000
HREF = re.compile(r'href="([^"]+)"')


@pytest.fixture(scope="module")
def messages():
    c = Corpus(seed=1, cache=0)
    return [c.message(i) for i in range(N)]


def digest(seed: int, n: int) -> str:
    c = Corpus(seed)
    h = hashlib.sha256()
    for i in range(n):
        h.update(c.message(i).mime)
    return h.hexdigest()


def test_same_seed_same_bytes_in_another_process():
    here = digest(5, 60)
    assert any(Corpus(5).message(i).signed for i in range(60))     # signatures included
    code = ("import sys; sys.path.insert(0, 'src'); from tests.test_sim_corpus import digest; "
            "print(digest(5, 60))")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": "123", "PATH": "/usr/bin:/bin"},
                           cwd=str(__import__("conftest").REPO)).stdout.strip()
    assert other == here
    assert digest(6, 60) != here
    # order of access does not matter
    a, b = Corpus(5), Corpus(5)
    b.message(30)
    assert a.message(3).html == b.message(3).html and a.message(30).mime == b.message(30).mime


def test_profile_proportions(messages):
    assert 0.45 < sum(m.body_type == 2 for m in messages) / N < 0.55
    assert {m.body_type for m in messages} == {2, 4}
    with_att = [m for m in messages if m.attachments]
    assert 0.22 < len(with_att) / N < 0.28
    assert 0.035 < sum(m.signed for m in messages) / N < 0.065
    classified = [m for m in messages if m.classification]
    assert 0.08 < len(classified) / N < 0.12
    assert {m.classification for m in classified} <= set(CLASSIFICATIONS)
    nominal = [s for s, _ in ATTACHMENT_SIZES]
    sizes = Counter()
    kinds = Counter()
    for m in with_att:
        (name, ctype, blob), = m.attachments
        near = min(nominal, key=lambda s: abs(s - len(blob)))
        assert abs(len(blob) - near) / near < 0.01
        sizes[near] += 1
        ext = name.rsplit(".", 1)[1]
        assert ATTACHMENT_KINDS[ext] == ctype
        kinds[ext] += 1
    total = len(with_att)
    assert 0.54 < sizes[nominal[0]] / total < 0.66
    assert 0.24 < sizes[nominal[1]] / total < 0.36
    assert 0.05 < sizes[nominal[2]] / total < 0.13
    assert 1 <= sizes[nominal[3]] <= total * 0.03
    assert set(kinds) == set(ATTACHMENT_KINDS) and min(kinds.values()) > total * 0.15


def test_html_bodies_and_links(messages):
    seen_domains = set()
    for m in messages[:300]:
        assert 10 * 1024 <= len(m.html.encode()) <= 60 * 1024
        assert 5 <= len(m.links) <= 40
        href = [u.replace("&amp;", "&") for u in HREF.findall(m.html)]
        bare = len(m.links) - len(href)
        assert set(href) <= set(m.links)
        for url in m.links:
            host = re.match(r"https?://([^/]+)/", url).group(1)
            assert any(host == d or host.endswith("." + d) for d in DOMAINS)
            seen_domains.add(next(d for d in DOMAINS if host == d or host.endswith("." + d)))
            assert url.replace("&", "&amp;") in m.html and url in m.text
        m.bare = bare
    assert seen_domains == set(DOMAINS) and len(DOMAINS) == 20 and len(REWRITE_DOMAINS) == 10
    assert sum(m.bare for m in messages[:300]) > 0
    assert sum(len(m.links) - m.bare for m in messages[:300]) > sum(m.bare for m in messages[:300])


def test_mime_structure(messages):
    parser = BytesParser(policy=policy.default)
    signed = classified = attached = 0
    for m in messages[:400]:
        msg = parser.parsebytes(m.mime)
        assert msg["Subject"] == m.subject and msg["Message-ID"] == m.message_id
        assert msg["X-Classification"] == m.classification
        top = msg
        if m.signed:
            signed += 1
            assert msg.get_content_type() == "multipart/signed"
            assert msg.get_param("protocol") == "application/pkcs7-signature"
            inner, sig = msg.get_payload()
            assert sig.get_content_type() == "application/pkcs7-signature"
            top = inner
        if m.attachments:
            attached += 1
            assert top.get_content_type() == "multipart/mixed"
            alt, att = top.get_payload()
            name, ctype, blob = m.attachments[0]
            assert att.get_filename() == name and att.get_content_type() == ctype
            assert att.get_payload(decode=True) == blob
        else:
            alt = top
        assert alt.get_content_type() == "multipart/alternative"
        plain, html = alt.get_payload()
        assert plain.get_content_type() == "text/plain" and html.get_content_type() == "text/html"
        assert html["Content-Transfer-Encoding"] == "quoted-printable"
        assert html.get_payload(decode=True).decode().replace("\r\n", "\n") == m.html
        assert plain.get_payload(decode=True).decode().replace("\r\n", "\n") == m.text
        assert max(len(line) for line in m.mime.split(b"\r\n")) <= 998
        classified += m.classification is not None
    assert signed and classified and attached


def test_attachment_file_formats(messages):
    done = set()
    for m in messages:
        if not m.attachments or m.attachments[0][0].rsplit(".", 1)[1] in done:
            continue
        name, _ctype, blob = m.attachments[0]
        ext = name.rsplit(".", 1)[1]
        if len(blob) > 400_000:
            continue
        done.add(ext)
        if ext == "pdf":
            assert blob.startswith(b"%PDF-1.") and blob.rstrip().endswith(b"%%EOF")
            startxref = int(blob.rsplit(b"startxref\n", 1)[1].split(b"\n")[0])
            assert blob[startxref:startxref + 4] == b"xref"
        elif ext in ("zip", "docx"):
            assert blob[:4] == b"PK\x03\x04"
            with zipfile.ZipFile(io.BytesIO(blob)) as zf:
                assert zf.testzip() is None
                if ext == "docx":
                    assert zf.namelist()[0] == "[Content_Types].xml"
                    assert "word/document.xml" in zf.namelist()
        elif ext == "png":
            assert blob[:8] == b"\x89PNG\r\n\x1a\n"
            pos, chunks = 8, []
            while pos < len(blob):
                (n,) = struct.unpack_from(">I", blob, pos)
                kind = blob[pos + 4:pos + 8]
                body = blob[pos + 8:pos + 8 + n]
                assert struct.unpack_from(">I", blob, pos + 8 + n)[0] == zlib.crc32(kind + body)
                chunks.append((kind, body))
                pos += 12 + n
            assert [k for k, _ in chunks] == [b"IHDR", b"IDAT", b"IEND"]
            w, h = struct.unpack(">II", chunks[0][1][:8])
            assert len(zlib.decompress(chunks[1][1])) == h * (w + 1)
    assert done == set(ATTACHMENT_KINDS)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
def test_signed_messages_verify_and_tampering_is_caught(tmp_path):
    c = Corpus(seed=1)
    signed = [c.message(i) for i in range(200) if c.message(i).signed][:3]
    assert signed
    for m in signed:
        good = tmp_path / f"good{m.index}.eml"
        good.write_bytes(m.mime)
        ok = subprocess.run(["openssl", "smime", "-verify", "-noverify", "-in", str(good), "-out", "/dev/null"],
                            capture_output=True, text=True)
        assert ok.returncode == 0, ok.stderr
        raw = bytearray(m.mime)
        at = raw.find(b"<p>") + 5
        raw[at] ^= 0x01                       # one changed letter in the HTML body
        bad = tmp_path / f"bad{m.index}.eml"
        bad.write_bytes(bytes(raw))
        assert subprocess.run(["openssl", "smime", "-verify", "-noverify", "-in", str(bad), "-out", "/dev/null"],
                              capture_output=True).returncode != 0
