"""``qmig simulate --preempt``: requested pages on the preempt channel, both variants, every
page verified at the end; and the options refused in one line where QEMU has no preempt."""

from __future__ import annotations

import subprocess
from typing import Any

import pytest
import simulating

pytestmark = pytest.mark.uffd


def simulate(*args: str) -> subprocess.CompletedProcess[str]:
    return simulating.run_simulate("--ram", "32M", *args)


def verified(*args: str) -> dict[str, Any]:
    return simulating.verified("--ram", "32M", *args)


@pytest.mark.parametrize(
    ("args", "variant"),
    [
        (("--qemu-version", "7.2"), "pre-7.2"),
        (("--qemu-version", "10.0", "--machine-type", "pc-q35-10.0"), "8.0"),
        (("--qemu-version", "10.0", "--machine-type", "pc-i440fx-7.2"), "pre-7.2"),
        (("--qemu-version", "10.0", "--preempt-variant", "8.0"), "8.0"),
    ],
)
def test_requested_pages_come_on_the_preempt_channel(args: tuple[str, ...], variant: str) -> None:
    result = verified("--preempt", "--postcopy-after", "0", "--bandwidth", "20", *args)
    assert result["preempt"]["variant"] == variant
    pages = result["preempt_pages"]
    assert pages["sent"]["preempt"] > 0
    assert pages["sent"] == pages["received"]
    assert pages["sent"]["preempt"] == result["postcopy"]["requested_pages"]
    assert result["fault_latency_us"]["p50"] > 0


def test_without_preempt_nothing_comes_on_a_second_channel() -> None:
    result = verified("--postcopy-after", "0", "--bandwidth", "20")
    assert result["preempt"] is None
    assert result["preempt_pages"]["sent"]["preempt"] == 0
    assert result["preempt_pages"]["received"]["preempt"] == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--preempt", "--qemu-version", "2.9"), "--preempt: QEMU 2.9 has no postcopy-preempt"),
        (("--preempt", "--precopy-only"), "--preempt: postcopy-preempt requires postcopy-ram"),
        (("--preempt-variant", "8.0"), "--preempt-variant: needs --preempt"),
    ],
)
def test_preempt_options_that_cannot_work_are_refused(args: tuple[str, ...], message: str) -> None:
    done = simulate(*args)
    assert done.returncode != 0
    assert message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "args",
    [
        ("--qemu-version", "7.2"),
        ("--machine-type", "pc-q35-10.0", "--pauses", "2"),
        # The source's next main channel comes while the destination waits for the preempt
        # one, often before it has seen the cut: it must still be taken as the main channel.
        ("--machine-type", "pc-q35-10.0", "--pause-during-recovery"),
        # The pre-7.2 variant's channel follows each new main channel at once, and may come
        # after that one was cut in the handshake: it is still the preempt channel (taken as
        # the next main one, the real preempt channel went unread and no EOS ever came).
        ("--qemu-version", "7.2", "--pause-during-recovery"),
    ],
    ids=["pre-7.2", "8.0-twice", "8.0-double-failure", "pre-7.2-double-failure"],
)
def test_a_preempt_migration_pauses_and_recovers(args: tuple[str, ...]) -> None:
    """Both channels go with the cut; the preempt one is opened again after the bitmaps,
    before POSTCOPY_RESUME, and carries requested pages again."""
    result = verified(
        "--preempt", "--postcopy-after", "0", "--bandwidth", "20", "--pause-after", "2000", *args
    )
    pauses = 2 if "--pauses" in args else 1
    assert result["recoveries"] == result["destination_recoveries"] == pauses
    pages = result["preempt_pages"]
    # Pages on their way when a channel went are lost with it, and sent again after the
    # resume: the destination received at most what was sent on the preempt channel.
    assert 0 < pages["received"]["preempt"] <= pages["sent"]["preempt"]
