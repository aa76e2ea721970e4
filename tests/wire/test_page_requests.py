"""The REQ_PAGES / REQ_PAGES_ID fast path builds and reads exactly what the schema does.

``PageRequests`` builds the two page-request messages and reads well-formed ones without
construct, declining the rest. Every request it builds must be byte-identical to the
schema's; and a return path holding any messages, intact or damaged (a byte changed, bytes
cut off the end), fed whole or in pieces, must read to the same records, or fail with the
same error (class, field, message and offset), whether the fast path is on or off.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from reading import Outcome, assert_same, read_outcome

from qmig import strategies as qs
from qmig.wire import messages as m
from qmig.wire.page_requests import PageRequests
from qmig.wire.profiles import available_versions
from qmig.wire.reader import ReturnPathReader
from qmig.wire.schema import schema_for

VERSIONS = available_versions()


def read(data: bytes, *, fast: bool, version: str, chunk: int) -> Outcome:
    """The records of ``data`` up to the error, if any; with the fast path on or off."""
    reader = ReturnPathReader(version)
    reader._page_requests.enabled = fast
    return read_outcome(reader, data, chunk)


@pytest.mark.parametrize("version", VERSIONS)
@given(data=st.data())
def test_builds_what_the_schema_builds(version: str, data: st.DataObject) -> None:
    schema = schema_for(version)
    message = data.draw(st.one_of(qs.req_pages(), qs.req_pages_ids()))
    assert PageRequests(schema).build(message) == schema.build_rp(message)


@pytest.mark.parametrize("version", VERSIONS)
@settings(max_examples=300)
@given(data=st.data())
def test_reads_what_the_schema_reads(version: str, data: st.DataObject) -> None:
    schema = schema_for(version)
    messages = data.draw(
        st.lists(
            st.one_of(qs.req_pages(), qs.req_pages_ids(), qs.return_path_messages(version)),
            min_size=1,
            max_size=6,
        )
    )
    stream = bytearray(b"".join(schema.build_rp(message) for message in messages))
    damage = data.draw(st.sampled_from(["none", "byte", "cut"]))
    if damage == "byte":
        at = data.draw(st.integers(0, len(stream) - 1))
        stream[at] = data.draw(st.integers(0, 255))
    elif damage == "cut":
        del stream[data.draw(st.integers(0, len(stream) - 1)) :]
    chunk = data.draw(st.sampled_from([1, 3, 7, 16, len(stream) or 1]))
    fast = read(bytes(stream), fast=True, version=version, chunk=chunk)
    slow = read(bytes(stream), fast=False, version=version, chunk=chunk)
    assert_same(fast, slow)
    if damage == "none":
        # The source refers a REQ_PAGES to the block the last REQ_PAGES_ID named: one with
        # none before it ends the reading there.
        named = [isinstance(message, m.ReqPagesId) for message in messages]
        orphans = [
            at
            for at, message in enumerate(messages)
            if isinstance(message, m.ReqPages) and not any(named[:at])
        ]
        readable = messages[: orphans[0]] if orphans else messages
        assert [record.message for record in fast[0]] == readable
        assert (fast[1] is None) == (not orphans)
        if orphans:
            assert fast[1] is not None and fast[1].what == "REQ_PAGES"


def test_declines_what_is_not_a_well_formed_request() -> None:
    schema = schema_for("7.2")
    requests = PageRequests(schema)
    good = schema.build_rp(m.ReqPagesId(0x2000, 0x1000, "pc.ram"))
    assert requests.read(good, 0, len(good)) == (m.ReqPagesId(0x2000, 0x1000, "pc.ram"), 23)
    assert requests.read(good, 0, len(good) - 1) is None  # not complete yet
    longer = good[:3] + bytes([good[3] + 1]) + good[4:] + b"x"  # length says one more
    assert requests.read(longer, 0, len(longer)) is None
    pong = schema.build_rp(m.Pong(7))
    assert requests.read(pong, 0, len(pong)) is None
    odd = schema.build_rp(m.ReqPages(0, 0x1000))
    odd = odd[:3] + b"\x0d" + odd[4:] + b"\x00"  # REQ_PAGES claiming 13 bytes
    assert requests.read(odd, 0, len(odd)) is None
