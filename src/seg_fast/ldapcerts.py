"""S/MIME certificates from an LDAP directory (the guide's "S/MIME repository lookup").

A small LDAPv3 client of our own (RFC 4511 BER, RFC 4515 filters, RFC 4513 simple
bind, StartTLS or ldaps://) on trio, rather than ldap3 in a thread: a lookup is a
few hundred bytes each way, and owning the reader lets every answer be bounded (a
message past ``max_message_bytes``, too many entries or values end the lookup, not
the worker), lets a deadline cancel it like any other trio I/O, and needs no
thread pool. One connection per batch of recipients carries their searches
pipelined (one message id each). Results are cached per address with a TTL
(shorter for "none found"); a directory that cannot be reached answers "unknown",
is counted, and is left alone for a short back-off so a dead server does not cost
every request its timeout.
"""
from __future__ import annotations

import datetime
import os
import ssl
import time
from typing import Iterable, Literal, NamedTuple
from urllib.parse import unquote, urlsplit

import msgspec
import trio

from seg_fast.errors import ConfigError, SegFastError

STARTTLS_OID = b"1.3.6.1.4.1.1466.20037"
PIPELINE = 32                     # searches outstanding on one connection at a time


class SmimeSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """The [smime] section: the guide's S/MIME repository lookup settings."""
    # ldaps://host[:636] or ldap://host[:389]; empty: no lookups (answers pass as they are).
    ldap_url: str = ""
    ldap_starttls: bool = True       # ldap:// only: StartTLS before the bind (off: plain text)
    ldap_verify_tls: bool = True     # off = ignore the directory's certificate errors
    ldap_ca_file: str = ""
    ldap_auth: Literal["anonymous", "simple"] = "anonymous"   # the guide's Anonymous / Basic
    ldap_user: str = ""              # bind DN for simple authentication
    ldap_password_file: str = ""     # its password: the file's first line ...
    ldap_password_env: str = ""      # ... or the environment variable this names
    ldap_base_dn: str = ""           # where to search (subtree); a DN in ldap_url's path wins
    ldap_filter: str = "(mail={email})"     # {email} is the recipient, RFC 4515-escaped
    certificate_attribute: str = "userCertificate;binary"
    ldap_timeout: float = 5.0        # one batch of lookups, connect to last answer
    ldap_retry_after: float = 10.0   # after a failure, answers pass unchanged this long
    ldap_max_connections: int = 4    # per worker, at once
    cache_ttl: float = 3600.0        # certificates found, per address
    negative_cache_ttl: float = 300.0   # "none found"
    cache_entries: int = 10_000      # per worker
    max_lookups_per_request: int = 100  # recipients looked up per ResolveRecipients
    max_entries: int = 5             # directory entries per recipient (the search's size limit)
    max_certificates: int = 10       # certificate values kept per recipient
    max_certificate_bytes: int = 16 * 1024
    max_message_bytes: int = 1024 * 1024    # largest directory message read


def config_problems(config) -> list[tuple[str, str]]:
    """[smime] checks for load_config: (key, problem) pairs."""
    s = config.smime
    if not s.ldap_url:
        return []
    out = []
    for key in ("ldap_timeout", "ldap_max_connections", "cache_entries", "max_lookups_per_request",
                "max_entries", "max_certificates", "max_certificate_bytes", "max_message_bytes"):
        if getattr(s, key) <= 0:
            out.append((f"smime.{key}", "must be positive"))
    try:
        d = directory_from(s)
    except ConfigError as exc:
        key, _, text = str(exc).removeprefix("key ").partition(": ")
        return out + [(key, text)]
    if d.password and d.tls == "none" and not (d.host in ("localhost", "::1") or d.host.startswith("127.")):
        out.append(("smime.ldap_starttls", "a simple bind would send the password in plain text: use "
                                           "ldaps:// or StartTLS"))
    return out


class LdapError(SegFastError):
    """The directory could not be reached, refused the bind, or answered out of bounds."""


# -- BER (only what LDAP needs) ----------------------------------------------------------------

