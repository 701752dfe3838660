"""Which user a credential names: read from the Authorization header, never checked here.

The gateway decides on the user the mail server will authenticate, so it reads that
user from the credential itself rather than from the device's ``User=`` hint:

- Basic: the user name before the colon (the password is never kept).
- Bearer: a JWT's ``upn``, else ``unique_name``, else ``preferred_username`` claim. The
  signature is not verified here: the mail server verifies it, so a forged token gets
  no mail, and a genuine one names the user it is for. An opaque (non-JWT) or
  encrypted (JWE) token names no user.
- NTLM (``NTLM`` or a raw NTLMSSP ``Negotiate`` token): the DOMAIN\\user of a type-3
  AUTHENTICATE_MESSAGE (MS-NLMP 2.2.1.3). A type-1 NEGOTIATE_MESSAGE starts the
  handshake and names no one (``handshake`` in the result).
- Kerberos / SPNEGO ``Negotiate``, other schemes, no header: no user.

With listener.client_cert on, a client certificate's mapped user takes precedence
(kcd/clientcert.py, identity CERTIFICATE): User= and any credential must agree with it.

Anything malformed in a scheme that is read raises EASRequestError (HTTP 400).
"""
from __future__ import annotations

import binascii
import re

import msgspec

from seg_fast.errors import EASRequestError

# EasRequest.identity: where the user the policy decides on came from.
CREDENTIAL = "credential"   # the credential names the user (the mail server verifies it)
HANDSHAKE = "handshake"     # NTLM type 1: no user yet; the mail server answers with a challenge
NONE = "none"               # the credential names no user (or there is none): User= is a claim
CERTIFICATE = "certificate" # the device's TLS client certificate names the user (kcd/clientcert.py)

# Schemes that authenticate a connection rather than a request (MS-NLMP, RFC 4559).
CONNECTION_SCHEMES = frozenset({"ntlm", "negotiate"})
JWT_CLAIMS = ("upn", "unique_name", "preferred_username")
MAX_USER = 512
NTLM_SIGNATURE = b"NTLMSSP\x00"
NTLM_NEGOTIATE_UNICODE = 0x00000001
# OEM strings (a client that did not negotiate Unicode) are read with the US OEM code page,
# which maps every byte: a name in another OEM page reads differently but never raises.
NTLM_OEM_ENCODING = "cp437"

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_TOKEN68 = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
_B64URL = re.compile(rb"[A-Za-z0-9_-]+")
_claims_decoder = msgspec.json.Decoder()


def read_authorization(value: str) -> tuple[str, str | None, str]:
    """(scheme lower-cased, user or None, identity) of one Authorization header value."""
    # Any run of blanks separates scheme and token: a server that reads "Basic<TAB>..." as
    # Basic must not see a credential the gateway took for an unknown scheme.
    parts = value.split(None, 1)
    scheme = parts[0].lower() if parts else ""
    token = parts[1] if len(parts) == 2 else ""
    if scheme == "basic":
        return scheme, basic_user(token), CREDENTIAL
    if scheme == "bearer":
        user = bearer_user(token)
    elif scheme == "ntlm" or scheme == "negotiate":
        blob = _base64(token.strip(), scheme)
        if scheme == "negotiate" and not blob.startswith(NTLM_SIGNATURE):
            return scheme, None, NONE              # Kerberos or SPNEGO: no user we can read
        user, handshake = ntlm_user(blob)
        if handshake:
            return scheme, None, HANDSHAKE
    else:
        return scheme[:20], None, NONE
    return scheme, user, (NONE if user is None else CREDENTIAL)


def basic_user(token: str) -> str:
    """The user name of Basic credentials (never the password)."""
    try:
        decoded = binascii.a2b_base64(token.strip(), strict_mode=True).decode("utf-8")
    except (binascii.Error, ValueError):
        raise EASRequestError("Authorization header is not valid Basic credentials") from None
    user, colon, _ = decoded.partition(":")
    if not colon or _CONTROL.search(user):
        raise EASRequestError("Authorization header is not valid Basic credentials")
    return user


