"""Real, verifiable and deterministic S/MIME signatures for the corpus.

A fixed RSA key (published here on purpose: it is a test fixture and protects
nothing) and a certificate built from it with fixed fields, so the same bytes get
the same signature in every run: RSA PKCS#1 v1.5 is deterministic and no
signing-time attribute is added. ``openssl smime -verify -noverify`` accepts the
corpus's multipart/signed messages, so a gateway that changes a signed message
can be caught.
"""
from __future__ import annotations

import datetime
import functools

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID

SIGNER_EMAIL = "signer@seg-fast.test"

_KEY_PEM = b"""\
-----BEGIN RSA PRIVATE KEY-----
MIIEogIBAAKCAQEAkjpGyOEj7MDyXdQCl+eJ9NOkDX9i8f451LSq0aN6e28z7Hnz
WI305G4lFK2N5THEsoQAB/2wJRTa+l01M28ln9CX5VhBW04kOKAYJiKAUTsDLIyP
YR/fxeu5U0jXUQ9+BJG7ESopNeHRGH4m0LQ9GblSlrH3+NbL26nEKPKGu0Vxjk3p
I0REEYitsV2xbsjE4SSAsxnxc9KzUtBEUsTt3tbMDg1s4G6WGnszRmB8ZFIuAg0y
fWCZhsQUpaJGDNiSeV1VdHeZ33CNkj1iKenC2He8ahwhP8AylYQ/Y+keorqRgcqC
8YQAgWP8PJsv1vDISQiNQif65HjyrMIb5CHVNwIDAQABAoIBAA4CthmKiNinEWcw
EyI0NcxWzZcwJ24sVPouaAI3ebAt/Xmg+FH5zVxoY/Z75+aX7X11QajXrnLpxqQf
yM3UI8oQ6xzhvJFfsVTDnMy6mDTa705AwX7QK66uYU67jKCLAstend/ifERaDfYc
0DdFrb0IkViNq3FqPeoeyq6/CMMUmnm6Jeop4VsQNMy4SBUzz386nYFzk7Lzt3oO
FHapEe5e58R21uYPOnpELy6/65RXyId7vkfVRDiRl6T+1CMT2nyb7VqfwhTpRzT6
UEqjVam/+EQHBq8i1kQGott3XvS3w14KTfkszzcDOf38jILI1+Q6DtjFaLUBU/az
Nebp27ECgYEAzJb7T8W+eSuECnrVanoUGdtrd1BvEDlAhIOc/8XQNmNnIqqqUr+1
4ga7gwh+3EzHn9bnAPm5C1HlImwdkaabVf3ouy///e2prh6jE9xhxq+w+HvSdRbe
CkwXOoiDZ8nJBm6LEFjcH3JOUoxmxH3azW/DWxavVNR7AiToTFcNfi0CgYEAtvjt
j9AQUR/0Y9kS256UWcvFuf4WfUUIGHNFe9tp8XpeiIACV96JAmaXRLXVByvsouiv
ZzXU/ytrj+vLRRPcFrYsMu/sCviSDx0Ao0fB3T1Wu4Fh/vfDXFOprIVP0V7hSWQs
ZQA0FIscsD5NYGwHYmJ49KEzY/Isz6uELAlaI3MCgYBw9QtcR/maPQRyJM+gMjbW
7+atwaMQegu9Hk2YikcjQE65PTE87swlN0JgXlhsmZe+EJEKYNZiAZ1ZHAhXWn15
RO8yKpZURNviXtf7Jzp00JwNFZBlRXLijJBmqOikbSyoeHAfXnBqjFniCdLTugkM
VCCwMh4r4ATqciYvwACbIQKBgByqFLVx+AxtgCDgUfb7+euzY6+GoclQNjt2W41S
y18cN5EU1MklQLuSjOIjxlLQS8sdvtThdxPenoQ2gWq5+MHKGlSEh6sUU/VwKrhp
tnJNeLf5RfvmnsFpDezMGbwILC0ON3I/POl2/bCSohaX9fQwzxgr5NwkhWanTRaF
BI0HAoGAakkHNsRhw+7rl/sZqTCIh2NuGUsxuzWDMb+8yW3iFB3Dq/cbR/6B2qMU
zlzCi9wHjbgDYM6MwBHE+PAXwHxerefaCKx3zBt2nmEeNconDKPHJpSeNZ75BXxj
pAUpmD0qZpG1BWVe9Pcjjml6Y1BPezZyYvTabag00xxviPKZSAk=
-----END RSA PRIVATE KEY-----

"""


@functools.cache
def signer() -> tuple:
    """(private key, certificate) of the corpus signer."""
    key = serialization.load_pem_private_key(_KEY_PEM, password=None)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "seg-fast corpus signer"),
                      x509.NameAttribute(NameOID.EMAIL_ADDRESS, SIGNER_EMAIL)])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc))
            .not_valid_after(datetime.datetime(2036, 1, 1, tzinfo=datetime.timezone.utc))
            .add_extension(x509.SubjectAlternativeName([x509.RFC822Name(SIGNER_EMAIL)]), critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def sign_detached(data: bytes) -> bytes:
    """A detached PKCS#7 signature (DER) over exactly ``data``."""
    key, cert = signer()
    return (pkcs7.PKCS7SignatureBuilder().set_data(data).add_signer(cert, key, hashes.SHA256())
            .sign(serialization.Encoding.DER, [pkcs7.PKCS7Options.DetachedSignature,
                                               pkcs7.PKCS7Options.Binary,
                                               pkcs7.PKCS7Options.NoAttributes]))
