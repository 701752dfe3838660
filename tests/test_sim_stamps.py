"""sim/stamps.py: the kernel's receive stamp of a load-side socket's unread bytes,
read without consuming them, against the wall clock around the send."""
from __future__ import annotations

import socket
import time

import pytest

from seg_fast.sim import stamps
from seg_fast.sim.latency import added_latency, net_of_load_side


@pytest.fixture
def pair():
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen()
    stamps.enable(ls)                       # what it accepts is stamped too
    client = socket.create_connection(ls.getsockname())
    server, _ = ls.accept()
    server.setblocking(False)
    yield client, server
    for s in (client, server, ls):
        s.close()


def _stamped(client, server, data: bytes, wait_s: float) -> tuple[float, float, float]:
    """Send ``data``, let ``wait_s`` pass, peek: (late, least possible, most possible)."""
    before = time.time()
    client.sendall(data)
    after = time.time()
    while time.time() < after + wait_s:     # time passing, not a sleep the test relies on
        pass
    t0 = time.time()
    late = stamps.late(server)
    t1 = time.time()
    return late, t0 - after, t1 - before


def test_nothing_there_is_none(pair):
    _client, server = pair
    assert stamps.late(server) is None


def test_a_waiting_segment_is_as_late_as_the_clock_says_and_stays_unread(pair):
    client, server = pair
    # the kernel turns stamping on in deferred work: the first segment may be unstamped
    _stamped(client, server, b"warm", 0.0)
    assert server.recv(100) == b"warm"
    late, least, most = _stamped(client, server, b"x" * 100, 0.03)
    assert least <= late <= most, (least, late, most)
    assert server.recv(1000) == b"x" * 100          # peeked, not consumed


def test_several_segments_are_measured_from_the_latest_so_never_more_than_the_first(pair):
    client, server = pair
    _stamped(client, server, b"warm", 0.0)
    server.recv(100)
    first_sent = time.time()
    client.sendall(b"a" * 100)
    while time.time() < first_sent + 0.03:
        pass
    late, _least, most = _stamped(client, server, b"b" * 100, 0.0)
    # measured from the second segment: well under the first one's 30 ms
    assert 0.0 <= late <= most < 0.03, (late, most)


def test_an_unstamped_socket_reads_as_no_delay():
    a, b = socket.socketpair()
    try:
        b.setblocking(False)
        a.sendall(b"x")
        assert stamps.late(b) == 0.0
    finally:
        a.close()
        b.close()


def test_net_of_load_side_takes_each_requests_own_delay_out_of_both_paths():
    gw = {"Sync": {"a": 30.0, "b": 12.0, "c": 5.0}}
    gw_late = {"Sync": {"a": 25.0, "b": 0.5}}          # "c" not measured: nothing taken out
    direct = {"Sync": {"a": 4.0, "b": 3.0, "c": 4.5}}
    direct_late = {"Sync": {"b": 1.0}}
    net = added_latency(net_of_load_side(gw, gw_late), net_of_load_side(direct, direct_late))
    raw = added_latency(gw, direct)
    assert raw["commands"]["Sync"]["max"] == 26.0
    # a: 5 - 4 = 1; b: 11.5 - 2 = 9.5; c: 5 - 4.5 = 0.5
    assert net["commands"]["Sync"]["max"] == 9.5
    assert net["commands"]["Sync"]["n"] == 3
