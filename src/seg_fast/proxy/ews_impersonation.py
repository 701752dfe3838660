"""Who an EWS request acts for: the users an ``ExchangeImpersonation`` SOAP header names.

EWS lets a service account act for another mailbox with a SOAP header::

    <t:ExchangeImpersonation><t:ConnectingSID><t:PrimarySmtpAddress>mallory@example.com</...>

(or ``SmtpAddress``, ``PrincipalName``, ``SID``). The gateway applies the user policy to
that user as well as to the credential's (proxy/passthrough.py), so the body is read whole
first, at most ``BODY_LIMIT`` bytes.

The body is untrusted XML: it is read with expat directly and any document type
declaration is refused, so no entity is ever declared, let alone expanded (billion laughs,
external entities). Elements are matched by local name in any namespace and anywhere in
the document: a spelling Exchange would not read is refused or checked, never skipped.
"""
from __future__ import annotations

from xml.parsers import expat

from seg_fast.errors import SOAPError

BODY_LIMIT = 1024 * 1024          # EWS requests of the notification service are a few kB
# ConnectingSID's children (MS-OXWSCDATA) and the kind of name each holds.
_NAMES = {"PrimarySmtpAddress": "smtp", "SmtpAddress": "smtp", "PrincipalName": "upn", "SID": "sid"}


def _local(tag: str) -> str:
    return tag.rpartition(" ")[2]         # expat gives "namespace local" with namespace_separator=" "


def impersonated(body: bytes) -> list[tuple[str, str]]:
    """(kind, name) for each ConnectingSID in ``body`` ([] when nobody is impersonated).

    Raises SOAPError for a body that is not well-formed XML, carries a DTD, or holds an
    ExchangeImpersonation that names nobody."""
    if not body.strip():
        return []
    parser = expat.ParserCreate(namespace_separator=" ")
    found: list[tuple[str, str]] = []
    stack: list[str] = []
    text: list[str] = []
    in_sid = [0]                          # how many ConnectingSID elements are open
    impersonations = [0]

    def refuse_dtd(*_args):
        raise SOAPError("a document type declaration is not accepted in an EWS request")

    def start(tag, _attrs):
        name = _local(tag)
        stack.append(name)
        if name == "ExchangeImpersonation":
            impersonations[0] += 1
        elif name == "ConnectingSID":
            in_sid[0] += 1
        text.clear()

    def end(tag):
        name = stack.pop()
        if in_sid[0] and name in _NAMES and stack and stack[-1] == "ConnectingSID":
            value = "".join(text).strip()
            if not value:
                raise SOAPError(f"an empty {name} in ExchangeImpersonation")
            found.append((_NAMES[name], value))
        elif name == "ConnectingSID":
            in_sid[0] -= 1
        text.clear()

    parser.StartDoctypeDeclHandler = refuse_dtd
    parser.EntityDeclHandler = refuse_dtd
    parser.ExternalEntityRefHandler = refuse_dtd
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = text.append
    try:
        parser.Parse(body, True)
    except expat.ExpatError as exc:
        raise SOAPError(f"the EWS request is not well-formed XML: {expat.ErrorString(exc.code)}") from None
    except (ValueError, LookupError) as exc:       # an encoding expat cannot read (Shift_JIS, unknown)
        raise SOAPError(f"the EWS request's encoding cannot be read: {exc}") from None
    if impersonations[0] and not found:
        raise SOAPError("ExchangeImpersonation names no user")
    return found
