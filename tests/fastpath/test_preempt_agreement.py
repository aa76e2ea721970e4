"""The C receive path on the postcopy-preempt channel places what the channel's machine
places, and changes nothing else.

The same migration goes through a real destination twice, with a C thread reading the
preempt channel once the guest runs and without it (``preempt_harness``): both runs must
end alike, with the same error at the same offset (or none), the same pages received and
their contents (right after the preempt channel's bytes, and at the end), the same counts.
Preempt channels: pages built from ``qmig.strategies`` (fresh pages, pages the main channel
brought already, CONTINUE runs, zero pages), the source's own EOS (pre-7.2), and hostile
ones (a byte changed, a header, a non-page record, a page outside its block or of a block
never announced, a record cut short). Each fast run that places must have placed itself.
"""

from __future__ import annotations

from datetime import timedelta
from functools import cache

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from preempt_harness import (
    BLOCK,
    PAGE,
    PAGES,
    MainStream,
    PreemptOutcome,
    assert_runs_agree,
    main_stream,
    run_preempt,
)

from qmig import strategies as qs
from qmig.protocol.preempt import PreemptVariant
from qmig.wire import messages as m
from qmig.wire.schema import schema_for

pytestmark = pytest.mark.uffd
VARIANTS = [PreemptVariant.V8_0, PreemptVariant.PRE_7_2]
SETTINGS = settings(
    max_examples=30,
    deadline=timedelta(seconds=60),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@cache
def stream_for(variant: PreemptVariant) -> MainStream:
    return main_stream(variant)


def both(
    variant: PreemptVariant, preempt: bytes, pieces: list[int] | None = None
) -> tuple[PreemptOutcome, PreemptOutcome]:
    stream = stream_for(variant)
    fast = run_preempt(variant, stream, preempt, fast_path=True, pieces=pieces or [])
    slow = run_preempt(variant, stream, preempt, fast_path=False, pieces=pieces or [])
    assert_runs_agree(fast, slow)
    return fast, slow


def page(variant: PreemptVariant, index: int, *, named: bool = True, zero: bool = False) -> bytes:
    schema = schema_for(_version(variant))
    data = bytes([1]) if zero else bytes([index % 251 + 1]) * PAGE
    return schema.build_ram_page(m.RamPage(BLOCK if named else None, index * PAGE, zero, data))


def _version(variant: PreemptVariant) -> str:
    return "10.0" if variant is PreemptVariant.V8_0 else "7.2"


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.value)
def test_requested_pages_are_placed_by_the_c_thread(variant: PreemptVariant) -> None:
    """Missing pages (dirtied, so discarded), pages already in place, a CONTINUE run and a
    zero page, then the source's own end of the channel: the C thread takes every record."""
    records = [page(variant, 8), page(variant, 9, named=False), page(variant, 0)]
    records += [page(variant, 11, zero=True), page(variant, 14, named=False)]
    preempt = b"".join(records) + stream_for(variant).end
    fast, _slow = both(variant, preempt, pieces=[len(records[0]) + 100])
    assert fast.error is None
    assert fast.preempt_pages == len(records)
    taken = fast.fast_path
    assert taken["preempt_records"] == len(records)
    assert taken["place_errors"] == 0
    # Page 0 came on the main channel before: found in place, placed once.
    assert taken["existing"] >= 1


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.value)
@pytest.mark.parametrize(
    "hostile",
    [
        "header",
        "header-like-a-page",
        "not-a-page",
        "outside-block",
        "unknown-block",
        "cut-short",
        "after-eos",
    ],
)
def test_hostile_preempt_channels_fail_alike(variant: PreemptVariant, hostile: str) -> None:
    """What the C thread does not follow is the machine's: the same one-line error at the
    same offset, and the pages before it placed alike."""
    schema = schema_for(_version(variant))
    good = page(variant, 8) + page(variant, 9, named=False)
    bad = {
        "header": schema.header.build(m.StreamHeader(3)) + bytes(8) + good,
        # The magic, then what reads as a PAGE record's flags and a block name: still a
        # header, whatever its version field says.
        "header-like-a-page": schema.header.build(m.StreamHeader(3))[:4]
        + schema.profile.ram_flags["PAGE"].to_bytes(4, "big")
        + page(variant, 8)[8:],
        "not-a-page": good + schema.build_ram_flag("MEM_SIZE", 0) + page(variant, 10),
        "outside-block": good + page(variant, PAGES),
        "unknown-block": good + schema.build_ram_page(m.RamPage("pc.rom", 0, False, bytes(PAGE))),
        "cut-short": good + page(variant, 10)[:-100],
        "after-eos": good + schema.build_ram_flag("EOS") + page(variant, 11),
    }[hostile]
    fast, _slow = both(variant, bad)
    if hostile in ("cut-short", "after-eos"):
        return  # the end decides (the 8.0 channel is closed unread, pre-7.2 waits for EOS)
    assert fast.error is not None and fast.error.startswith("preempt channel")
    if not hostile.startswith("header"):
        assert fast.fast_path["preempt_records"] == 2


@st.composite
def preempt_channels(draw: st.DrawFn, variant: PreemptVariant) -> bytes:
    """Page records of the migration's block: fresh or not, named or CONTINUE, data or zero
    (from qmig.strategies' page contents), sometimes with a byte changed or cut short."""
    schema = schema_for(_version(variant))
    records = []
    for index in draw(st.lists(st.integers(0, PAGES - 1), min_size=1, max_size=12)):
        zero = draw(st.booleans())
        data = draw(st.binary(min_size=1, max_size=1)) if zero else draw(qs.page_contents())
        named = not records or draw(st.booleans())
        records.append(
            schema.build_ram_page(m.RamPage(BLOCK if named else None, index * PAGE, zero, data))
        )
    out = bytearray(b"".join(records))
    if draw(st.booleans()):
        at = draw(st.integers(0, len(out) - 1))
        out[at] ^= draw(st.integers(1, 255))
    if draw(st.booleans()):
        out = out[: draw(st.integers(1, len(out)))]
    return bytes(out)


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.value)
@SETTINGS
@given(data=st.data())
def test_generated_preempt_channels(variant: PreemptVariant, data: st.DataObject) -> None:
    preempt = data.draw(preempt_channels(variant), label="preempt channel")
    cut = data.draw(st.integers(0, len(preempt)), label="piece")
    fast, _slow = both(variant, preempt, pieces=[cut])
    if fast.preempt_pages and fast.error is None:
        assert fast.fast_path.get("preempt_records", 0) > 0
