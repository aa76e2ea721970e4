"""The fault thread with C vCPUs on real userfaultfd."""

from __future__ import annotations

import pytest
from ram_uffd_harness import run_scenario

pytestmark = pytest.mark.uffd


def test_concurrent_vcpus_and_a_background_stream_place_every_page_exactly_once() -> None:
    found = run_scenario("concurrent")
    assert found["complete"] is True and found["settled"] is True
    assert found["placed"] == found["pages"]  # each page put in place once...
    # ...and every other arrival, from the stream or a served fault, was an EEXIST duplicate.
    assert (
        found["placed"] + found["duplicates"]
        == found["attempts"] + found["requests"] + found["pages"]
    )
    assert found["resent"] == [0, found["pages"]]
    assert found["pending"] == 0 and found["strays"] == 0 and found["fault_error"] is None
    for result in found["results"]:
        assert result["mismatches"] == 0 and not result["aborted"] and result["touches"] > 0


def test_c_vcpus_never_deadlock_with_the_python_fault_thread() -> None:
    # Two vCPUs fault on every page of 8 MiB; a Python thread serves each one. Finishing at
    # all (the harness kills a frozen run) is the proof; the counts say nothing was skipped.
    found = run_scenario("faults_only", timeout=30)
    pages = found["pages"]
    assert found["faults"] == found["requests"] == found["placed"] == pages
    assert found["duplicates"] == 0 and found["mismatches"] == 0 and found["digest_ok"]
    latency = found["latency"]
    assert (
        latency["count"] == pages
        and 0 < latency["p50_ns"] <= latency["p99_ns"] <= latency["max_ns"]
    )
    assert found["threads"] == found["vcpu_tids"]  # blocktime is per vCPU thread
    assert found["blocktime"] >= latency["mean_ns"] * pages * 0.99


def test_shutdown_releases_waiting_vcpus_with_an_error_not_zero_pages() -> None:
    found = run_scenario("shutdown_pending")
    assert found["all_waiting"] is True
    assert found["pending"] == 4
    for result in found["results"]:
        assert result == {"aborted": True, "mismatches": 0, "touches": 0}


def test_a_fault_outside_every_block_is_reported() -> None:
    found = run_scenario("stray_fault")
    assert found["seen"] is True
    assert found["reported"] == [found["expected"]] and found["strays"] == 1
    assert found["requests"] == 0
    assert found["aborted"] is True and found["mismatches"] == 0


def test_workload_patterns_touch_what_they_promise() -> None:
    found = run_scenario("workloads")
    for name in ("sequential", "random", "hotset"):
        assert found[name] == {**found[name], "touches": 3000, "mismatches": 0}
    assert found["readwrite"]["touches"] == 1024 and found["readwrite"]["mismatches"] == 0
    assert found["dirtied_word"] != 0  # the writer left its mark beside the tag
    # 200 touches at 2000/s cannot take less than the 199 gaps between them.
    assert found["dirtier"]["touches"] == 200 and found["dirtier"]["seconds"] >= 0.099


def test_faults_served_in_c_from_in_process_sources() -> None:
    found = run_scenario("c_served")
    assert found["complete"] and found["mismatches"] == 0 and found["aborted"] == 0
    pages = found["pages"]
    # Every 4 KiB page went in once: by the C loop after a fault, or by the stream.
    assert found["placed"]["pc.ram"] == pages
    served = found["requests"]
    assert served == found["latencies"] > 0 and found["p50"] > 0
    assert found["faults"] == served + found["late"] + found["strays"]
    assert found["stray_seen"] and found["strays"] == 1
    if found["huge"]:
        assert found["placed"]["big.ram"] == 2
        assert found["threads"] == 3


def test_a_separate_process_serves_faults_through_a_handed_over_userfaultfd() -> None:
    found = run_scenario("separate_process")
    handler = found["handler"]
    assert handler["opened_via"] == "handed over"
    assert handler["faults"] == handler["requests"] == handler["placed"] == found["pages"]
    assert handler["complete"] and handler["p50"] > 0
    assert found["mismatches"] == 0 and found["aborted"] == 0 and found["touches"] == found["pages"]
    assert "another process" in handler["read_refused"]
    if handler["threads"] != [0]:  # UFFD_FEATURE_THREAD_ID: the owner's vCPU threads
        assert handler["threads"] == found["vcpu_tids"]
