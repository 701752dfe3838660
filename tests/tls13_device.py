"""A TLS 1.3 device's writing side done by a test: records sealed with the ``cryptography``
package's AEADs under keys derived here from the client's keylog (HKDF-Expand-Label, RFC 8446
7.1 and 7.3), an implementation that is neither OpenSSL's record layer nor proxy/_tls13.pyx."""
from __future__ import annotations

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

SUITES = {"TLS_AES_128_GCM_SHA256": (AESGCM, 16, hashes.SHA256()),
          "TLS_AES_256_GCM_SHA384": (AESGCM, 32, hashes.SHA384()),
          "TLS_CHACHA20_POLY1305_SHA256": (ChaCha20Poly1305, 32, hashes.SHA256())}


def _label(secret, label, length, algo):
    full = b"tls13 " + label
    info = length.to_bytes(2, "big") + bytes([len(full)]) + full + b"\x00"
    return HKDFExpand(algo, length, info).derive(secret)


class Device:
    """The client's writing side, done by the test: its traffic secret from the keylog."""

    def __init__(self, suite, secret):
        self.aead, self.klen, self.algo = SUITES[suite]
        self.secret = secret
        self.seq = 0
        self._keys()

    def _keys(self):
        self.key = self.aead(_label(self.secret, b"key", self.klen, self.algo))
        self.iv = _label(self.secret, b"iv", 12, self.algo)

    def update(self):
        self.secret = _label(self.secret, b"traffic upd", self.algo.digest_size, self.algo)
        self.seq = 0
        self._keys()

    def record(self, inner: bytes, outer: int = 23, tamper: bool = False) -> bytes:
        nonce = bytes(a ^ b for a, b in zip(self.iv, self.seq.to_bytes(12, "big")))
        head = bytes([outer, 3, 3]) + (len(inner) + 16).to_bytes(2, "big")
        sealed = self.key.encrypt(nonce, inner, head)
        self.seq += 1
        if tamper:
            sealed = sealed[:-1] + bytes([sealed[-1] ^ 1])
        return head + sealed


def keylog_secret(path, label):
    for line in path.read_text().splitlines():
        if line.startswith(label + " "):
            return bytes.fromhex(line.split()[2])
    raise AssertionError(f"{label} not in the keylog")
