"""Session ticket keys shared by a serve's workers (proxy/tickets.py, proxy/_tickets.pyx), in one process.

Two server SSLContexts stand for two workers (each has OpenSSL's own ticket keys until the
shared ring's callback is set on it); the handshakes run over memory BIOs with trustme
certificates, and the client's ``session_reused`` is the oracle. The ring is process-wide
(as in a worker), so every test sets the one it needs.
"""
from __future__ import annotations

import ctypes
import ssl
import time

import pytest
import trio
import trio.testing
import trustme

from seg_fast import openssl
from seg_fast.proxy import channel, tickets

_tickets = pytest.importorskip("seg_fast.proxy._tickets")


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


@pytest.fixture(scope="module")
def cert(ca):
    return ca.issue_cert("localhost")


def server_context(cert) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    cert.configure_cert(ctx)
    return ctx


def client_context(ca, version=None) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    if version is not None:
        ctx.minimum_version = ctx.maximum_version = version
    return ctx


def handshake(server_ctx, client_ctx, session=None):
    """One connection over memory BIOs: (the client's SSLObject, with its tickets read)."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="localhost", session=session)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = [False, False]
    for _ in range(20):
        for i, side in enumerate((client, server)):
            if not done[i]:
                try:
                    side.do_handshake()
                    done[i] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done):
            break
    assert all(done), "handshake did not finish"
    server.write(b"hello")                    # TLS 1.3 tickets come after the handshake
    c_in.write(s_out.read())
    assert client.read(5) == b"hello"
    return client


def key_named(byte: int) -> bytes:
    return bytes([byte]) * 16 + tickets.new_key()[16:]


@pytest.fixture
def shared():
    """The callback bound (skip where this Python cannot). After the test, this process's keys are
    set on no further context: TLS contexts of later tests in the same run keep OpenSSL's own."""
    tickets._state.pop("lib", None)
    lib = tickets._bind()
    if isinstance(lib, str):
        pytest.skip(lib)
    yield lib
    tickets.keyed = None
    tickets._state["lib"] = "switched off after a test"


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2])
def test_ticket_of_one_worker_resumes_on_another(shared, ca, cert, version):
    a, b = server_context(cert), server_context(cert)
    client = client_context(ca, version)
    # Without shared keys (OpenSSL's own per SSL_CTX): A's ticket resumes on A only.
    first = handshake(a, client)
    assert first.version() == version.name.replace("v1_", "v1.") and first.session.has_ticket
    assert handshake(a, client, first.session).session_reused
    assert not handshake(b, client, first.session).session_reused
    # The shared ring's callback on both: A's ticket resumes on B, B's on A.
    ring = tickets.Ring()
    tickets.use(ring.message())
    for ctx in (a, b):
        tickets.key(ctx)
    before = tickets.counts()
    first = handshake(a, client)
    assert not first.session_reused
    made = tickets.counts()["made"]
    again = handshake(b, client, first.session)
    assert again.session_reused
    # Each resumption brings a new ticket (as OpenSSL's own keys do for TLS 1.3): none is used twice.
    assert again.session.id != first.session.id and tickets.counts()["made"] > made
    assert handshake(a, client, again.session).session_reused
    after = tickets.counts()
    assert after["made"] > before["made"] and after["opened"] >= before["opened"] + 2


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2])
def test_counts_and_metrics(shared, ca, cert, version):
    """What /metrics gets (tickets.metrics): a full handshake issues tickets and renews none; a
    resumption is accepted and every ticket it brings counts as renewed; a ticket under no key
    of the ring is refused; the key's age runs from when it became current."""
    ctx, client = server_context(cert), client_context(ca, version)
    ring = tickets.Ring()
    tickets.use(ring.message())
    tickets.key(ctx)
    c0 = tickets.counts()
    first = handshake(ctx, client)
    c1 = tickets.counts()
    assert not first.session_reused and c1["made"] > c0["made"]
    assert c1["renewed"] == c0["renewed"] and c1["opened"] == c0["opened"]
    again = handshake(ctx, client, first.session)
    c2 = tickets.counts()
    assert again.session_reused and c2["opened"] == c1["opened"] + 1
    assert c2["renewed"] - c1["renewed"] == c2["made"] - c1["made"] >= 1
    foreign = handshake(server_context(cert), client)          # OpenSSL's own keys: not ours
    tickets.key(ctx)
    assert not handshake(ctx, client, foreign.session).session_reused
    c3 = tickets.counts()
    assert c3["unknown"] == c2["unknown"] + 1
    m = tickets.metrics(now=ring.since + 5)
    assert m == {"issued": c3["made"], "renewed": c3["renewed"], "accepted_current": c3["opened"],
                 "accepted_other": c3["older"], "refused": c3["unknown"], "key_age_s": 5.0}
    ring.rotate()
    tickets.use(ring.message())
    assert tickets.metrics(now=ring.since + 1)["key_age_s"] == 1.0


