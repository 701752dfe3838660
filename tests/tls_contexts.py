"""TLS contexts for tests that run TLS over loopback: a trustme CA, a server context
with a certificate for ``name``, a client context trusting that CA."""
from __future__ import annotations

import ssl

import trustme


def server_and_client(name: str = "localhost") -> tuple[ssl.SSLContext, ssl.SSLContext]:
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(name).configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return server, client
