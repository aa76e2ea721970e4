"""The userfaultfd binding against the real kernel, each case in its own process."""

from __future__ import annotations

import pytest
from ram_uffd_harness import run_scenario

from qmig.ram.blocks import TARGET_PAGE_SIZE

pytestmark = pytest.mark.uffd

NOBODY = 65534


def test_handshake_reports_offered_features_and_enables_thread_ids() -> None:
    found = run_scenario("handshake")
    assert {"REGISTER", "UNREGISTER", "API"} <= set(found["api_ioctls"])
    assert "MISSING_HUGETLBFS" in found["offered"]
    assert found["opened_via"] in ("syscall", "/dev/userfaultfd")
    assert found["thread_id"] == ("THREAD_ID" in found["offered"])
    assert found["missing_feature"] == (
        f"userfaultfd: missing userfault features: 0x{1 << 40:x} (use a newer kernel)"
    )


def test_fault_messages_carry_address_flags_and_thread_id() -> None:
    found = run_scenario("raw_faults")
    assert found["offsets"] == [0, 2 * TARGET_PAGE_SIZE, 4 * TARGET_PAGE_SIZE]
    assert found["flags"] == [0, 0, 0]  # read faults
    assert found["events"] == [0x12] * 3  # UFFD_EVENT_PAGEFAULT
    assert found["message_tids"] == found["vcpu_tids"]
    assert found["aborted"] == [False] * 3


def test_dontwake_copy_leaves_the_waiter_asleep_until_wake_and_duplicates_say_eexist() -> None:
    found = run_scenario("copy_modes")
    assert found["request"] == ["pc.ram", 0, TARGET_PAGE_SIZE]
    assert found["placed"] is True
    assert found["asleep_after_dontwake"] is True
    assert found["woke_after_wake"] is True
    assert found["duplicate_copy_placed"] is False  # EEXIST, not an error
    assert found["block_first"] == [1, 0] and found["block_again"] == [0, 1]
    assert found["zero"] == [1, 0] and found["zero_again"] == [0, 1]
    assert found["mismatches"] == 0 and found["aborted"] is False
    assert found["stats"]["duplicate_pages"] == 2


def test_a_vanished_faulting_side_is_reported_not_retried() -> None:
    esrch, enoent = run_scenario("faulting_side_gone")["gone"]
    assert esrch is not None and "ESRCH" in esrch and "faulting side went away" in esrch
    assert enoent is not None and "ENOENT" in enoent


def test_refused_access_says_what_to_do() -> None:
    found = run_scenario("handshake_refused", user=NOBODY)
    assert found["message"].startswith("userfaultfd: not available: ")
    assert "run as root" in found["message"] and "/dev/userfaultfd" in found["message"]


def test_a_refused_syscall_falls_back_to_dev_userfaultfd() -> None:
    # nobody may not use the syscall (vm.unprivileged_userfaultfd=0) but may open the device.
    found = run_scenario("handshake", user=NOBODY, grant_device=True)
    assert found["opened_via"] == "/dev/userfaultfd"
    assert "THREAD_ID" in found["offered"]


def test_an_unprivileged_user_with_the_device_serves_faults() -> None:
    found = run_scenario("faults_only", user=NOBODY, grant_device=True)
    assert found["faults"] == found["placed"] == found["pages"] and found["mismatches"] == 0
