"""Fault injection with postcopy recovery on: the proxy cuts the channel at random points of
postcopy and of the recovery handshake. Every run either recovers with RAM verified or,
where QEMU would fail (a cut before RUN), fails with one clear line; nothing hangs."""

from __future__ import annotations

import random

import pytest

from qmig.fuzz.faults import Fault, run_faulted

pytestmark = [pytest.mark.uffd, pytest.mark.timeout(300)]
BOUND_S = 40.0


def recovered(fault: Fault) -> None:
    result = run_faulted(fault, recover=True, bandwidth=16 << 20)
    assert result.seconds < BOUND_S, result
    assert (result.source_error, result.destination_error) == (None, None), result
    assert result.mismatches == 0, result  # no page lost
    assert result.recoveries >= 1 and result.proxy.connections >= 2, result
    assert result.destination_report is not None
    assert result.destination_report["recoveries"] == result.recoveries


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_cut_at_a_random_point_of_postcopy_recovers(seed: int) -> None:
    rng = random.Random(seed)
    recovered(Fault("cut", "RAM", nth=rng.randint(1, 40), postcopy=True, into=rng.random()))


@pytest.mark.parametrize("record", ["RECV_BITMAP", "POSTCOPY_RESUME"])
def test_a_cut_during_the_recovery_handshake_recovers_again(record: str) -> None:
    """QEMU's double failure: cut mid-postcopy, then cut the resumed connection inside its
    handshake; a third connection completes the recovery."""
    fault = Fault("cut", "RAM", nth=5, postcopy=True, then=record)
    result = run_faulted(fault, recover=True, bandwidth=16 << 20)
    assert result.proxy.cuts == 2, result
    assert result.proxy.connections == 3, result
    assert (result.source_error, result.destination_error) == (None, None), result
    assert result.mismatches == 0, result
    assert result.recoveries == 1, result


def test_a_cut_before_run_fails_in_one_line_even_with_recovery_on() -> None:
    result = run_faulted(Fault("cut", "POSTCOPY_RAM_DISCARD"), recover=True, recover_timeout=3)
    assert result.seconds < BOUND_S, result
    assert result.mismatches is None
    error = result.destination_error
    assert error is not None and error.startswith("qmig: error: ") and "\n" not in error
    assert "during precopy" in error, error
    assert result.source_error is not None
