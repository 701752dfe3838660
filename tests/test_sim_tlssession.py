"""The fleet's TLS sessions set without CPython's copy (sim/tlssession.py): a session so
set is resumed by a real TLS 1.3 server, one session serves many connections, a
session OpenSSL marked not resumable goes to CPython's copy (so a device resumes as
often as before), and the layout check refuses objects it cannot prove."""
from __future__ import annotations

import socket
import ssl
import threading

import pytest

from seg_fast.sim import tlssession
from seg_fast.sim.wire import TlsStream
from tls_contexts import server_and_client

NAME = "mail.seg-fast.test"


@pytest.fixture(scope="module")
def tls():
    server, client = server_and_client(NAME)
    client.minimum_version = ssl.TLSVersion.TLSv1_3
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(64)
    ls.settimeout(0.5)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                c, _ = ls.accept()
            except OSError:
                continue
            c.settimeout(10)
            try:
                s = server.wrap_socket(c, server_side=True)
                s.sendall(b"hello")         # the tickets go out before this
                s.recv(1)
                # Read on to the client's close_notify (or its close) before closing: closed
                # with it unread, this socket would answer with a reset, and a client whose
                # second SSL_shutdown call reads that reset marks its session not resumable
                # (seen with the process on one CPU, where the server thread runs late).
                try:
                    s.recv(1)
                except OSError:
                    pass
                s.close()
            except OSError:
                c.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield client, ls.getsockname()
    stop.set()
    t.join(5)
    ls.close()


def exchange(client, addr, session=None, polite=True, read=True, by_reference=False):
    """One connection: (its session, whether it resumed ``session``). ``read`` False:
    closed right after the handshake, before the server's new tickets are read (the
    connection still holds ``session`` itself). ``by_reference``: the session read as
    ``TlsStream.session`` gives it (a tlssession.Session reference), not CPython's copy."""
    sock = socket.create_connection(addr, timeout=10)
    stream = TlsStream(sock, client, server_hostname=NAME, session=session)
    obj = stream.ssl
    obj.do_handshake()
    reused = obj.session_reused
    if read:
        assert obj.read(5) == b"hello"
    got = stream.session if by_reference else obj.session
    if not read:
        sock.close()
        return got, reused
    obj.write(b"y")
    if polite:                      # TlsStream.close's way: our close_notify, no wait
        sock.setblocking(False)
        try:
            obj.shutdown()
        except (OSError, ValueError):
            pass
    sock.close()
    return got, reused


def unstarted(client, addr, session=None):
    """A new connection's SSL object before its handshake (``session`` set on it), and its socket."""
    sock = socket.create_connection(addr, timeout=10)
    return TlsStream(sock, client, server_hostname=NAME, session=session).ssl, sock


def assert_reads_back(client, addr, session) -> None:
    """An SSL object ``session`` is set on names that very session."""
    obj, sock = unstarted(client, addr, session)
    assert obj.session.id == session.id
    sock.close()


def test_set_without_copy_resumes_many_connections(tls):
    client, addr = tls
    assert tlssession.setter() is not None, "this CPython/libssl should prove the layout"
    session, reused = exchange(client, addr)
    assert not reused
    calls = []
    real = tlssession.setter()

    def counting(*a):
        ok = real(*a)
        calls.append(ok)
        return ok

    tlssession._state["set"] = counting
    try:
        results = [exchange(client, addr, session)[1] for _ in range(30)]
    finally:
        tlssession._state["set"] = real
    assert all(results), f"{results.count(False)} of 30 did not resume"
    assert calls == [True] * 30           # every one set without the copy
    assert_reads_back(client, addr, session)


def test_session_marked_not_resumable_goes_to_the_copy(tls):
    client, addr = tls
    real = tlssession.setter()
    session, _ = exchange(client, addr)
    # a connection that ends without close_notify while it holds the shared session
    # (no new ticket read yet): OpenSSL marks that session not resumable
    assert exchange(client, addr, session, polite=False, read=False)[1]
    probe, sock = unstarted(client, addr)
    assert real(client, probe, session) is False      # refused: CPython's copy instead
    sock.close()
    # and the device still resumes, through the copy, as it did before this module
    assert all(exchange(client, addr, session)[1] for _ in range(5))


def test_layout_check_refuses_foreign_objects(tls):
    client, addr = tls
    session, _ = exchange(client, addr)
    other = ssl.create_default_context()
    probe, sock = unstarted(client, addr)
    try:
        # an SSL object of another context, a server-side one: not proven
        assert not tlssession._proved(tlssession._libssl(), other, probe, session)
        server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        a, b = socket.socketpair()
        from seg_fast.proxy.tlsio import socket_bio
        srv = socket_bio(server_ctx, a, True)
        assert not tlssession._proved(tlssession._libssl(), server_ctx, srv, session)
        assert tlssession._proved(tlssession._libssl(), client, probe, session)
        a.close()
        b.close()
    finally:
        sock.close()


def test_session_read_by_reference_resumes(tls):
    client, addr = tls
    assert tlssession.getter() is not None, "this CPython/libssl should prove the layout"
    session, reused = exchange(client, addr, by_reference=True)
    assert type(session) is tlssession.Session and not reused
    # the connection it came from is gone: the reference keeps the session alive
    import gc
    gc.collect()
    assert len(session.id) == 32
    results = [exchange(client, addr, session, by_reference=True)[1] for _ in range(20)]
    assert all(results), f"{results.count(False)} of 20 did not resume"
    assert_reads_back(client, addr, session)         # the same session CPython's copy names


def test_session_reference_marked_not_resumable_is_copied(tls):
    client, addr = tls
    session, _ = exchange(client, addr, by_reference=True)
    # a connection ending without close_notify before it read a new ticket marks the
    # session it holds (this very object: no copy was made) not resumable
    assert exchange(client, addr, session, polite=False, read=False, by_reference=True)[1]
    lib = tlssession._state["lib"]
    assert not lib.SSL_SESSION_is_resumable(session.ptr)
    # resumed all the same, through the copy CPython made, as before
    assert all(exchange(client, addr, session, by_reference=True)[1] for _ in range(5))
