"""File types by extension and magic bytes; the envelope; the decrypt CLI."""
from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import sys

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, strategies as st

from conftest import REAL_SERVER, REPO
from seg_fast.content.attachments import (ENVELOPE_MAGIC, envelope_name, file_type, open_envelope,
                                          parse_header, seal)
from seg_fast.content.keys import Keyring, load_master_key
from seg_fast.errors import EnvelopeError

PDF = (REAL_SERVER / "attachment_getatt.bin").read_bytes()
ZIP = b"PK\x03\x04" + bytes(40)
PNG = b"\x89PNG\r\n\x1a\n" + bytes(20)


@pytest.mark.parametrize("name,head,want", [
    ("report.pdf", PDF, "pdf"),
    ("report.pdf", ZIP, "zip"),          # a .pdf that is really a ZIP is a ZIP
    ("letter.docx", ZIP, "docx"),
    ("letter.DOCX", PDF, "pdf"),
    ("photo.png", PNG, "png"),
    ("photo.jpg", PNG, "png"),
    ("notes.txt", b"hello", "txt"),
    ("noext", b"hello", ""),
    ("old.doc", b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "doc"),
    ("x.bin", b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "doc"),
    ("pic.JPEG", b"\x00", "jpg"),
])
def test_file_type(name, head, want):
    assert file_type(name, head) == want


def test_real_pdf_fixture_is_the_same_via_itemops_and_getattachment():
    assert PDF == (REAL_SERVER / "attachment_itemops.bin").read_bytes()
    assert file_type("report.pdf", PDF) == "pdf"


def test_envelope_layout_and_independent_decrypt():
    ring = Keyring(b"m" * 32)
    blob = seal(ring, "DEV", "alice", "report.pdf", "application/pdf", PDF)
    magic, version, flags, key_id, nonce = struct.unpack_from(">4sBB8s12s", blob)
    assert (magic, version, flags) == (ENVELOPE_MAGIC, 1, 0)
    pos = 26
    (n,) = struct.unpack_from(">H", blob, pos)
    assert blob[pos + 2:pos + 2 + n] == b"report.pdf"
    pos += 2 + n
    (n,) = struct.unpack_from(">H", blob, pos)
    assert blob[pos + 2:pos + 2 + n] == b"application/pdf"
    pos += 2 + n
    # Decrypt with cryptography directly, following docs/envelope.md.
    plain = AESGCM(ring.key("dev", "ALICE", 0)).decrypt(nonce, blob[pos:], blob[:pos])
    assert hashlib.sha256(plain).digest() == hashlib.sha256(PDF).digest()
    assert parse_header(blob)[3:5] == ("report.pdf", "application/pdf")


def test_wrong_device_user_or_tampering_fails_precisely():
    ring = Keyring(b"m" * 32)
    blob = seal(ring, "dev", "alice", "a.pdf", "application/pdf", b"secret")
    with pytest.raises(EnvelopeError, match="wrong device or user"):
        open_envelope(ring, "dev", "bob", blob)
    with pytest.raises(EnvelopeError, match="wrong device or user"):
        open_envelope(ring, "other", "alice", blob)
    renamed = blob.replace(b"a.pdf", b"b.pdf")
    with pytest.raises(EnvelopeError):
        open_envelope(ring, "dev", "alice", renamed)
    with pytest.raises(EnvelopeError, match="another master key"):
        open_envelope(Keyring(b"x" * 32), "dev", "alice", blob)
    with pytest.raises(EnvelopeError, match="bad magic"):
        open_envelope(ring, "dev", "alice", b"%PDF" + blob[4:])


@given(st.binary(max_size=200))
def test_garbage_never_crashes(data):
    ring = Keyring(b"m" * 32)
    with pytest.raises(EnvelopeError):
        open_envelope(ring, "d", "u", data)
    blob = seal(ring, "d", "u", "f.bin", "application/octet-stream", data)
    assert open_envelope(ring, "d", "u", blob) == ("f.bin", "application/octet-stream", data)
    for cut in (len(blob) - 1, 30, 10):
        with pytest.raises(EnvelopeError):
            open_envelope(ring, "d", "u", blob[:cut])


def test_old_generation_envelopes_still_open_after_rotation(tmp_path):
    ring = Keyring(b"m" * 32, tmp_path / "k.json")
    old = seal(ring, "dev", "u", "a.pdf", "application/pdf", b"one")
    ring.rotate("dev")
    ring._checked = 0.0
    new = seal(ring, "dev", "u", "a.pdf", "application/pdf", b"two")
    assert old[6:10] == bytes(4) and new[6:10] == (1).to_bytes(4, "big")
    assert open_envelope(ring, "dev", "u", old)[2] == b"one"
    assert open_envelope(ring, "dev", "u", new)[2] == b"two"


def test_decrypt_cli_restores_the_original(tmp_path):
    master = tmp_path / "m.key"
    ring = Keyring(load_master_key(master, create=True), tmp_path / "k.json")
    env_file = tmp_path / envelope_name("report.pdf")
    env_file.write_bytes(seal(ring, "DEV9", "corp\\alice", "report.pdf", "application/pdf", PDF))
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), SEG_FAST_SECURITY_MASTER_KEY_FILE=str(master),
               SEG_FAST_SECURITY_KEY_STATE_FILE=str(tmp_path / "k.json"))
    out = tmp_path / "out"
    out.mkdir()
    r = subprocess.run([sys.executable, "-m", "seg_fast", "attachment", "decrypt", "--device", "DEV9",
                        "--user", "corp\\alice", str(env_file)], env=env, cwd=out, capture_output=True)
    assert r.returncode == 0, r.stderr
    assert hashlib.sha256((out / "report.pdf").read_bytes()).digest() == hashlib.sha256(PDF).digest()
    r = subprocess.run([sys.executable, "-m", "seg_fast", "attachment", "decrypt", "--device", "DEV9",
                        "--user", "bob", str(env_file)], env=env, cwd=out, capture_output=True, text=True)
    assert r.returncode == 1 and "wrong device or user" in r.stderr
