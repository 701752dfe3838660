"""The passthrough's pure parts (proxy/passthrough.py): the route decision, canonical paths,
header rewriting, the EWS user decision and the [ews]/[webmail] config checks."""
from __future__ import annotations

import base64
import functools
import tempfile
from pathlib import Path
import posixpath
from urllib.parse import unquote_to_bytes

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from seg_fast.config import load_config
from seg_fast.eas.request import parse_request
from seg_fast.errors import ConfigError
from seg_fast.policy.engine import Engine
from seg_fast.policy.model import PolicyDocument
from seg_fast.proxy.passthrough import (
    EWS, WEBMAIL, Passthrough, canonical, rewrite_cookie_domain, rewrite_location, user_decision,
)


def _config(tmp_path, text: str):
    path = tmp_path / "gw.toml"
    path.write_text(text)
    return load_config(path, env={})


ON = ('[listener]\nexternal_url = "https://mail.example.com"\n[upstream]\nurl = "http://10.0.0.5:8080"\n'
      '[ews]\nenabled = true\nallowed_sources = ["10.1.0.0/16"]\n[webmail]\nenabled = true\n')


# -- canonical paths ------------------------------------------------------------------------------

@settings(max_examples=150)
@given(st.lists(st.sampled_from(["owa", "..", ".", "", "a", "%2e", "%2E%2e", "%2f", "%5c", "\\", ";x",
                                 "%252e", "%41", "b%20c", "%c0%ae", "%u002e", "%", "%zz"]), min_size=1, max_size=6))
def test_a_canonical_path_stays_under_its_prefix_however_it_is_decoded(parts):
    path = ("/owa/" + "/".join(parts)).encode()
    if not canonical(path):
        return
    # Decoded once or twice, with \ as /, normalised: still under /owa/ and unchanged in shape.
    for decoded in (path, unquote_to_bytes(path), unquote_to_bytes(unquote_to_bytes(path))):
        text = decoded.replace(b"\\", b"/").decode("latin-1")
        assert posixpath.normpath(text).startswith("/owa"), path
        assert posixpath.normpath(text) == text.rstrip("/") or text.endswith("/"), path


@pytest.mark.parametrize("path", [b"/owa/", b"/owa/auth/logon.aspx", b"/EWS/Exchange.asmx", b"/owa/a%20b",
                                  b"/owa/x.y/z", b"/owa/...x", b"/owa/%41"])
def test_ordinary_paths_are_canonical(path):
    assert canonical(path)


@pytest.mark.parametrize("path", [b"/owa/../x", b"/owa/./x", b"/owa/..", b"/owa/%2e%2e/x", b"/owa/%2E/x",
                                  b"/owa/a%2fb", b"/owa/a%2Fb", b"/owa/a%5cb", b"/owa/a\\b", b"/owa//x",
                                  b"/owa/..;/x", b"/owa/x;jsessionid=1", b"/owa/%252e", b"/owa/%c0%ae",
                                  b"/owa/%u002e", b"/owa/%", b"/owa/%4", b"/owa/%zz", b"/owa/\xc3\xa9",
                                  b"owa/", b"/owa/%00", b"/owa/a\x7fb"])
def test_paths_that_could_name_another_resource_are_not(path):
    assert not canonical(path)


# -- the route decision -----------------------------------------------------------------------------

def test_claims_and_routes(tmp_path):
    pt = Passthrough(_config(tmp_path, ON))
    assert pt.claims(b"/EWS/Exchange.asmx") and pt.claims(b"/ews/exchange.asmx?x=1")
    assert pt.claims(b"/OWA/") and pt.claims(b"/ecp/x")
    assert not pt.claims(b"/Microsoft-Server-ActiveSync?Cmd=Sync")
    assert not pt.claims(b"/owa") and not pt.claims(b"/EWS/") and not pt.claims(b"http://x/owa/")
    assert pt._route(b"POST", b"/ews/EXCHANGE.asmx")[:2] == (EWS, pt.ews_origin)
    assert pt._route(b"GET", b"/Owa/x")[:2] == (WEBMAIL, pt.web_origin)
    assert pt._route(b"POST", b"/ews/exchange.asmx/x")[1:3] == (None, 404)
    assert pt._route(b"POST", b"/ews/exchange.asmx/../x")[1:3] == (None, 400)
    assert pt._route(b"CONNECT", b"/owa/")[1:3] == (None, 405)
    assert pt.ews_origin.host == "10.0.0.5" and pt.web_origin.port == 8080


