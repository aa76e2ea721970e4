"""The C receive path places what the protocol machine places, and changes nothing else.

The same stream goes through a real destination (userfaultfd RAM, a socket) twice: with the
C thread reading the channel once the guest runs, and without it. Both runs must end alike:
the same error at the same offset (or none), the same pages received in every block, the
same contents, the same page counts and requests. Streams: real QEMU 7.2 captures, the
generated postcopy streams of ``qmig.strategies``, and both with bytes of their postcopy
part changed. Each fast run must also have taken pages itself, or the test proves nothing.
Generated streams are fed so that the C thread takes over at RUN (see ``fastpath_harness``),
with a page touched there, so that both runs must also ask for the same pages.
"""

from __future__ import annotations

import contextlib
from datetime import timedelta

import pytest
from fastpath_harness import (
    AGREED,
    Outcome,
    Touch,
    after_run,
    assert_same,
    fixture_stream,
    run_destination,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qmig import strategies as qs
from qmig.errors import QmigError
from qmig.wire import messages as m
from qmig.wire.reading.stream import StreamReader

pytestmark = pytest.mark.uffd
PAGE = 4096  # the generated streams' target page (7.2's default)
SETTINGS = settings(
    max_examples=30,
    deadline=timedelta(seconds=20),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# Generated streams are small: as many examples as the profile runs (CI's, or ``thorough``
# for a hunt with QMIG_HYPOTHESIS=thorough).
GENERATED_SETTINGS = settings(
    deadline=timedelta(seconds=60),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def assert_agree(fast: Outcome, slow: Outcome) -> None:
    assert_same(fast, slow, *AGREED, "requests", "asked", "replies")
    assert slow.fast_path == {}


@pytest.mark.parametrize("name", ["postcopy-tcp", "postcopy-sparse"])
def test_captures(name: str) -> None:
    """Fed in two pieces, the second from the first section after RUN on: the C thread then
    takes every postcopy page record after it (a capture sent in one go may have been read
    by Python, RUN and all, before the thread starts, and the thread then takes less)."""
    stream = fixture_stream(name)
    run_end = after_run(stream, "7.2")
    assert run_end is not None
    pieces = [run_end]
    fast = run_destination(stream, "7.2", fast_path=True, pieces=pieces)
    slow = run_destination(stream, "7.2", fast_path=False, pieces=pieces)
    assert fast.error is None
    assert_agree(fast, slow)
    taken = fast.fast_path
    assert taken["placed"] + taken["existing"] == taken["records"]
    assert taken["place_errors"] == 0
    assert taken["syncs"] == 1
    assert taken["records"] == fast.placed_pages["postcopy"] > 0


@SETTINGS
@given(data=st.data())
def test_capture_changed_after_run(data: st.DataObject) -> None:
    """A byte of the postcopy part (the last 40%, well after RUN) changed: a header, a
    section, a page's bytes or a command; both runs fail or finish alike."""
    capture = fixture_stream("postcopy-tcp")
    start = len(capture) * 6 // 10
    at = data.draw(st.integers(start, len(capture) - 1), label="offset")
    value = data.draw(st.integers(1, 255), label="xor")
    stream = bytearray(capture)
    stream[at] ^= value
    # The C thread takes over before the changed byte (RUN is at about 30% of the capture).
    run_end = after_run(capture, "7.2")
    assert run_end is not None and run_end < start
    assert_agree(
        run_destination(bytes(stream), "7.2", fast_path=True, pieces=[run_end]),
        run_destination(bytes(stream), "7.2", fast_path=False, pieces=[run_end]),
    )


def plan(stream: bytes) -> tuple[int | None, Touch | None]:
    """Where the stream's guest starts running (the first piece ends there), and a page to
    touch then: one of a small-page block that is not in place at RUN (never sent before,
    or discarded since) and that a page record after RUN brings."""
    run_end = after_run(stream, "7.2")
    if run_end is None:
        return None, None
    reader = StreamReader("7.2")
    reader.feed(stream)
    present: set[tuple[str, int]] = set()
    sizes: dict[str, int] = {}
    with contextlib.suppress(QmigError):
        for record in reader:
            message = record.message
            if isinstance(message, m.MemSize):
                sizes = {info.idstr: info.page_size or PAGE for info in message.blocks}
            elif isinstance(message, m.PostcopyRamDiscard):
                for piece in message.ranges:
                    for at in range(piece.start, piece.start + piece.length, PAGE):
                        present.discard((message.block, at))
            elif isinstance(message, m.RamPageRun):
                for header in message.headers:
                    page = (message.block, header & ~(PAGE - 1))
                    if record.offset < run_end:
                        present.add(page)
                    elif page not in present and sizes.get(message.block) == PAGE:
                        return run_end, Touch(page[0], page[1], PAGE)
    return run_end, None


@GENERATED_SETTINGS
@given(generated=qs.postcopy_streams("7.2", large_pages=False), data=st.data())
def test_generated_streams(generated: qs.GeneratedStream, data: st.DataObject) -> None:
    """Generated postcopy streams, whole, cut, or with a byte changed (hostile), fed so that
    the C thread takes the channel over at RUN, in pieces of drawn sizes after it, with a
    page touched (and asked for) at RUN: both runs place, ask and fail alike."""
    stream = bytearray(generated.data)
    run_end, touch = plan(bytes(stream))
    changed = data.draw(st.booleans(), label="change a byte")
    if changed:
        at = data.draw(st.integers(len(stream) // 2, len(stream) - 1), label="offset")
        stream[at] ^= data.draw(st.integers(1, 255), label="xor")
    cut = data.draw(st.integers(len(stream) // 2, len(stream)), label="cut at")
    pieces = [run_end] if run_end is not None else []
    if run_end is not None and run_end < cut:
        pieces += data.draw(st.lists(st.integers(run_end, cut), max_size=4), label="pieces")
    fast = run_destination(bytes(stream[:cut]), "7.2", fast_path=True, pieces=pieces, touch=touch)
    slow = run_destination(bytes(stream[:cut]), "7.2", fast_path=False, pieces=pieces, touch=touch)
    assert_agree(fast, slow)
    if not changed and cut == len(stream) and touch is not None:
        # Intact, with pages after RUN: the C thread took them, and the touch was asked for.
        assert fast.error is None
        assert fast.fast_path["records"] > 0
        assert len(fast.asked) == 1
