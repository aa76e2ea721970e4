"""Which bytes use up the cap's window (CapWindow.count): the main channel's always; the
preempt channel's where one counter takes every channel's bytes (QEMU 8.1+, the profile's
``postcopy.preempt_in_rate_limit``); none written before the window began."""

from __future__ import annotations

import pytest

from qmig.runner.cap_window import CapWindow
from qmig.wire.profiles import load_profile


@pytest.mark.parametrize(("version", "preempt_counts"), [("7.2", False), ("10.0", True)])
def test_the_preempt_channel_counts_where_the_profile_says(
    version: str, preempt_counts: bool
) -> None:
    every_channel = load_profile(version).preempt_in_rate_limit
    assert every_channel is preempt_counts
    window = CapWindow(1_000_000, 0.1, every_channel=every_channel)
    window.count(4096)
    window.count(4104, preempt=True)
    assert window.used == 4096 + (4104 if preempt_counts else 0)
    assert window.credit() == 100_000 - window.used


def test_bytes_written_before_the_window_began_count_in_none() -> None:
    # Another thread's pages, learnt after the window rolled over: the spent window had them.
    window = CapWindow(1_000_000, 0.1, every_channel=True)
    window.roll(5.0)
    window.count(4096, written=4.99)
    window.count(4096, preempt=True, written=4.99)
    assert window.used == 0
    window.count(4096, written=5.0)
    window.count(4104, preempt=True, written=5.02)
    assert window.used == 4096 + 4104
    assert not window.spent(5.05)
    window.count(100_000 - window.used)
    assert window.spent(5.05) and not window.spent(5.2)  # the next window's quota is whole
