"""Forwarding headers believed only from listener.trusted_proxies; 451/302 to listener.external_url."""
from __future__ import annotations

import pytest

from seg_fast.eas.request import EasRequest
from seg_fast.proxy import headers as hdrs
from seg_fast.proxy.headers import TrustedProxies
from seg_fast.proxy.redirects import RedirectMap
from seg_fast.proxy.upstream import origin_of

PROXIES = TrustedProxies(["10.0.0.0/8", "2001:db8::/32", "192.0.2.1"])


@pytest.mark.parametrize("ip,trusted", [
    ("10.1.2.3", True), ("11.0.0.1", False), ("2001:db8::5", True), ("2001:db9::5", False),
    ("192.0.2.1", True), ("192.0.2.2", False), ("::ffff:10.0.0.1", True), ("not-an-ip", False), ("", False),
])
def test_peer_membership(ip, trusted):
    assert (ip in PROXIES) is trusted
    assert ip not in TrustedProxies([])


@pytest.mark.parametrize("chain,client", [
    ([b"203.0.113.7"], "203.0.113.7"),
    ([b"198.51.100.1, 203.0.113.7, 10.0.0.3"], "203.0.113.7"),      # the leftmost one is the device's to write
    ([b"198.51.100.1", b"203.0.113.7, 10.0.0.3"], "203.0.113.7"),    # two header lines are one list
    ([b"10.0.0.9, 10.0.0.3"], "10.0.0.9"),                           # every hop trusted: the farthest
    ([b"junk, 10.0.0.3"], "10.0.0.3"),                               # garbage: the last vouched address
    ([b"[2001:db8::1]:443, 203.0.113.7:5555"], "203.0.113.7"),
    ([], "10.0.0.1"),
])
def test_client_behind_a_trusted_proxy(chain, client):
    assert PROXIES.client_of("10.0.0.1", [(b"x-forwarded-for", v) for v in chain]) == client


def test_x_real_ip_when_no_chain():
    assert PROXIES.client_of("10.0.0.1", [(b"x-real-ip", b"203.0.113.9")]) == "203.0.113.9"


def test_bad_networks_are_refused():
    with pytest.raises(ValueError):
        TrustedProxies(["10.0.0.0/33"])


def _device_headers():
    return hdrs.from_pairs([(b"Host", b"gw"), (b"X-Forwarded-For", b"203.0.113.66"),
                            (b"X-Forwarded-Proto", b"https"), (b"Forwarded", b"for=203.0.113.66"),
                            (b"X-Real-IP", b"203.0.113.66"), (b"X-Forwarded-Host", b"evil"),
                            (b"X-Forwarded-Port", b"1"), (b"User-Agent", b"UA")])


def test_forwarding_headers_from_an_untrusted_peer_are_rebuilt():
    out = dict(hdrs.pairs(hdrs.upstream_request_headers(_device_headers(), host=b"mail", client_ip="198.51.100.4",
                                                        proto=b"http", behind_proxy=False)))
    assert out == {b"Host": b"mail", b"User-Agent": b"UA", b"X-Forwarded-For": b"198.51.100.4",
                   b"X-Forwarded-Proto": b"http"}


def test_forwarding_headers_from_a_trusted_proxy_are_passed_on():
    out = dict(hdrs.pairs(hdrs.upstream_request_headers(_device_headers(), host=b"mail", client_ip="10.0.0.1",
                                                        proto=b"http", behind_proxy=True)))
    assert out[b"X-Forwarded-For"] == b"203.0.113.66, 10.0.0.1" and out[b"X-Forwarded-Proto"] == b"https"
    assert out[b"Forwarded"] == b"for=203.0.113.66" and out[b"X-Real-IP"] == b"203.0.113.66"


REQ = EasRequest(method="POST", path="/", user="alice")
MOVED = hdrs.from_pairs([(b"X-MS-Location", b"https://mbx2.corp/Microsoft-Server-ActiveSync?x=1"),
                         (b"Content-Length", b"0")])


def test_451_points_at_the_external_name():
    rm = RedirectMap(origin_of("http://mbx1.corp"), "https://eas.example.org/")
    status, headers, _ = rm.rewrite(REQ, 451, MOVED, b"")
    assert status == 451
    assert dict(hdrs.pairs(headers))[b"X-MS-Location"] == b"https://eas.example.org/Microsoft-Server-ActiveSync?x=1"
    assert rm.origin_for("ALICE").host == "mbx2.corp"


def test_451_without_an_external_name_asks_for_a_retry():
    rm = RedirectMap(origin_of("http://mbx1.corp"))
    status, headers, reason = rm.rewrite(REQ, 451, MOVED, b"")
    assert (status, reason) == (503, b"Service Unavailable")
    assert dict(hdrs.pairs(headers)) == {b"Content-Length": b"0", b"Retry-After": b"1"}
    assert rm.origin_for("alice").host == "mbx2.corp"            # the retry goes to the new server
