"""The listener's certificate from a PKCS#12 (.pfx/.p12) file, the guide's format.

Python's ssl loads certificate chains from files only, and only PEM. The PFX is
opened with its password by ``cryptography``, written as PEM into an anonymous
memory file (``memfd_create``: no name in any directory, never on disk, gone
with its last descriptor) and loaded through ``/proc/self/fd/N``. Where memfd
does not exist, a 0600 file in a fresh 0700 directory is used and removed as
soon as ssl has read it. The password comes from a file or from an environment
variable the config names, never from the command line (argv is readable by
every local user).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import ssl
import tempfile
from typing import NamedTuple

from seg_fast.errors import ConfigError


class PfxContents(NamedTuple):
    key: object
    cert: object                  # cryptography x509.Certificate (the leaf)
    chain: list                   # intermediates, as the file holds them


def pfx_password(listener) -> bytes:
    """The PFX password from listener.tls_pfx_password_file (first line) or tls_pfx_password_env."""
    if listener.tls_pfx_password_file:
        try:
            with open(listener.tls_pfx_password_file, "rb") as f:
                return f.read().split(b"\n", 1)[0].rstrip(b"\r")
        except OSError as exc:
            raise ConfigError(f"key listener.tls_pfx_password_file: {listener.tls_pfx_password_file}: "
                              f"{exc.strerror}") from None
    name = listener.tls_pfx_password_env
    if name and name in os.environ:
        return os.environ[name].encode()
    raise ConfigError("key listener.tls_pfx_password_env: "
                      + (f"environment variable {name} is not set" if name else "no password source given"))


def load_pfx(listener) -> PfxContents:
    """Key, leaf and chain of listener.tls_pfx; ConfigError naming the key when it does not open."""
    from cryptography.hazmat.primitives.serialization import pkcs12

    try:
        with open(listener.tls_pfx, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ConfigError(f"key listener.tls_pfx: {listener.tls_pfx}: {exc.strerror}") from None
    password = pfx_password(listener)
    try:
        key, cert, chain = pkcs12.load_key_and_certificates(data, password or None)
    except (ValueError, TypeError):
        # Wrong password and damaged file look the same to PKCS#12; the message says both.
        raise ConfigError(f"key listener.tls_pfx: {listener.tls_pfx}: not a PKCS#12 file, "
                          "or the password does not open it") from None
    if key is None or cert is None:
        raise ConfigError(f"key listener.tls_pfx: {listener.tls_pfx}: holds no private key and certificate")
    return PfxContents(key, cert, list(chain or ()))


def pem_of(pfx: PfxContents) -> bytes:
    from cryptography.hazmat.primitives import serialization

    key = pfx.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    certs = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in [pfx.cert, *pfx.chain])
    return key + certs


def load_into(ctx: ssl.SSLContext, pem: bytes) -> str:
    """ctx.load_cert_chain from PEM bytes held in memory; returns how ("memfd" or "tempfile")."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("seg-fast-listener-key", getattr(os, "MFD_CLOEXEC", 0))
        try:
            view = memoryview(pem)
            while view:
                view = view[os.write(fd, view):]
            ctx.load_cert_chain(f"/proc/self/fd/{fd}")
            return "memfd"
        except FileNotFoundError:
            pass                      # no /proc: fall back below
        finally:
            os.close(fd)
    private = tempfile.mkdtemp(prefix="seg-fast-pfx-")     # 0700
    try:
        path = os.path.join(private, "listener.pem")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        ctx.load_cert_chain(path)
        return "tempfile"
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(private)