def _len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def tlv(tag: int, value: bytes) -> bytes:
    return bytes([tag]) + _len(len(value)) + value


def ber_int(n: int, tag: int = 0x02) -> bytes:
    return tlv(tag, n.to_bytes(max(1, (n.bit_length() + 8) // 8), "big", signed=True))


def ber_str(s: bytes | str, tag: int = 0x04) -> bytes:
    return tlv(tag, s.encode() if isinstance(s, str) else s)


def seq(*parts: bytes, tag: int = 0x30) -> bytes:
    return tlv(tag, b"".join(parts))


def read_tlv(buf: bytes | memoryview, pos: int, end: int) -> tuple[int, int, int]:
    """(tag, start of value, end of value) of the element at ``pos``; LdapError if it overruns ``end``."""
    if pos + 2 > end:
        raise LdapError("truncated BER element")
    tag = buf[pos]
    if tag & 0x1F == 0x1F:
        raise LdapError("multi-byte BER tags are not LDAP")
    first = buf[pos + 1]
    pos += 2
    if first < 0x80:
        length = first
    else:
        n = first & 0x7F
        if n == 0 or n > 4:                       # indefinite, or 4 GiB and more: not from a directory
            raise LdapError("BER length form not allowed")
        if pos + n > end:
            raise LdapError("truncated BER length")
        length = int.from_bytes(buf[pos:pos + n], "big")
        pos += n
    if pos + length > end:
        raise LdapError("BER element longer than its container")
    return tag, pos, pos + length


def children(buf, start: int, end: int) -> Iterable[tuple[int, int, int]]:
    pos = start
    while pos < end:
        tag, s, e = read_tlv(buf, pos, end)
        yield tag, s, e
        pos = e


def _next(it) -> tuple[int, int, int]:
    # A missing element is the directory's error, not a StopIteration (which a coroutine
    # would turn into RuntimeError).
    try:
        return next(it)
    except StopIteration:
        raise LdapError("LDAP message lacks an element") from None


def _int_of(buf, s: int, e: int) -> int:
    if e - s > 8:
        raise LdapError("integer too large")
    return int.from_bytes(buf[s:e], "big", signed=True)


# -- RFC 4515 filters --------------------------------------------------------------------------

def escape_value(value: str) -> str:
    """RFC 4515 3: an assertion value with its specials escaped (no injection through it)."""
    out = []
    for ch in value:
        if ch in "*()\\\0":
            out.append("\\%02x" % ord(ch))
        else:
            out.append(ch)
    return "".join(out)


def _unescape(raw: str) -> bytes:
    data = raw.encode("utf-8")
    out = bytearray()
    i = 0
    while i < len(data):
        if data[i:i + 1] == b"\\":
            pair = data[i + 1:i + 3]
            try:
                out.append(int(pair, 16))
            except ValueError:
                raise ValueError(f"bad escape in filter value: {raw!r}") from None
            if len(pair) != 2:
                raise ValueError(f"bad escape in filter value: {raw!r}")
            i += 3
        else:
            out.append(data[i])
            i += 1
    return bytes(out)


def compile_filter(text: str) -> bytes:
    """An RFC 4515 filter string as its BER encoding (ValueError when malformed)."""
    node, pos = _filter(text, 0, 0)
    if pos != len(text):
        raise ValueError(f"text after the filter at {pos}")
    return node


def _filter(t: str, pos: int, depth: int) -> tuple[bytes, int]:
    if depth > 32:
        raise ValueError("filter nested too deeply")
    if t[pos:pos + 1] != "(":
        raise ValueError(f"expected '(' at {pos}")
    pos += 1
    op = t[pos:pos + 1]
    if op in ("&", "|"):
        parts = []
        pos += 1
        while t[pos:pos + 1] == "(":
            node, pos = _filter(t, pos, depth + 1)
            parts.append(node)
        if not parts:
            raise ValueError("empty & or | filter")
        node = tlv(0xA0 if op == "&" else 0xA1, b"".join(parts))
    elif op == "!":
        inner, pos = _filter(t, pos + 1, depth + 1)
        node = tlv(0xA2, inner)
    else:
        end = t.find(")", pos)
        if end < 0:
            raise ValueError("unclosed filter item")
        node = _item(t[pos:end])
        pos = end
    if t[pos:pos + 1] != ")":
        raise ValueError(f"expected ')' at {pos}")
    return node, pos + 1


def _item(item: str) -> bytes:
    # The first "=" ends the attribute description (which cannot hold "=", "<", ">" or "~");
    # everything after it is the value, whatever it holds.
    eq = item.find("=")
    if eq <= 0:
        raise ValueError(f"no attribute and '=' in filter item {item!r}")
    op = item[eq - 1]
    value = item[eq + 1:]
    if op in "<>~":
        attr = _attr(item[:eq - 1])
        return seq(ber_str(attr), ber_str(_unescape(value)), tag={">": 0xA5, "<": 0xA6, "~": 0xA8}[op])
    attr = _attr(item[:eq])
    if value == "*":
        return tlv(0x87, attr.encode())
    if "*" not in value:
        return seq(ber_str(attr), ber_str(_unescape(value)), tag=0xA3)
    pieces = value.split("*")
    subs = []
    if pieces[0]:
        subs.append(ber_str(_unescape(pieces[0]), 0x80))
    for mid in pieces[1:-1]:
        if mid:
            subs.append(ber_str(_unescape(mid), 0x81))
    if pieces[-1]:
        subs.append(ber_str(_unescape(pieces[-1]), 0x82))
    return seq(ber_str(attr), seq(*subs), tag=0xA4)


def _attr(name: str) -> str:
    if not name or not all(c.isalnum() or c in "-;." for c in name):
        raise ValueError(f"bad attribute description {name!r}")
    return name


# -- the client --------------------------------------------------------------------------------

class Directory(NamedTuple):
    """What a lookup needs, read once from the [smime] settings."""
    host: str
    port: int
    tls: str                      # "ldaps" | "starttls" | "none"
    ssl_context: ssl.SSLContext | None
    bind_dn: str
    password: bytes               # empty: anonymous
    base_dn: str
    filter_template: str
    attribute: str
    timeout: float
    max_message_bytes: int
    max_entries: int
    max_values: int


def directory_from(settings) -> Directory:
    """The [smime] section made usable; ConfigError naming the key for anything wrong."""
    parts = urlsplit(settings.ldap_url)
    if parts.scheme not in ("ldap", "ldaps") or not parts.hostname:
        raise ConfigError("key smime.ldap_url: must be an ldap:// or ldaps:// URL with a host")
    tls = "ldaps" if parts.scheme == "ldaps" else ("starttls" if settings.ldap_starttls else "none")
    ctx = None
    if tls != "none":
        try:
            ctx = ssl.create_default_context(cafile=settings.ldap_ca_file or None)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"key smime.ldap_ca_file: {settings.ldap_ca_file}: cannot be used as CA file "
                              f"({getattr(exc, 'strerror', None) or exc})") from None
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if not settings.ldap_verify_tls:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
    password = b""
    if settings.ldap_auth == "simple":
        password = read_secret(settings.ldap_password_file, settings.ldap_password_env,
                               "smime.ldap_password_file", "smime.ldap_password_env")
        if not settings.ldap_user:
            raise ConfigError("key smime.ldap_user: simple bind needs a user DN")
    try:
        compile_filter(settings.ldap_filter.replace("{email}", "x"))
    except ValueError as exc:
        raise ConfigError(f"key smime.ldap_filter: not an RFC 4515 filter: {exc}") from None
    if "{email}" not in settings.ldap_filter:
        raise ConfigError("key smime.ldap_filter: must contain {email}")
    return Directory(parts.hostname, parts.port or (636 if tls == "ldaps" else 389), tls, ctx,
                     settings.ldap_user if settings.ldap_auth == "simple" else "", password,
                     unquote(parts.path.lstrip("/")) or settings.ldap_base_dn, settings.ldap_filter,
                     settings.certificate_attribute, settings.ldap_timeout, settings.max_message_bytes,
                     settings.max_entries, settings.max_certificates)


def read_secret(path: str, env_name: str, path_key: str, env_key: str) -> bytes:
    """A password from a file (first line) or from the variable an env key names; never from argv."""
    if path:
        try:
            return open(path, "rb").read().split(b"\n", 1)[0].rstrip(b"\r")
        except OSError as exc:
            raise ConfigError(f"key {path_key}: {path}: {exc.strerror}") from None
    if env_name:
        value = os.environ.get(env_name)
        if value is None:
            raise ConfigError(f"key {env_key}: environment variable {env_name} is not set")
        return value.encode()
    raise ConfigError(f"key {path_key}: a password is needed (a file, or {env_key} naming a variable)")


class _Conn:
    """One LDAP connection: framed reads bounded by max_message_bytes."""

    def __init__(self, stream, limit: int):
        self.stream = stream
        self.limit = limit
        self.buf = bytearray()
        self.next_id = 0

    def msgid(self) -> int:
        self.next_id += 1
        return self.next_id

    async def send(self, msgid: int, op: bytes) -> None:
        await self.stream.send_all(seq(ber_int(msgid), op))

    async def receive(self) -> tuple[int, int, bytes]:
        """(message id, protocolOp tag, whole message) of the next message."""
        while True:
            size = self._framed()
            if size is not None:
                msg = bytes(self.buf[:size])
                del self.buf[:size]
                tag, s, e = read_tlv(msg, 0, len(msg))
                if tag != 0x30:
                    raise LdapError("LDAP message is not a SEQUENCE")
                it = children(msg, s, e)
                t, a, b = _next(it)
                if t != 0x02:
                    raise LdapError("LDAP message without an id")
                op_tag, _, _ = _next(it)
                return _int_of(msg, a, b), op_tag, msg
            data = await self.stream.receive_some(65536)
            if not data:
                raise LdapError("directory closed the connection")
            self.buf += data

    def _framed(self) -> int | None:
        """Size of the first whole message in the buffer (LdapError past the limit)."""
        buf = self.buf
        if len(buf) < 2:
            return None
        first = buf[1]
        head = 2 if first < 0x80 else 2 + (first & 0x7F)
        if first >= 0x80 and not 1 <= first & 0x7F <= 4:
            raise LdapError("BER length form not allowed")
        if len(buf) < head:
            return None
        length = first if first < 0x80 else int.from_bytes(buf[2:head], "big")
        if head + length > self.limit:
            raise LdapError(f"directory message of {head + length} bytes is over smime.max_message_bytes")
        return head + length if len(buf) >= head + length else None


def _result_code(msg: bytes, op_start: int) -> tuple[int, str]:
    tag, s, e = read_tlv(msg, op_start, len(msg))
    it = children(msg, s, e)
    t, a, b = _next(it)
    code = _int_of(msg, a, b)
    _next(it)
    t, a, b = _next(it)
    return code, bytes(msg[a:b]).decode("utf-8", "replace")[:200]


def _op_start(msg: bytes) -> int:
    _, s, e = read_tlv(msg, 0, len(msg))
    _, _, id_end = read_tlv(msg, s, e)
    return id_end


async def _open(d: Directory) -> _Conn:
    stream = await trio.open_tcp_stream(d.host, d.port)
    try:
        if d.tls == "ldaps":
            stream = trio.SSLStream(stream, d.ssl_context, server_hostname=d.host)
            await stream.do_handshake()
        conn = _Conn(stream, d.max_message_bytes)
        if d.tls == "starttls":
            mid = conn.msgid()
            await conn.send(mid, seq(ber_str(STARTTLS_OID, 0x80), tag=0x77))
            got, op, msg = await conn.receive()
            if got != mid or op != 0x78:
                raise LdapError("directory answered StartTLS with something else")
            code, diag = _result_code(msg, _op_start(msg))
            if code != 0:
                raise LdapError(f"directory refused StartTLS (result {code})")
            if conn.buf:
                raise LdapError("directory sent data before the TLS handshake")
            conn.stream = trio.SSLStream(stream, d.ssl_context, server_hostname=d.host)
            await conn.stream.do_handshake()
        mid = conn.msgid()
        auth = ber_str(d.password, 0x80)
        await conn.send(mid, seq(ber_int(3), ber_str(d.bind_dn), auth, tag=0x60))
        got, op, msg = await conn.receive()
        if got != mid or op != 0x61:
            raise LdapError("directory answered the bind with something else")
        code, diag = _result_code(msg, _op_start(msg))
        if code != 0:
            # The diagnostic text is the directory's; the password never appears in it.
            raise LdapError(f"bind as {d.bind_dn or '(anonymous)'} refused (result {code}: {diag[:100]})")
        return conn
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise


def _search_op(d: Directory, email: str) -> bytes:
    flt = compile_filter(d.filter_template.replace("{email}", escape_value(email)))
    return seq(ber_str(d.base_dn), ber_int(2, 0x0A), ber_int(0, 0x0A), ber_int(d.max_entries),
               ber_int(max(1, int(d.timeout))), tlv(0x01, b"\x00"), flt, seq(ber_str(d.attribute)), tag=0x63)


def _values(msg: bytes, d: Directory) -> list[bytes]:
    """The configured attribute's values in one SearchResultEntry."""
    base = d.attribute.split(";", 1)[0].lower()
    out = []
    tag, s, e = read_tlv(msg, _op_start(msg), len(msg))
    it = children(msg, s, e)
    _next(it)                                      # objectName
    t, a, b = _next(it)                            # attributes
    for t2, a2, b2 in children(msg, a, b):
        parts = children(msg, a2, b2)
        t3, a3, b3 = _next(parts)
        name = bytes(msg[a3:b3]).decode("utf-8", "replace").lower()
        if name.split(";", 1)[0] != base:
            continue
        t4, a4, b4 = _next(parts)
        for _, a5, b5 in children(msg, a4, b4):
            out.append(bytes(msg[a5:b5]))
    return out


async def search_many(d: Directory, emails: list[str]) -> dict[str, list[bytes]]:
    """Raw attribute values per address, all searches on one connection (pipelined)."""
    found: dict[str, list[bytes]] = {}
    conn = await _open(d)
    try:
        todo = list(emails)
        while todo:
            batch, todo = todo[:PIPELINE], todo[PIPELINE:]
            pending: dict[int, str] = {}
            for email in batch:
                mid = conn.msgid()
                pending[mid] = email
                found[email] = []
                await conn.send(mid, _search_op(d, email))
            entries: dict[int, int] = {}
            references = 0
            while pending:
                mid, op, msg = await conn.receive()
                if mid not in pending:
                    if mid == 0:
                        raise LdapError("directory ended the connection (notice of disconnection)")
                    raise LdapError(f"directory answered message id {mid} nobody asked about")
                if op == 0x64:                     # SearchResultEntry
                    entries[mid] = entries.get(mid, 0) + 1
                    if entries[mid] > d.max_entries:
                        raise LdapError("directory returned more entries than asked for")
                    values = found[pending[mid]]
                    values.extend(_values(msg, d))
                    if len(values) > d.max_values:
                        del values[d.max_values:]
                elif op == 0x65:                   # SearchResultDone
                    code, _ = _result_code(msg, _op_start(msg))
                    # 0 success, 4 sizeLimitExceeded (entries up to the limit came), 32 noSuchObject
                    if code not in (0, 4, 32):
                        raise LdapError(f"search failed (result {code})")
                    del pending[mid]
                elif op == 0x73:                   # SearchResultReference: referrals are not followed
                    references += 1
                    if references > d.max_entries * PIPELINE:
                        raise LdapError("directory sent too many referrals")
                else:
                    raise LdapError(f"unexpected LDAP operation 0x{op:02x}")
        try:
            await conn.send(conn.msgid(), b"\x42\x00")    # unbind
        except (trio.BrokenResourceError, OSError):
            pass
    finally:
        await trio.aclose_forcefully(conn.stream)
    return found


# -- certificates, cache, lookups ---------------------------------------------------------------

def usable_certificates(values: list[bytes], email: str, max_bytes: int) -> list[bytes]:
    """DER certificates that parse, are valid now and name ``email`` (SAN rfc822Name or
    the subject's emailAddress): a directory entry cannot hand out someone else's key."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    want = email.lower()
    out = []
    for der in values:
        if len(der) > max_bytes:
            continue
        try:
            cert = x509.load_der_x509_certificate(der)
            if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
                continue
            names = {a.value.lower() for a in cert.subject.get_attributes_for_oid(NameOID.EMAIL_ADDRESS)
                     if isinstance(a.value, str)}
            try:
                san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                names.update(n.lower() for n in san.get_values_for_type(x509.RFC822Name))
            except x509.ExtensionNotFound:
                pass
        except ValueError:
            continue
        if want in names and der not in out:
            out.append(der)
    return out


def looks_like_address(email: str) -> bool:
    """Worth asking the directory about: one @, bounded, printable, no spaces."""
    return (0 < len(email) <= 320 and email.count("@") == 1 and email.isprintable()
            and not any(c.isspace() for c in email) and not email.startswith("@") and not email.endswith("@"))


class CertLookup:
    """Per worker: cached, bounded lookups of recipients' certificates."""

    def __init__(self, settings, incidents=None, directory: Directory | None = None):
        self.settings = settings
        self.directory = directory or directory_from(settings)
        self.incidents = incidents
        self.cache: dict[str, tuple[float, tuple[bytes, ...]]] = {}
        self.limiter = trio.CapacityLimiter(max(1, settings.ldap_max_connections))
        self.down_until = 0.0
        self.counts = {"lookups": 0, "cache_hits": 0, "found": 0, "unavailable": 0}

    def cached(self, email: str) -> tuple[bytes, ...] | None:
        hit = self.cache.get(email.lower())
        if hit is None:
            return None
        if hit[0] < time.monotonic():
            del self.cache[email.lower()]
            return None
        return hit[1]

    def _store(self, email: str, certs: tuple[bytes, ...]) -> None:
        s = self.settings
        ttl = s.cache_ttl if certs else s.negative_cache_ttl
        if ttl <= 0:
            return
        if len(self.cache) >= s.cache_entries:
            # Oldest first (dicts keep insertion order): a flood of new names cannot grow it.
            for key in list(self.cache)[:max(1, s.cache_entries // 10)]:
                del self.cache[key]
        self.cache[email.lower()] = (time.monotonic() + ttl, certs)

    async def lookup(self, emails: list[str]) -> dict[str, tuple[bytes, ...]] | None:
        """Certificates per address (empty: none found); None when the directory is unavailable."""
        result: dict[str, tuple[bytes, ...]] = {}
        missing = []
        for email in dict.fromkeys(e.lower() for e in emails):
            hit = self.cached(email)
            if hit is not None:
                self.counts["cache_hits"] += 1
                result[email] = hit
            else:
                missing.append(email)
        if not missing:
            return result
        if time.monotonic() < self.down_until:
            self._unavailable("directory failed recently (back-off)", len(missing))
            return None
        self.counts["lookups"] += len(missing)
        try:
            with trio.fail_after(self.settings.ldap_timeout):
                async with self.limiter:
                    raw = await search_many(self.directory, missing)
        except (trio.TooSlowError, OSError, trio.BrokenResourceError, ssl.SSLError, LdapError) as exc:
            cause = exc.__cause__ or exc          # trio wraps the ssl error in BrokenResourceError
            reason = "timed out" if isinstance(exc, trio.TooSlowError) else \
                (str(exc) if isinstance(exc, LdapError) else f"{type(cause).__name__}: {cause}")
            self.down_until = time.monotonic() + self.settings.ldap_retry_after
            self._unavailable(reason, len(missing))
            return None
        for email in missing:
            certs = tuple(usable_certificates(raw.get(email, []), email, self.settings.max_certificate_bytes))
            if certs:
                self.counts["found"] += 1
            self._store(email, certs)
            result[email] = certs
        return result

    def _unavailable(self, reason: str, n: int) -> None:
        self.counts["unavailable"] += 1
        if self.incidents is not None:
            self.incidents.note("smime_ldap_unavailable", reason=reason[:200], recipients=n)