def test_no_metrics_without_the_control_process_keys(shared):
    tickets._state.pop("since", None)
    assert tickets.metrics() == {}


def test_rotation_previous_still_opens_then_dropped(shared, ca, cert):
    ctx, client = server_context(cert), client_context(ca)
    ring = tickets.Ring()
    tickets.use(ring.message())
    tickets.key(ctx)
    old = handshake(ctx, client).session
    ring.rotate()                             # old's key is now "previous"
    tickets.use(ring.message())
    before = tickets.counts()
    renewed = handshake(ctx, client, old)
    assert renewed.session_reused
    assert tickets.counts()["older"] == before["older"] + 1
    ring.rotate()                             # old's key dropped from the ring
    tickets.use(ring.message())
    before = tickets.counts()
    assert not handshake(ctx, client, old).session_reused
    assert tickets.counts()["unknown"] == before["unknown"] + 1
    # The ticket the renewed resumption brought (made under the then current key) still opens.
    assert handshake(ctx, client, renewed.session).session_reused


def test_a_worker_still_on_the_old_ring_opens_tickets_of_the_new(shared, ca, cert):
    """Workers take a new ring one after the other: the new current was every worker's *next*."""
    ctx, client = server_context(cert), client_context(ca)
    ring = tickets.Ring()
    old_message = ring.message()
    ring.rotate()
    tickets.use(ring.message())               # worker A has rotated
    tickets.key(ctx)
    session = handshake(ctx, client).session
    tickets.use(old_message)                  # worker B has not yet
    assert handshake(ctx, client, session).session_reused


def test_openssl_1_1_callback_api(shared, ca, cert):
    """The HMAC_CTX callback (OpenSSL 1.1's only one; still in OpenSSL 3) opens and makes tickets too."""
    libssl, libcrypto = openssl.libssl(), openssl.libcrypto()
    addr = openssl.address
    for name in ("EVP_aes_256_cbc", "EVP_sha256"):
        getattr(libcrypto, name).restype = ctypes.c_void_p
    try:
        _tickets.init(True, addr(libcrypto, "RAND_bytes"), addr(libcrypto, "EVP_EncryptInit_ex"),
                      addr(libcrypto, "EVP_DecryptInit_ex"), addr(libcrypto, "HMAC_Init_ex"),
                      addr(libssl, "SSL_CTX_callback_ctrl"), libcrypto.EVP_aes_256_cbc(), libcrypto.EVP_sha256())
        a, b, client = server_context(cert), server_context(cert), client_context(ca)
        tickets.use(tickets.Ring().message())
        for ctx in (a, b):
            tickets.keyed = None
            tickets.key(ctx)
        assert handshake(b, client, handshake(a, client).session).session_reused
    finally:
        tickets._state.clear()                # the next _bind() sets the OpenSSL 3 callback again
        tickets._bind()


def test_ring_framing_and_refusals(shared):
    ring = tickets.Ring()
    keys = tickets.keys_of(ring.message())
    assert keys[:80] == ring.current and keys[80:160] == ring.next and len(keys) == 160
    ring.rotate()
    assert tickets.keys_of(ring.message())[160:] == ring.previous
    assert abs(tickets.since_of(ring.message()) - ring.since) < 1e-6 and ring.since <= time.time()
    for bad in (b"", tickets.MAGIC + b"x" * (8 + 80), b"XXXXX" + b"x" * (8 + 160), ring.message() + b"x",
                b"SFTK1" + ring.message()[5 + 8:]):
        with pytest.raises(ValueError):
            tickets.keys_of(bad)
    with pytest.raises(ValueError, match="same name"):
        shared.set_keys(key_named(1) + key_named(1))
    with pytest.raises(ValueError):
        shared.set_keys(b"x" * 79)
    with pytest.raises(ValueError):
        shared.set_keys(b"x" * 80 * 5)


