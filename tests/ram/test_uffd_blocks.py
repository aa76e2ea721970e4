"""RAM blocks on real userfaultfd: placement, discard, zero pages, huge pages, read guard."""

from __future__ import annotations

from pathlib import Path

import pytest
from ram_uffd_harness import Frozen, run_scenario

from qmig.ram.blocks import TARGET_PAGE_SIZE

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


def test_batched_placement_agrees_with_the_per_page_path() -> None:
    found = run_scenario("batched_agrees")
    assert found["bitmaps_equal"] and found["received_is_model"]
    assert found["wrong_pages"] == [[], []]
    # 64 data pages, 32 zero pages, then 4 fill pages: three ioctls, not a hundred.
    assert found["ioctls"][0] <= 10
    assert found["stats"]["duplicate_pages"] >= 3  # page 5, page 400 again, EEXIST on 450
    assert found["range_error"].startswith(
        f"RAM: block 'b.ram': page 0x200000+0x{TARGET_PAGE_SIZE:x} is outside"
    )


def test_batched_placement_gathers_whole_huge_pages() -> None:
    found = run_scenario("batched_huge")
    assert found["steps"] == [False, True]
    assert found["bitmaps_equal"] and found["received_is_model"]
    assert found["wrong_pages"] == [[], []]
    assert len(found["errors"]) == 2 and all("another host page" in e for e in found["errors"])


def test_huge_blocks_before_listen_take_records_one_target_page_at_a_time() -> None:
    found = run_scenario("huge_precopy")
    assert found["written"] == found["records"]  # direct writes, re-sends included
    assert found["received_before"] is True
    assert found["requests"] == 1  # the host page never sent, and only it
    assert found["complete"] and found["wrong"] == []
    assert not found["aborted"]


def test_blocks_registered_at_listen_fault_on_exactly_the_pages_not_received() -> None:
    found = run_scenario("listen_registration")
    assert found["registered_before"] is False
    assert found["written"] == found["precopy_records"]  # memcpy, no ioctl
    assert found["overwritten"] is True  # a re-sent precopy page replaces the old one
    assert found["resident_never_after"] == 0  # populated but never received: dropped
    assert found["faults"] == found["requests"] == found["expected_faults"]
    assert found["complete"] and found["wrong"] == []
    assert not found["aborted"] and found["touches"] == 2048


def _kernel_offers_huge_zero_page() -> bool:
    thp = Path("/sys/kernel/mm/transparent_hugepage")
    try:
        enabled = (thp / "enabled").read_text()
        zero = (thp / "use_zero_page").read_text().strip()
    except OSError:
        return False
    return "[never]" not in enabled and zero == "1"


def test_precopy_zero_pages_cost_no_memory_and_writes_no_huge_pages() -> None:
    found = run_scenario("huge_zero_precopy")
    assert found["huge_zero"] is _kernel_offers_huge_zero_page()
    assert found["mapped"] == found["received"]  # every received page is in place
    assert found["anon_huge_kib"] == 0  # no write allocated a huge page
    if found["huge_zero"]:
        # The zero pages allocate nothing: what is resident is the data pages' 4 KiB each.
        assert found["rss_kib"] <= 4 * found["data_pages"] + 64
    # After registration exactly the pages never sent fault, and are served.
    assert found["requests"] == found["never"]
    assert found["complete"] and found["wrong"] == [] and not found["aborted"]


def test_limited_data_runs_place_one_data_page_per_copy() -> None:
    found = run_scenario("data_runs")
    assert found["ioctls_1"] == 8 + 1  # eight copies, one ZEROPAGE for the sixteen zero pages
    assert found["ioctls_0"] == 1 + 1
    assert found["placed_1"] == found["placed_0"] == 24
    assert found["right_1"] and found["right_0"]