def bearer_user(token: str) -> str | None:
    """The user a bearer JWT names (unverified), or None for a token that names no one."""
    token = token.strip()
    if not _TOKEN68.fullmatch(token):
        raise EASRequestError("Authorization header is not a valid Bearer token")
    parts = token.split(".")
    if len(parts) != 3:
        return None                                # opaque, or an encrypted JWE (5 parts)
    header = _b64url_json(parts[0])
    if not isinstance(header, dict):
        return None                                # not a JWT: an opaque token with dots in it
    claims = _b64url_json(parts[1])
    if not isinstance(claims, dict):
        raise EASRequestError("Bearer token is a JWT whose claims do not decode")
    for name in JWT_CLAIMS:
        user = claims.get(name)
        if user is not None:
            return _checked_user(user, f"Bearer token claim {name}")
    return None


def ntlm_user(blob: bytes) -> tuple[str | None, bool]:
    """(DOMAIN\\user or None, is a type-1 handshake start) of one NTLM message."""
    if len(blob) < 12 or blob[:8] != NTLM_SIGNATURE:
        raise EASRequestError("NTLM token is not an NTLMSSP message")
    kind = int.from_bytes(blob[8:12], "little")
    if kind == 1:
        return None, True
    if kind != 3:
        raise EASRequestError(f"NTLM message type {kind} is not one a device sends")
    if len(blob) < 64:
        raise EASRequestError("NTLM AUTHENTICATE message shorter than its fixed fields")
    flags = int.from_bytes(blob[60:64], "little")
    unicode = bool(flags & NTLM_NEGOTIATE_UNICODE)
    domain = _ntlm_string(blob, 28, unicode, "DomainName")
    user = _ntlm_string(blob, 36, unicode, "UserName")
    if not user:
        return None, False                         # anonymous: names no one
    return _checked_user(f"{domain}\\{user}" if domain else user, "NTLM user"), False


def _ntlm_string(blob: bytes, at: int, unicode: bool, what: str) -> str:
    # A security buffer: Len (2), MaxLen (2), Offset (4), little-endian (MS-NLMP 2.2.1.3).
    length = int.from_bytes(blob[at:at + 2], "little")
    if not length:
        return ""
    offset = int.from_bytes(blob[at + 4:at + 8], "little")
    if offset + length > len(blob):
        raise EASRequestError(f"NTLM {what} runs past the end of the message")
    raw = blob[offset:offset + length]
    try:
        return raw.decode("utf-16-le") if unicode else raw.decode(NTLM_OEM_ENCODING)
    except UnicodeDecodeError:
        raise EASRequestError(f"NTLM {what} is not valid UTF-16") from None


def _checked_user(user, what: str) -> str:
    if not isinstance(user, str) or not user or len(user) > MAX_USER or _CONTROL.search(user):
        raise EASRequestError(f"{what} is not a user name")
    return user


def _base64(token: str, scheme: str) -> bytes:
    try:
        return binascii.a2b_base64(token, strict_mode=True)
    except (binascii.Error, ValueError):
        raise EASRequestError(f"Authorization {scheme} token is not valid base64") from None


def _b64url_json(segment: str):
    raw = segment.encode("ascii")          # _TOKEN68 matched: ASCII
    if not _B64URL.fullmatch(raw) or len(raw) % 4 == 1:
        return None
    try:
        return _claims_decoder.decode(binascii.a2b_base64(
            raw.replace(b"-", b"+").replace(b"_", b"/") + b"=" * (-len(raw) % 4), strict_mode=True))
    except (binascii.Error, ValueError, msgspec.DecodeError):
        return None


def bare_user(name: str) -> str:
    """A user name without DOMAIN\\ and @domain, lower-cased: what User= must agree on."""
    return name.rpartition("\\")[2].partition("@")[0].lower()


def same_user(query_user: str, credential_user: str) -> bool:
    """Whether the device's User= and the credential's user name the same person."""
    return query_user == credential_user or bare_user(query_user) == bare_user(credential_user)