def test_ssl_ctx_of_is_proven_per_context(shared, cert):
    a, b = server_context(cert), server_context(cert)
    pa, pb = openssl.ssl_ctx_of(a), openssl.ssl_ctx_of(b)
    assert pa and pb and pa != pb


def test_keeper_sends_each_ring_to_every_worker(shared):
    hub = channel.Hub()
    keeper = tickets.Keeper(3600, hub)
    ours1, theirs1 = hub.pair(keeper.first())
    ours2, theirs2 = hub.pair(keeper.first())
    hub.started(1, ours1)
    hub.started(2, ours2)
    assert tickets.keys_of(theirs1.recv(1024)) == tickets.keys_of(keeper.ring.message())
    theirs2.recv(1024)
    current = keeper.ring.current
    keeper.rotate()
    for theirs in (theirs1, theirs2):
        got = tickets.keys_of(theirs.recv(1024))
        assert got[:80] == keeper.ring.current and got[160:] == current
    theirs2.close()                           # a worker gone: dropped on the next send
    keeper.rotate()
    assert list(hub.channels) == [1] and theirs1.recv(1024)
    hub.close()
    assert theirs1.recv(1024) == b""          # the worker sees EOF
    theirs1.close()


def test_keeper_rotates_on_its_schedule(shared):
    async def main():
        keeper = tickets.Keeper(3600, channel.Hub())
        first = keeper.ring.current
        async with trio.open_nursery() as nursery:
            nursery.start_soon(keeper.run)
            await trio.sleep(3600 * 2 + 1)
            nursery.cancel_scope.cancel()
        assert keeper.ring.previous is not None and first not in (keeper.ring.current, keeper.ring.previous)
        return keeper

    clock = trio.testing.MockClock(autojump_threshold=0)
    keeper = trio.run(main, clock=clock)
    assert keeper.ring.previous != keeper.ring.current


def test_rotation_setting_is_checked(tmp_path):
    from seg_fast.config import load_config
    from seg_fast.errors import ConfigError

    cfg = tmp_path / "gw.toml"
    cfg.write_text("[listener]\ntls_ticket_key_rotation = 30\n")
    with pytest.raises(ConfigError, match=r"gw.toml: key listener.tls_ticket_key_rotation: must be at least 60"):
        load_config(cfg, env={})
    cfg.write_text("[listener]\ntls_ticket_key_rotation = 86400\n")
    assert load_config(cfg, env={}).listener.tls_ticket_key_rotation == 86400
    assert load_config(None, env={}).listener.tls_ticket_key_rotation == 3600


def test_metrics_families_sum_the_workers():
    """stats.total + admin/metrics.render (read back by prometheus_client's parser): counters
    summed over the workers, the key age the oldest worker's; no family without shared keys."""
    parser = pytest.importorskip("prometheus_client.parser")
    from seg_fast.admin.metrics import render
    from seg_fast.stats import WorkerSnapshot

    def figures(issued, renewed, current, other, refused, age):
        return {"issued": issued, "renewed": renewed, "accepted_current": current, "accepted_other": other,
                "refused": refused, "key_age_s": age}

    now = time.time()
    snaps = [WorkerSnapshot(pid=11, ts=now, tls_tickets=figures(7, 3, 3, 1, 2, 10.5)),
             WorkerSnapshot(pid=12, ts=now, tls_tickets=figures(5, 4, 2, 2, 0, 12.25))]
    fams = {f.name: f for f in parser.text_string_to_metric_families(render(snaps))}

    def one(family, **labels):
        found = [s.value for s in fams[family].samples if s.labels == labels and not s.name.endswith("_created")]
        assert len(found) == 1, (family, labels, found)
        return found[0]

    assert one("seg_fast_tls_tickets_issued") == 12 and one("seg_fast_tls_tickets_renewed") == 7
    assert one("seg_fast_tls_tickets_accepted", key="current") == 5
    assert one("seg_fast_tls_tickets_accepted", key="other") == 3
    assert one("seg_fast_tls_tickets_refused") == 2 and one("seg_fast_tls_ticket_key_age_seconds") == 12.25
    assert one("seg_fast_worker_tls_tickets_refused", worker="11") == 2
    assert one("seg_fast_worker_tls_ticket_key_age_seconds", worker="11") == 10.5
    assert "tls_ticket" not in render([WorkerSnapshot(pid=13, ts=now)])
