"""The fault knobs through the plugin's fixtures, with qmig on both ends (no QEMU): a test
project run by ``pytester``, which loads the plugin from its entry point as any project
would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from qmig.runner.misbehave import REJECTABLE
from qmig.runner.misbehave_options import CORRUPTIBLE_NAMES, REJECTABLE_NAMES
from qmig.runner.misbehave_source import CORRUPTIBLE

pytest_plugins = ["pytester"]

CAPTURE = Path(__file__).parents[2] / "fixtures" / "postcopy-tcp"

PROJECT = f"""
import pytest

CAPTURE = {str(CAPTURE)!r}


def migrate(qmig_destination, qmig_source, destination={{}}, source={{}}):
    receiver = qmig_destination(**{{"qemu_version": "7.2", "workload": "none", **destination}})
    sender = qmig_source(receiver.uri, CAPTURE, qemu_version="7.2", **source)
    return receiver.wait(60), sender.wait(60)


def test_a_good_migration(qmig_destination, qmig_source):
    received, sent = migrate(qmig_destination, qmig_source)
    assert received.returncode == 0 and sent.returncode == 0
    assert received.report["mode"] == "postcopy"
    assert sent.report is not None


def test_reject_fails_at_the_command(qmig_destination, qmig_source):
    received, sent = migrate(
        qmig_destination, qmig_source, destination={{"reject": "POSTCOPY_LISTEN"}}
    )
    assert received.returncode == 1 and received.report is None
    assert received.error.startswith(
        "qmig: error: POSTCOPY_LISTEN: wrong postcopy state DISCARD at byte "
    )
    assert sent.returncode == 1 and "the destination reported an error (1)" in sent.error


def test_shut_status(qmig_destination, qmig_source):
    received, sent = migrate(qmig_destination, qmig_source, destination={{"shut_status": 3}})
    assert received.returncode == 0  # the destination has it all, and says otherwise
    assert sent.returncode == 1 and "SHUT: the destination reported an error (3)" in sent.error


def test_stall_after_pages_then_go_on(qmig_destination, qmig_source):
    import time

    receiver = qmig_destination(
        qemu_version="7.2", workload="none", stall_after_pages=100, stall_for=2
    )
    began = time.monotonic()
    sender = qmig_source(receiver.uri, CAPTURE, qemu_version="7.2")
    assert receiver.wait(60).returncode == 0 and sender.wait(60).returncode == 0
    assert time.monotonic() - began >= 2


def test_delay_requests(qmig_destination, qmig_source):
    received, sent = migrate(
        qmig_destination, qmig_source,
        destination={{"workload": "random", "delay_requests_ms": 50}},
        source={{"bandwidth": 64}},
    )
    assert received.returncode == 0 and sent.returncode == 0
    # Each request left 50 ms after its fault (a delay without one: p50 ~35 µs here).
    figures = received.report["fault_to_request_us"]
    assert received.report["requests"] > 0 and figures["p50"] >= 50_000


def test_corrupt_a_command(qmig_destination, qmig_source):
    received, sent = migrate(
        qmig_destination, qmig_source, source={{"corrupt": "POSTCOPY_RAM_DISCARD"}}
    )
    assert received.returncode == 1
    assert "POSTCOPY_RAM_DISCARD: received with bad length" in received.error
    assert sent.returncode == 1


def test_cut_without_recovery_fails_both(qmig_destination, qmig_source):
    received, sent = migrate(qmig_destination, qmig_source, source={{"cut_after_pages": 50}})
    assert "channel cut on purpose during postcopy" in sent.error
    assert received.returncode == 1


def test_cut_with_recovery_completes(qmig_destination, qmig_source):
    receiver = qmig_destination(
        qemu_version="7.2", workload="none", recovery=True, pause_after=50
    )
    sender = qmig_source(receiver.uri, CAPTURE, qemu_version="7.2", resume_to=receiver.uri)
    assert receiver.wait_paused(60) == receiver.uri
    assert sender.wait(60).returncode == 0
    report = receiver.wait(60).report
    assert report["recoveries"] == 1
    assert len(receiver.ram("pc.ram")) == report["blocks"]["pc.ram"]


@pytest.mark.parametrize("postcopy_after", [None, 0])
def test_a_generated_guest(qmig_destination, qmig_source, postcopy_after):
    receiver = qmig_destination(qemu_version="7.2", workload="none")
    sender = qmig_source(
        receiver.uri, qemu_version="7.2", guest_mib=4, seed=7, postcopy_after=postcopy_after
    )
    assert sender.wait(60).returncode == 0
    assert receiver.wait(60).report["mode"] == ("precopy" if postcopy_after is None else "postcopy")
    assert receiver.ram("pc.ram") == sender.expected_ram


def test_stall_of_the_source(qmig_destination, qmig_source):
    received, sent = migrate(
        qmig_destination, qmig_source, source={{"stall_after": 1 << 20, "stall_for": 1.5}}
    )
    assert received.returncode == 0 and sent.returncode == 0
    assert received.report["total_s"] >= 1.5
"""


def test_the_knobs_through_the_fixtures(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_peers=PROJECT)
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider", timeout=600)
    result.assert_outcomes(passed=11)


def test_the_option_lists_name_the_knobs_commands() -> None:
    assert set(REJECTABLE_NAMES) == set(REJECTABLE)
    assert set(CORRUPTIBLE_NAMES) == set(CORRUPTIBLE)


def test_the_plugin_imports_nothing_of_qmig_until_used() -> None:
    code = (
        "import sys, qmig.pytest_plugin; "
        "print(sorted(m for m in sys.modules if m.startswith('qmig')))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert loaded.strip() == "['qmig', 'qmig.pytest_plugin']"
