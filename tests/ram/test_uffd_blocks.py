"""RAM blocks on real userfaultfd: placement, discard, zero pages, huge pages, read guard."""

from __future__ import annotations

import pytest
from ram_uffd_harness import Frozen, run_scenario

pytestmark = pytest.mark.uffd

MiB = 1 << 20


def test_discard_clears_the_bitmap_and_the_pages_fault_again() -> None:
    found = run_scenario("discard_refault")
    assert found["faults_before"] == 0  # everything was placed before the vCPU ran
    assert found["after_discard"] == found["pages"] - 256
    assert found["faults_after"] == 256 and found["requests_after"] == 256
    assert found["read_refused"] is True
    assert found["complete_again"] is True and found["mismatches"] == 0 and found["tag_ok"]
    assert found["discarded"] == 256
    assert found["thp_before"] and found["thp_off_after_discard"]  # as QEMU does around discards
    outside, unaligned, empty = found["errors"]
    assert outside.startswith("RAM: block 'pc.ram': discard 0x3ff000+0x2000 is outside")
    assert "not aligned" in unaligned
    assert "outside" in empty


def test_zero_pages_are_placed_with_zeropage_and_read_as_zero() -> None:
    found = run_scenario("zero_pages")
    assert found["zero_pages"] == found["pages"]
    assert found["checksum"] == 0 and found["first_words_zero"] and not found["aborted"]


def test_huge_page_blocks_place_whole_host_pages_only() -> None:
    found = run_scenario("huge_pages")
    assert found["placed_before_last"] is False  # 511 of 512 target pages: nothing placed
    assert found["placed_after_last"] is True
    assert found["big_stats"]["placed_pages"] == 2  # one gathered, one zero (copied)
    assert found["zero_word"] == 0 and found["tag_ok"]
    assert found["requests"] == [[0, 2 * MiB], [2 * MiB, 2 * MiB]]
    assert found["lazy_stats"]["placed_pages"] == 2 and found["mismatches"] == 0


def test_missing_huge_pages_fail_at_once_with_a_way_out() -> None:
    two_mib, one_gib = run_scenario("huge_pages_unavailable")["errors"]
    assert two_mib.startswith("huge pages: cannot map block 'big.ram': it needs 4096 free 2 MiB")
    assert "nr_hugepages" in two_mib
    assert one_gib.startswith("huge pages: ")


def test_python_reads_of_unplaced_ram_are_refused() -> None:
    found = run_scenario("read_guard")
    assert all(message and "not in place" in message for message in found["refused"])
    assert found["allowed"] == "00" * 8


def test_touching_a_missing_page_from_python_freezes_and_the_harness_catches_it() -> None:
    # The trap the read guard and the C vCPUs exist for; if this ever stops freezing, the
    # guard's reason has changed and this test says so.
    with pytest.raises(Frozen):
        run_scenario("gil_trap", timeout=5)


def test_an_mlocked_process_is_unlocked_for_postcopy_and_locked_again() -> None:
    found = run_scenario("mlocked")
    assert found["locked_before"] > 0
    assert found["locked_during"] == 0 and found["resident_at_start"] == 0
    assert found["faults"] == found["pages"] and found["mismatches"] == 0
    assert found["locked_after"] > 0
