"""Fault injection in ``qmig simulate``-style migrations (qmig source → proxy → destination).

Cutting the connection anywhere (precopy, during the discards, inside PACKAGED, inside a
postcopy page) and a source that never answers a page request must each end both sides
with one clear error naming the phase and a byte offset, within bounded time, with no
thread left blocked on a missing page (the destination process exits). Delaying the return
path and re-chunking the stream is legal: that migration must complete and verify.
"""

from __future__ import annotations

import re
import socket
import time

import pytest

from qmig.fuzz.faults import Fault, FaultProxy, FaultResult, run_faulted

pytestmark = [pytest.mark.uffd, pytest.mark.timeout(180)]

LINE = re.compile(r"^qmig: error: (?P<what>.+?): (?P<detail>.*) at byte (?P<offset>\d+)$")
BOUND_S = 30.0


def check_failed_cleanly(result: FaultResult, phase: str, what: str | None = None) -> int:
    """Both sides failed with one error line; return the destination's offset."""
    assert result.mismatches is None, "a faulted migration must not claim success"
    assert result.seconds < BOUND_S, result
    error = result.destination_error
    assert error is not None, result
    match = LINE.match(error)
    assert match, error
    assert f"during {phase}" in match["detail"], error
    if what is not None:
        assert match["what"] == what, error
    assert result.source_error is not None, result
    assert " at byte " in result.source_error
    return int(match["offset"])


def test_no_fault_completes_and_verifies() -> None:
    result = run_faulted(Fault("none"))
    assert (result.source_error, result.destination_error) == (None, None), result
    assert result.mismatches == 0


def test_a_cut_during_precopy() -> None:
    result = run_faulted(Fault("cut", "RAM", nth=3))
    offset = check_failed_cleanly(result, "precopy", "RAM")
    assert result.proxy.cut_at is not None and offset <= result.proxy.cut_at


def test_a_cut_inside_a_discard() -> None:
    result = run_faulted(Fault("cut", "POSTCOPY_RAM_DISCARD"))
    offset = check_failed_cleanly(result, "precopy", "POSTCOPY_RAM_DISCARD")
    assert offset == result.proxy.target_offset  # where the cut command starts


def test_a_cut_inside_packaged() -> None:
    result = run_faulted(Fault("cut", "PACKAGED"))
    offset = check_failed_cleanly(result, "LISTENING")
    assert result.proxy.target_offset is not None
    assert result.proxy.target_offset < offset <= (result.proxy.cut_at or 0)


def test_a_page_truncated_in_postcopy() -> None:
    result = run_faulted(Fault("cut", "RAM", nth=2, postcopy=True))
    check_failed_cleanly(result, "RUNNING", "RAM")


def test_a_source_that_never_answers_a_page_request() -> None:
    # From RUN on nothing more arrives and every REQ_PAGES is dropped: the guest's vCPUs
    # wait on missing pages; the destination gives up after its idle timeout, says where,
    # sends SHUT(1), and its process (vCPU threads included) exits.
    result = run_faulted(Fault("stall", "POSTCOPY_RUN", into=1.0), idle_timeout=2.0)
    check_failed_cleanly(result, "RUNNING")
    assert result.proxy.dropped_requests >= 1
    assert "SHUT" in (result.source_error or "")


def test_delayed_return_path_and_rechunked_stream_still_complete() -> None:
    result = run_faulted(Fault("delay", delay=0.02, seed=4))
    assert (result.source_error, result.destination_error) == (None, None), result
    assert result.mismatches == 0
    assert result.destination_report is not None


def test_closing_the_proxy_ends_its_relay_at_once() -> None:
    """A proxy waiting for the source's next connection (recovery) ends on close, rather than
    when its accept() times out: nothing of it is left running in the caller's process."""
    with socket.create_server(("127.0.0.1", 0)) as target:
        proxy = FaultProxy(target.getsockname()[:2], Fault("none"), recover=True).start()
        with socket.create_connection(("127.0.0.1", proxy.port)) as source:
            destination, _ = target.accept()
            source.sendall(b"")  # connected: the relay runs, then the source goes away
        destination.close()
        # The first connection relayed and over: the relay waits for the next one.
        deadline = time.monotonic() + 10
        while any(t.is_alive() for t in proxy._threads[1:]) and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
        proxy.close()
        assert proxy.log.connections == 1
        assert not [thread for thread in proxy._threads if thread.is_alive()]