def test_off_by_default_and_each_switch_alone(tmp_path):
    assert Passthrough.build(load_config(None, env={})) is None
    only_web = Passthrough.build(_config(tmp_path, ON.replace("[ews]\nenabled = true", "[ews]\nenabled = false")))
    assert only_web.claims(b"/owa/") and not only_web.claims(b"/EWS/Exchange.asmx")
    only_ews = Passthrough.build(_config(tmp_path, ON.replace("[webmail]\nenabled = true", "")))
    assert only_ews.claims(b"/EWS/Exchange.asmx") and not only_ews.claims(b"/owa/")


def test_source_allow_list(tmp_path):
    pt = Passthrough(_config(tmp_path, ON))
    assert "10.1.2.3" in pt.sources and "::ffff:10.1.2.3" in pt.sources
    assert "10.2.0.1" not in pt.sources and "not-an-ip" not in pt.sources


# -- header rewriting --------------------------------------------------------------------------------

EXT = b"https://mail.example.com"


@pytest.mark.parametrize("value,expect", [
    (b"http://10.0.0.5:8080/owa/auth/logon.aspx?url=x", EXT + b"/owa/auth/logon.aspx?url=x"),
    (b"https://10.0.0.5/owa/", EXT + b"/owa/"),
    (b"HTTP://10.0.0.5", EXT + b"/"),
    (b"http://10.0.0.5?x", EXT + b"/?x"),
    (b"http://user@10.0.0.5/owa/", EXT + b"/owa/"),
    (b"/owa/relative", b"/owa/relative"),
    (b"http://10.0.0.50/owa/", b"http://10.0.0.50/owa/"),
    (b"http://other.example/owa/", b"http://other.example/owa/"),
    (b"http://10.0.0.5.evil/owa/", b"http://10.0.0.5.evil/owa/"),
])
def test_location_naming_the_mail_server_names_the_gateway(value, expect):
    assert rewrite_location(value, b"10.0.0.5", EXT) == expect


def test_location_with_an_ipv6_mail_server():
    assert rewrite_location(b"http://[::1]:8080/owa/", b"::1", EXT) == EXT + b"/owa/"


@pytest.mark.parametrize("value,expect", [
    (b"cadata=1; Domain=exch01.corp.local; path=/; HttpOnly", b"cadata=1; Domain=mail.example.com; path=/; HttpOnly"),
    (b"a=1; domain=.corp.local; Path=/owa", b"a=1; Domain=mail.example.com; Path=/owa"),
    (b"a=1; path=/", b"a=1; path=/"),
    (b"a=1; Domain=other.example", b"a=1; Domain=other.example"),
    (b"a=1; Domain=local", b"a=1; Domain=mail.example.com"),
    (b"a=1; Domain=p.corp.local", b"a=1; Domain=p.corp.local"),
])
def test_cookie_domains_naming_the_mail_server_name_the_gateway(value, expect):
    assert rewrite_cookie_domain(value, b"exch01.corp.local", b"mail.example.com") == expect


# -- the EWS user decision --------------------------------------------------------------------------

class _Gk:
    def __init__(self, engine):
        self.engine = engine


def _engine(user_policy=None, **kw):
    e = Engine(transforms_for=lambda *a, **k: (), **kw)
    if user_policy is not None:
        # managed_device_only: the device policy would refuse every EWS request if it applied.
        e.set_document(msgspec.convert({"general": {"managed_device_only": True, "user": user_policy}},
                                       PolicyDocument), 1)
    return e


def _req(auth: str | None):
    headers = [(b"authorization", auth.encode())] if auth else []
    return parse_request("POST", b"/EWS/Exchange.asmx", headers, "10.1.0.1")


BASIC = {"jdoe": "Basic amRvZTpwdw==", "mallory": "Basic bWFsbG9yeTpwdw=="}   # user:pw


def test_user_policy_alone_decides_and_device_policy_does_not():
    gk = _Gk(_engine({"enabled": True, "mode": "block", "values": ["mallory"]}, user_without_credential="refuse"))
    assert user_decision(gk, _req(BASIC["jdoe"])) == ("allowed.ews", True)    # managed_device_only ignored
    assert user_decision(gk, _req(BASIC["mallory"])) == ("blocked.user", False)
    assert user_decision(gk, _req(None)) == ("blocked.user_unverified", False)
    ntlm1 = "NTLM " + base64.b64encode(b"NTLMSSP\x00\x01\x00\x00\x00" + b"\x00" * 24).decode()
    assert user_decision(gk, _req(ntlm1)) == ("allowed.ews", True)            # the handshake's start


