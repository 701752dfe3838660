"""Independent check of the kit's documents: libwbxml (wbxml2xml) decodes a sample of
generated requests, answers and mutated requests to the very trees we generated.

libwbxml knows pages 0-24 (not Find, nor a few late tokens): documents using a tag
it lacks are left out of the sample (test_wbxml_libwbxml.LIBWBXML_KNOWS), and so are
mutations that add unknown tokens (libwbxml rejects those, as it may).
"""
from __future__ import annotations

import shutil

import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from seg_fast.eas import codepages
from seg_fast.eas.wbxml import Element, encode, from_xml, to_xml
from seg_fast.testing import answer, commands_for, mutated, request
from seg_fast.testing.spec import VERSIONS
from test_wbxml_libwbxml import LIBWBXML_KNOWS, lib_decode

pytestmark = pytest.mark.skipif(shutil.which("wbxml2xml") is None,
                                reason="libwbxml2-utils not installed (scripts/test.sh installs it)")

SAMPLE = settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PAIRS = st.sampled_from(VERSIONS).flatmap(lambda v: st.tuples(st.just(v), st.sampled_from(commands_for(v))))


def as_xml_reads_it(root: Element) -> Element:
    """What survives XML: opaque content of tags libwbxml does not base64 reads back as
    text, and an empty string as no content (<SyncKey></SyncKey>)."""
    root = from_xml(to_xml(root))
    for el in root.iter():
        if el.text == "":
            el.text = None
    return root


def known_to_libwbxml(doc) -> bool:
    # and XML-representable: libwbxml writes the tags of BASE64_TAGS as base64, so they
    # cannot hold inline text (a mutation may put some there)
    return isinstance(doc, Element) and all(
        el.tag in LIBWBXML_KNOWS and not (el.tag in codepages.BASE64_TAGS and el.text is not None)
        for el in doc.iter())


@SAMPLE
@given(PAIRS, st.data())
def test_libwbxml_decodes_generated_requests_and_answers(tmp_path_factory, pair, data):
    version, command = pair
    doc = data.draw(st.one_of(request(command, version), answer(command, version)))
    assume(known_to_libwbxml(doc))
    got = lib_decode(encode(doc), tmp_path_factory.mktemp("lib"))
    assert as_xml_reads_it(got) == as_xml_reads_it(doc)


@settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(PAIRS, st.data())
def test_libwbxml_decodes_mutated_requests(tmp_path_factory, pair, data):
    version, command = pair
    m = data.draw(mutated(request(command, version), version, byte_level=False))
    assume(known_to_libwbxml(m.doc))     # tree mutations keep a document libwbxml can read
    got = lib_decode(encode(m.doc), tmp_path_factory.mktemp("lib"))
    assert as_xml_reads_it(got) == as_xml_reads_it(m.doc)
