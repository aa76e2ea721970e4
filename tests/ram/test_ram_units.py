"""Parts of the RAM layer that need no userfaultfd: bitmap, sizes, statistics."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qmig.ram.blocks import PageBitmap
from qmig.ram.faults import LatencySummary, _all_blocked
from qmig.ram.support import parse_size
from qmig.ram.uffd import feature_names, ioctl_names, missing

BITS = 300
ranges = st.tuples(st.booleans(), st.integers(0, BITS - 1), st.integers(0, 40))


@given(st.lists(ranges, max_size=30))
def test_bitmap_matches_a_set_of_pages(operations: list[tuple[bool, int, int]]) -> None:
    bitmap, model = PageBitmap(BITS), set()
    for setting, start, count in operations:
        count = min(count, BITS - start)
        (bitmap.set if setting else bitmap.clear)(start, count)
        (model.update if setting else model.difference_update)(range(start, start + count))
    assert bitmap.count() == len(model)
    assert [bit for bit in range(BITS) if bitmap.test(bit)] == sorted(model)
    first_clear = next((bit for bit in range(BITS) if bit not in model), BITS)
    assert bitmap.next_clear() == first_clear
    assert bitmap.all_set(0, BITS) == (len(model) == BITS)


def test_bitmap_refuses_ranges_past_its_end() -> None:
    with pytest.raises(IndexError):
        PageBitmap(10).set(8, 3)


@pytest.mark.parametrize(
    ("text", "size"),
    [("4096", 4096), ("4k", 4096), ("2M", 2 << 20), ("2MiB", 2 << 20), ("1G", 1 << 30)],
)
def test_sizes_parse_as_people_write_them(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_a_size_that_is_not_one_is_refused() -> None:
    with pytest.raises(ValueError):
        parse_size("two megs")


def test_latency_summary_percentiles() -> None:
    summary = LatencySummary.of(list(range(1, 101)))
    assert (summary.count, summary.p50_ns, summary.p99_ns, summary.max_ns) == (100, 50, 100, 100)
    assert LatencySummary.of([]) == LatencySummary()


def test_all_blocked_time_counts_only_overlap_of_every_thread() -> None:
    intervals = [(0, 10, 1), (5, 20, 2), (30, 40, 1)]
    assert _all_blocked(intervals, 2) == 5
    assert _all_blocked(intervals, 1) == 30


def test_feature_and_ioctl_names() -> None:
    assert feature_names((1 << 8) | (1 << 4) | (1 << 40)) == [
        "MISSING_HUGETLBFS",
        "THREAD_ID",
        f"0x{1 << 40:x}",
    ]
    assert ioctl_names(0b111) == ["REGISTER", "UNREGISTER", "WAKE"]
    assert missing(("WAKE", "COPY", "ZEROPAGE"), 0b100) == ["COPY", "ZEROPAGE"]