def test_no_document_and_test_mode_follow_the_engine():
    assert user_decision(_Gk(_engine()), _req(BASIC["jdoe"])) == ("blocked.no_policies", False)
    assert user_decision(_Gk(_engine(allow_if_no_policies=True)), _req(BASIC["jdoe"]))[1] is True
    e = _engine({"enabled": True, "mode": "block", "values": ["mallory"]})
    e.set_test_mode(True)
    assert user_decision(_Gk(e), _req(BASIC["mallory"])) == ("blocked.user", True)
    assert user_decision(object(), _req(BASIC["mallory"])) == ("allowed.ews", True)   # no engine


# -- config checks ----------------------------------------------------------------------------------

@pytest.mark.parametrize("extra,key", [
    ('[ews]\nenabled = true\n', "ews.allowed_sources"),
    ('[ews]\nallowed_sources = ["10.0.0.0/33"]\n', "ews.allowed_sources"),
    ('[ews]\npaths = ["/EWS/../Exchange.asmx"]\n', "ews.paths"),
    ('[ews]\npaths = ["/Microsoft-Server-ActiveSync/x"]\n', "ews.paths"),
    ('[webmail]\nprefixes = ["/"]\n', "webmail.prefixes"),
    ('[webmail]\nprefixes = ["/owa"]\n', "webmail.prefixes"),
    ('[webmail]\nprefixes = ["/ews/"]\n', "webmail.prefixes"),
    ('[webmail]\nprefixes = ["/microsoft-server-activesync/"]\n', "webmail.prefixes"),
    ('[webmail]\nenabled = true\n', "listener.external_url"),
    ('[ews]\nurl = "ftp://x"\n', "ews.url"),
    ('[webmail]\nurl = "http://x/owa"\n', "webmail.url"),
])
def test_config_problems_name_the_key_and_the_file(tmp_path, extra, key):
    path = tmp_path / "gw.toml"
    path.write_text(extra)
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    assert f"key {key}:" in str(err.value) and str(path) in str(err.value)


def test_environment_overrides_reach_the_sections():
    config = load_config(None, env={"SEG_FAST_EWS_ENABLED": "true", "SEG_FAST_EWS_ALLOWED_SOURCES": '["10.0.0.0/8"]'})
    assert config.ews.enabled and config.ews.allowed_sources == ["10.0.0.0/8"]


# -- the route decision against every reader's idea of the path -----------------------------------

_TOKENS = ["owa", "ecp", "ews", "Exchange.asmx", "Microsoft-Server-ActiveSync", "..", ".", "", "%2e", "%2f",
           "%5c", "\\", ";", "%25", "%3b", "x", "%00", "%c0%ae", "%u002e", "//"]


@functools.lru_cache(maxsize=1)
def _shared_passthrough() -> Passthrough:
    return Passthrough(_config(Path(tempfile.mkdtemp(prefix="ews-units-")), ON))


def _readings(path: bytes) -> set[str]:
    """How servers might read a path: as sent, unescaped once or twice, \\ as /, ;params cut, normalised."""
    out = set()
    for decoded in (path, unquote_to_bytes(path), unquote_to_bytes(unquote_to_bytes(path))):
        text = decoded.decode("latin-1").replace("\\", "/")
        for variant in (text, "/".join(seg.split(";", 1)[0] for seg in text.split("/"))):
            out.add(posixpath.normpath(variant).lower())
    return out


@settings(max_examples=150)
@given(st.sampled_from(["/owa/", "/ecp/", "/EWS/", "/ews/exchange.asmx", "/EWS/Exchange.asmx/"]),
       st.lists(st.sampled_from(_TOKENS), max_size=5), st.sampled_from(["", "/", "?Cmd=Sync"]))
def test_what_the_passthrough_forwards_no_reader_takes_for_activesync(start, parts, tail):
    pt = _shared_passthrough()
    target = (start + "/".join(parts) + tail).encode()
    if not pt.claims(target):
        return
    kind, origin, status, _ = pt._route(b"POST", target.partition(b"?")[0])
    if origin is None:
        assert status in (400, 404)
        return
    for reading in _readings(target.partition(b"?")[0]):
        assert "microsoft-server-activesync" not in reading or reading.startswith(("/owa/", "/ecp/")), target
        if kind == EWS:
            assert reading == "/ews/exchange.asmx", target
        else:
            assert reading.startswith(("/owa", "/ecp")), target
