"""The project's exception hierarchy.

Plain Python classes, so the compiled extensions raise these and callers catch
one family. Messages never carry mail content or credentials.
"""


class SegFastError(Exception):
    """Base of every error seg-fast raises on purpose."""


class WBXMLError(SegFastError):
    """Malformed or unsupported WBXML. ``offset`` is the byte where it was found."""

    def __init__(self, message: str, offset: int = -1):
        self.offset = offset
        super().__init__(f"{message} at byte {offset}" if offset >= 0 else message)


class SpanLimitError(WBXMLError):
    """``scan`` found more spans than its ``max_spans`` (a hostile answer)."""


class MultipartError(SegFastError):
    """A malformed application/vnd.ms-sync.multipart body. ``offset`` as in WBXMLError."""

    def __init__(self, message: str, offset: int = -1):
        self.offset = offset
        super().__init__(f"{message} at byte {offset}" if offset >= 0 else message)


class ConfigError(SegFastError):
    """A configuration file that cannot be used; the message names file and key."""


class EASRequestError(SegFastError):
    """A device request whose EAS identification is malformed (answered with 400)."""


class PolicyError(SegFastError):
    """A policy document or device record that is rejected whole."""


class MIMEError(SegFastError):
    """A MIME message the content pipeline cannot walk."""


class ContentError(SegFastError):
    """An answer the content pipeline cannot transform (too large, undecodable)."""


class EnvelopeError(SegFastError):
    """An attachment envelope that cannot be opened (wrong key, damaged, not ours)."""


class StartupError(SegFastError):
    """`seg-fast serve` cannot start (a taken port, a locked listener); the message names the key."""


class HTTPProtocolError(SegFastError):
    """An HTTP/1.1 message the compiled parser rejects; ``status`` is the answer (400, 431, ...)."""

    def __init__(self, message: str, status: int = 400):
        self.status = status
        super().__init__(message)


class SOAPError(SegFastError):
    """An EWS SOAP request body the gateway will not forward (not XML, a DTD, a malformed impersonation)."""
