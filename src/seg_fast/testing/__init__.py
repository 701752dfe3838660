"""seg_fast.testing: a fuzzing kit for Exchange ActiveSync (install: pip install 'seg-fast[fuzz]').

Hypothesis strategies for valid EAS requests and answers per MS-ASCMD and
protocol version, as trees (``seg_fast.eas.wbxml.Element``) and as WBXML, on the
wire in both query forms; MIME messages in the shapes real mail has; mutators
that keep a document decodable but break the protocol, and byte-level ones; the
answer classifier and the runner behind ``seg-fast fuzz``. See docs/fuzzing.md.

    from hypothesis import given
    from seg_fast.testing import request, answer, mutated, http_requests, Known

    @given(request("Sync", "16.1"))
    def test_my_parser_takes_every_sync(tree): ...
"""
from __future__ import annotations

try:
    import hypothesis  # noqa: F401
except ImportError:         # the gateway itself never needs hypothesis
    raise ImportError("seg_fast.testing needs hypothesis: install the 'fuzz' extra, "
                      "pip install 'seg-fast[fuzz]'") from None

from seg_fast.testing.answers import answer  # noqa: E402
from seg_fast.testing.classify import Answer, Verdict, classify  # noqa: E402
from seg_fast.testing.mime import attachments, corpus_messages, mime_messages  # noqa: E402
from seg_fast.testing.mutators import Mutation, byte_mutation, mutated, mutated_bytes, tree_mutation  # noqa: E402
from seg_fast.testing.requests import Known, as_wbxml, commands_for, request, requests  # noqa: E402
from seg_fast.testing.spec import COMMANDS, SINCE, STATUS, VERSIONS, first_version, status_ok  # noqa: E402
from seg_fast.testing.wire import Device, HttpRequest, build, http_requests  # noqa: E402

__all__ = [
    "Answer", "COMMANDS", "Device", "HttpRequest", "Known", "Mutation", "SINCE", "STATUS", "VERSIONS", "Verdict",
    "answer", "as_wbxml", "attachments", "build", "byte_mutation", "classify", "commands_for", "corpus_messages",
    "first_version", "http_requests", "mime_messages", "mutated", "mutated_bytes", "request", "requests",
    "status_ok", "tree_mutation",
]
