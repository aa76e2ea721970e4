"""The memory oracle on synthetic dumps (every shape it must accept or reject)."""

from __future__ import annotations

import pytest

from qmig.errors import VerificationError
from qmig.qemu.guest import MIB, PAGE_SIZE, GuestSpec
from qmig.qemu.oracle import verify_counters

SPEC = GuestSpec(end=4 * MIB)  # 768 pages


def dump_of(counters: list[int], spec: GuestSpec = SPEC) -> bytes:
    assert len(counters) == spec.pages
    memory = bytearray(spec.end - spec.start)
    memory[:: spec.stride] = bytes(counters)
    return bytes(memory)


def test_all_equal_pages_pass() -> None:
    picture = verify_counters(dump_of([9] * SPEC.pages), SPEC.start, SPEC)
    assert picture.boundary is None
    assert picture.low_value == 9


def test_two_runs_one_apart_pass_and_locate_the_incrementer() -> None:
    picture = verify_counters(dump_of([5] * 100 + [4] * 668), SPEC.start, SPEC)
    assert picture.boundary == SPEC.start + 100 * PAGE_SIZE
    assert picture.low_value == 5


def test_runs_wrap_modulo_256() -> None:
    verify_counters(dump_of([0] * 10 + [255] * 758), SPEC.start, SPEC)


def test_dump_may_start_below_the_guest_range() -> None:
    prefix = bytes(range(256)) * 16  # one page of noise below the range is ignored
    verify_counters(prefix + dump_of([3] * SPEC.pages), SPEC.start - PAGE_SIZE, SPEC)


@pytest.mark.parametrize(
    ("counters", "first_bad"),
    [
        ([7] * 5 + [9] + [7] * 762, 5),  # a stray page in an all-equal range
        ([5] * 100 + [3] * 668, 0),  # runs two apart
        ([4] * 100 + [5] * 668, 0),  # high run above low run: pages went backwards
        ([5] * 100 + [4] * 50 + [5] + [4] * 617, 150),  # a page from a newer pass
        ([5] * 100 + [4] * 568 + [0] * 100, 668),  # a tail of never-migrated pages
    ],
)
def test_inconsistent_dumps_fail_and_name_the_first_bad_page(
    counters: list[int], first_bad: int
) -> None:
    with pytest.raises(VerificationError) as error:
        verify_counters(dump_of(counters), SPEC.start, SPEC)
    message = str(error.value)
    assert message.startswith("memory content inconsistency: ")
    assert f"{SPEC.start + first_bad * PAGE_SIZE:#x}=" in message


def test_mostly_unmigrated_memory_fails_too() -> None:
    # Most pages zero: the best fit is "all zero" and the migrated pages are the odd ones.
    with pytest.raises(VerificationError, match="150 of 768 pages"):
        verify_counters(dump_of([5] * 100 + [4] * 50 + [0] * 618), SPEC.start, SPEC)


def test_dump_not_covering_the_range_is_an_error() -> None:
    with pytest.raises(VerificationError, match="memory dump"):
        verify_counters(bytes(MIB), SPEC.start, SPEC)


WALKED = GuestSpec(end=4 * MIB, walk=7)  # 768 pages, touched 0, 7, 14, ... modulo 768


def walked_dump(in_walk_order: list[int], spec: GuestSpec = WALKED) -> bytes:
    """A dump whose counters read ``in_walk_order`` in the order the guest touches pages."""
    counters = [0] * spec.pages
    for index, value in enumerate(in_walk_order):
        counters[spec.touched(index)] = value
    return dump_of(counters, spec)


def test_a_walked_pass_is_read_in_the_walks_order() -> None:
    picture = verify_counters(walked_dump([5] * 100 + [4] * 668), WALKED.start, WALKED)
    assert picture.low_value == 5
    assert picture.boundary == WALKED.start + WALKED.touched(100) * PAGE_SIZE
    # The same two runs in address order are no picture a walking guest leaves.
    with pytest.raises(VerificationError, match="memory content inconsistency"):
        verify_counters(dump_of([5] * 100 + [4] * 668, WALKED), WALKED.start, WALKED)


def test_a_walked_pass_names_its_bad_page_by_address() -> None:
    counters = [5] * 100 + [4] * 50 + [5] + [4] * 617  # the 150th page touched is newer
    with pytest.raises(VerificationError) as error:
        verify_counters(walked_dump(counters), WALKED.start, WALKED)
    assert f"{WALKED.start + WALKED.touched(150) * PAGE_SIZE:#x}=5" in str(error.value)
