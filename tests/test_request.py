"""EasRequest identification: both query forms, Basic auth, malformed input."""
from __future__ import annotations

import base64

import pytest
from hypothesis import given, strategies as st

from seg_fast.eas.request import basic_auth_user, encode_base64_query, parse_request
from seg_fast.errors import EASRequestError

PATH = b"/Microsoft-Server-ActiveSync"
AUTH = (b"Authorization", b"Basic " + base64.b64encode(b"CORP\\jdoe:pa:ss"))


def test_plain_query_fields_and_headers():
    req = parse_request("POST", PATH + b"?Cmd=Sync&User=jdoe&DeviceId=ABC123&DeviceType=iPhone&CollectionId=7",
                        [(b"MS-ASProtocolVersion", b"14.1"), (b"X-MS-PolicyKey", b"3942919513"),
                         (b"User-Agent", b"Apple-iPhone9C1/1602.92"), (b"MS-ASAcceptMultiPart", b"T")],
                        "10.0.0.9")
    assert (req.command, req.user, req.device_id, req.device_type) == ("Sync", "jdoe", "ABC123", "iPhone")
    assert req.protocol_version == "14.1" and req.policy_key == "3942919513"
    assert req.user_agent == "Apple-iPhone9C1/1602.92" and req.accept_multipart
    assert req.params == {"CollectionId": "7"} and req.client_ip == "10.0.0.9"
    assert req.path == "/Microsoft-Server-ActiveSync" and not req.base64_query


def test_basic_auth_user_wins_over_query_user_and_keeps_domain():
    req = parse_request("POST", PATH + b"?Cmd=Ping&User=someoneelse&DeviceId=A&DeviceType=B", [AUTH])
    assert req.user == "CORP\\jdoe"


def test_percent_encoded_values():
    req = parse_request("POST", PATH + b"?Cmd=GetAttachment&AttachmentName=5%3A1%3A0&DeviceId=A&DeviceType=B", [])
    assert req.params["AttachmentName"] == "5:1:0"


def test_base64_form_matches_the_fixture_description():
    # The real-server fsb64 capture: 14.1, FolderSync, locale 0x0409, DeviceId, PolicyKey,
    # DeviceType SmartPhone, and parameter tag 7 holding the 4 bytes "test".
    q = encode_base64_query(version="14.1", command="FolderSync", device_id=bytes.fromhex("0123abcd"),
                            device_type="SmartPhone", policy_key=1234567890, params=[(7, b"test")])
    raw = base64.b64decode(q)
    assert raw[:4] == bytes([141, 9, 0x09, 0x04])          # independent check of the layout
    req = parse_request("POST", PATH + b"?" + q.encode(), [AUTH, (b"User-Agent", b"X")])
    assert req.base64_query
    assert (req.command, req.protocol_version, req.device_id, req.device_type) == \
        ("FolderSync", "14.1", "0123abcd", "SmartPhone")
    assert req.policy_key == "1234567890" and req.user == "CORP\\jdoe"
    assert req.params == {"Options": b"test".hex()} and not req.accept_multipart


def test_base64_form_user_param_and_multipart_option():
    q = encode_base64_query(version="16.1", command="ItemOperations", device_id=b"\x01\x02",
                            device_type="Android", params=[(8, b"jdoe@example.com"), (7, b"\x02"),
                                                           (1, b"5"), (3, b"5:12")])
    req = parse_request("POST", PATH + b"?" + q.replace("=", "%3D").encode(), [])
    assert req.user == "jdoe@example.com" and req.accept_multipart and req.policy_key is None
    assert req.params == {"Options": "2", "CollectionId": "5", "ItemId": "5:12"}
    assert req.protocol_version == "16.1"


@pytest.mark.parametrize("query", [
    b"Cmd=Sync&Cmd=Ping", b"Cmd=Sy%20nc", b"Cmd=Sync&DeviceId=a%00b", b"Cmd=Sync&=x", b"Cmd=Sync&DeviceId",
    b"Cmd=Sync&DeviceId=%ff%fe", b"Cmd=Sync&DeviceType=a/b",
    b"!!!!", b"AAAA", base64.b64encode(bytes([141, 99, 9, 4, 0, 0, 0])),           # unknown command
    base64.b64encode(bytes([141, 9, 9, 4, 10, 1])),                               # DeviceId past the end
    base64.b64encode(bytes([141, 9, 9, 4, 1, 0xAA, 3, 1, 2, 3, 0])),              # 3-byte policy key
    base64.b64encode(bytes([141, 9, 9, 4, 1, 0xAA, 0, 1, 0x41, 5, 1, 0x41])),     # parameter tag 5
    base64.b64encode(bytes([141, 9, 9, 4, 1, 0xAA, 0, 1, 0x41, 1, 9, 0x41])),     # value past the end
    base64.b64encode(bytes([3, 9, 9, 4, 1, 0xAA, 0, 1, 0x41])),                   # version byte 3
])
def test_malformed_queries_raise_the_request_error(query):
    with pytest.raises(EASRequestError):
        parse_request("POST", PATH + b"?" + query, [])


@pytest.mark.parametrize("value", [b"Basic !!", b"Basic " + base64.b64encode(b"nocolon"),
                                   b"Basic " + base64.b64encode(b"\xff\xfe:x")])
def test_bad_basic_credentials(value):
    with pytest.raises(EASRequestError):
        parse_request("POST", PATH + b"?Cmd=Sync&DeviceId=A&DeviceType=B", [(b"Authorization", value)])


def test_bearer_auth_is_not_a_user_and_no_password_leaks():
    assert basic_auth_user("Bearer abc") is None
    req = parse_request("POST", PATH + b"?Cmd=Sync&DeviceId=A&DeviceType=B", [AUTH])
    assert "pa:ss" not in repr(req)


def test_bad_protocol_version_header():
    with pytest.raises(EASRequestError):
        parse_request("POST", PATH + b"?Cmd=Sync", [(b"MS-ASProtocolVersion", b"14.1; drop")])


def test_bare_post_and_options_have_no_command():
    assert parse_request("OPTIONS", PATH, []).command is None
    assert parse_request("POST", PATH, []).device_id is None


@given(st.binary(max_size=300))
def test_any_query_bytes_parse_or_raise_the_request_error(blob):
    for query in (blob, base64.b64encode(blob)):
        try:
            req = parse_request("POST", PATH + b"?" + query, [AUTH])
        except EASRequestError:
            continue
        assert req.path == PATH.decode()


@given(st.binary(min_size=0, max_size=40))
def test_base64_round_trip_of_device_ids(dev_id):
    q = encode_base64_query(version="14.0", command="Ping", device_id=dev_id, device_type="T")
    req = parse_request("POST", PATH + b"?" + q.encode(), [])
    assert req.device_id == dev_id.hex() and req.command == "Ping"
