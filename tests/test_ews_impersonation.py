"""EWS impersonation through a running `seg-fast serve`: the user policy applies to the user
an ``ExchangeImpersonation`` SOAP header acts for, not only to the credential's user
(proxy/ews_impersonation.py). The gateway and simulator are test_ews_passthrough.py's
(its policy blocks mallory); "refused" means the simulator's web log never saw the request.
"""
from __future__ import annotations

import hashlib

import pytest

from test_ews_passthrough import (EWS, T, _auth, _wait_for, answers, env, ews, exchange,  # noqa: F401 (env)
                                  request, soap)


def impersonating(kind: str, name: str) -> bytes:
    header = (f'<soap:Header><t:ExchangeImpersonation><t:ConnectingSID><t:{kind}>{name}</t:{kind}>'
              f'</t:ConnectingSID></t:ExchangeImpersonation></soap:Header>')
    body = soap('<m:Subscribe><m:PullSubscriptionRequest><t:FolderIds><t:DistinguishedFolderId Id="inbox"/>'
                '</t:FolderIds><t:EventTypes><t:EventType>NewMailEvent</t:EventType></t:EventTypes>'
                '<t:Timeout>10</t:Timeout></m:PullSubscriptionRequest></m:Subscribe>')
    return body.replace(b"<soap:Body>", header.encode() + b"<soap:Body>")


@pytest.mark.parametrize("kind,name", [("PrimarySmtpAddress", "mallory@example.com"),
                                       ("SmtpAddress", "Mallory@Example.com"),
                                       ("PrincipalName", "mallory@corp.example.com"),
                                       ("SID", "S-1-5-21-1004336348-1177238915-682003330-512")])
def test_a_blocked_impersonated_user_is_refused_403_before_the_mail_server(env, kind, name):
    before = len(env.web_log())
    status, _, _ = ews(env, "svc-ens", impersonating(kind, name))
    assert status == 403
    assert len(env.web_log()) == before
    recs = _wait_for(lambda: [r for r in env.records() if r.get("user") == "svc-ens" and r.get("status") == 403])
    assert recs[-1]["decision"] in ("blocked.user", "blocked.impersonation_sid")


def test_an_allowed_impersonated_user_is_forwarded_as_sent(env):
    body = impersonating("PrimarySmtpAddress", "jdoe@example.com")
    status, _, answer = ews(env, "svc-ens", body)
    assert status == 200 and b"NoError" in answer
    entry = [e for e in env.web_log() if e["target"] == EWS][-1]
    assert entry["body_sha256"] == hashlib.sha256(body).hexdigest()


def test_the_impersonation_header_in_another_namespace_prefix_or_chunked_is_still_checked(env):
    body = impersonating("PrimarySmtpAddress", "mallory@example.com").replace(b"t:", b"x:").replace(
        b'xmlns:t=', b'xmlns:x=')
    assert f'xmlns:x="{T}"'.encode() in body
    before = len(env.web_log())
    assert ews(env, "svc-ens", body)[0] == 403
    chunked = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
    head = (f"POST {EWS} HTTP/1.1\r\nHost: x\r\nAuthorization: {_auth('svc-ens')}\r\n"
            f"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n").encode()
    assert [r.status_code for r, _ in answers(exchange(env.port, head + chunked))] == [403]
    assert len(env.web_log()) == before


def test_billion_laughs_and_external_entities_get_400_and_the_worker_lives(env):
    lol = ('<!DOCTYPE lolz [<!ENTITY lol "lollollollollollollollollollol">'
           + "".join(f'<!ENTITY lol{i} "{("&lol%s;" % (i - 1 if i > 1 else "")) * 10}">' for i in range(1, 10))
           + ']>')
    bomb = b'<?xml version="1.0"?>' + lol.encode() + soap("<m:Subscribe>&lol9;</m:Subscribe>").split(b"?>", 1)[1]
    external = (b'<?xml version="1.0"?><!DOCTYPE s [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
                + soap("<m:Subscribe>&x;</m:Subscribe>").split(b"?>", 1)[1])
    before = len(env.web_log())
    for body in (bomb, external, b"not xml at all"):
        status, _, answer = ews(env, "jdoe", body)
        assert status == 400, answer
    assert len(env.web_log()) == before
    env.unharmed()


def test_a_body_over_the_limit_is_refused_413_declared_or_chunked(env):
    big = soap("<m:Subscribe>" + "x" * (1024 * 1024) + "</m:Subscribe>")
    before = len(env.web_log())
    assert ews(env, "jdoe", big)[0] == 413
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(big[i:i + 65536]), big[i:i + 65536]) for i in range(0, len(big), 65536))
    head = (f"POST {EWS} HTTP/1.1\r\nHost: x\r\nAuthorization: {_auth('jdoe')}\r\n"
            f"Transfer-Encoding: chunked\r\n\r\n").encode()
    got = answers(exchange(env.port, head + chunks + b"0\r\n\r\n"))
    assert [r.status_code for r, _ in got] == [413]
    assert len(env.web_log()) == before
    # Just under the limit is read and forwarded.
    status, _, _ = request(env.port, "POST", EWS, {"Authorization": _auth("jdoe")},
                           soap("<m:Subscribe>" + "x" * (900 * 1024) + "</m:Subscribe>"))
    assert status == 200                     # the simulator's SOAP answer: it was forwarded
    assert len(env.web_log()) == before + 1
    env.unharmed()


# -- the reader alone -------------------------------------------------------------------------

def test_the_reader_finds_every_impersonated_user_in_any_encoding_and_nothing_else():
    from seg_fast.errors import SOAPError
    from seg_fast.proxy.ews_impersonation import impersonated

    one = impersonating("PrimarySmtpAddress", "mallory@example.com")
    assert impersonated(one) == [("smtp", "mallory@example.com")]
    utf16 = one.decode().replace('encoding="utf-8"', 'encoding="utf-16"').encode("utf-16")
    assert impersonated(utf16) == [("smtp", "mallory@example.com")]
    two = one.replace(b"</t:ConnectingSID>", b"</t:ConnectingSID><t:ConnectingSID><t:SID>S-1-5-21-9</t:SID>"
                      b"</t:ConnectingSID>")
    assert impersonated(two) == [("smtp", "mallory@example.com"), ("sid", "S-1-5-21-9")]
    # Text that only looks like the header (a comment, CDATA, an attribute) names nobody.
    fake = soap('<!-- <t:ExchangeImpersonation/> --><m:GetEvents Note="&lt;t:ExchangeImpersonation&gt;">'
                '<![CDATA[<t:ExchangeImpersonation><t:ConnectingSID><t:SID>x</t:SID>]]></m:GetEvents>')
    assert impersonated(fake) == [] and impersonated(b"") == []
    for bad in (impersonating("PrimarySmtpAddress", " "), one.replace(b"PrimarySmtpAddress", b"Nickname"),
                one[:-10], b'<?xml version="1.0" encoding="shift_jis"?><a>\x82\xa0</a>'):
        with pytest.raises(SOAPError):
            impersonated(bad)
