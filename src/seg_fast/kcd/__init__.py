"""Certificate authentication with Kerberos constrained delegation (docs/kcd.md).

- clientcert.py: the device's TLS client certificate: asked for on the listener, checked
  (validity, CRL) and mapped to a user (UPN, RFC 822 name or a subject attribute).
- delegation.py: S4U2Self then S4U2Proxy with python-gssapi (MIT krb5) for that user, and
  the ``Authorization: Negotiate`` header the mail server gets; a per-user cache so a
  storm of Pings does not reach the KDC.
- settings.py: the [cert_map] and [kcd] config sections.

python-gssapi is imported only when ``kcd.enabled`` is set: the gateway runs without it.
"""
