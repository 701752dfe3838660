"""Kerberos for the simulator: it plays a mail server that takes only ``Authorization: Negotiate``.

Each token is accepted with the mail server's keytab (gss_accept_sec_context, MIT krb5 via
python-gssapi), so a ticket the KDC did not issue for this service, for this user, fails.
The mailbox is the Kerberos client principal's, and a request whose User= names someone else
is refused (403, ``mismatched``); ``clients`` counts the principals accepted, so a test sees
whose ticket the gateway presented. python-gssapi is needed only when used.

    sim.negotiate = NegotiateAcceptor("/path/mail.keytab")
"""
from __future__ import annotations

import binascii
import collections


class NegotiateAcceptor:
    def __init__(self, keytab: str, principal: str | None = None):
        import gssapi

        self.gssapi = gssapi
        name = gssapi.Name(principal, gssapi.NameType.kerberos_principal) if principal else None
        self.creds = gssapi.Credentials(name=name, usage="accept", store={"keytab": keytab})
        self.clients: collections.Counter[str] = collections.Counter()   # principal -> tokens accepted
        self.refused = 0               # Authorization values that were not a valid token
        self.mismatched = 0            # valid tokens whose client is not the request's User= (403)

    def user_of(self, value: str | None) -> str | None:
        """The client principal of a valid Negotiate token, else None (answered 401)."""
        g = self.gssapi
        if not value or value[:10].lower() != "negotiate ":
            self.refused += 1
            return None
        try:
            token = binascii.a2b_base64(value[10:].strip(), strict_mode=True)
            ctx = g.SecurityContext(creds=self.creds, usage="accept")
            ctx.step(token)
            if not ctx.complete:
                raise ValueError("token needs more legs")
            name = str(ctx.initiator_name)
        except (binascii.Error, ValueError, g.exceptions.GSSError):
            self.refused += 1
            return None
        self.clients[name] += 1
        return name
