"""The bandwidth cap's current window, as QEMU's rate limit keeps it: a quota of bytes per
window, counted from the window's start (see ``SourceRunner._wait_for_credit``), and which
bytes use it up (:meth:`CapWindow.count`)."""

from __future__ import annotations


class CapWindow:
    """A cap of ``rate`` bytes per second (None: no cap), in windows of ``length`` seconds:
    when the current one began (``at``, monotonic) and the bytes sent in it (``used``).
    ``every_channel``: the preempt channel's bytes use up the quota too (the profile's
    ``postcopy.preempt_in_rate_limit``): from QEMU 8.1 one counter of every channel's bytes
    makes the rate; before, the preempt channel's QEMUFile has none."""

    def __init__(self, rate: float | None, length: float, *, every_channel: bool = False) -> None:
        self.rate = rate
        self.length = length
        self.every_channel = every_channel
        self.at = 0.0
        self.used = 0

    @property
    def quota(self) -> int:
        """The bytes a window lets out (a cap is set)."""
        assert self.rate is not None
        return int(self.rate * self.length)

    @property
    def end(self) -> float:
        return self.at + self.length

    def count(self, size: int, *, preempt: bool = False, written: float | None = None) -> None:
        """``size`` bytes written on the main channel, or on the preempt one (``preempt``),
        at ``written`` (monotonic s; None: now): the window counts them, unless they are the
        preempt channel's and it takes only the main one's, or were written before the window
        began (another thread's, learnt late)."""
        if preempt and not self.every_channel:
            return
        if written is not None and written < self.at:
            return
        self.used += size

    def credit(self) -> int | None:
        """What the window has left (negative once overspent); None without a cap."""
        return None if self.rate is None else self.quota - self.used

    def roll(self, now: float) -> bool:
        """A new window, if the current one is over at ``now``; True if it began."""
        if now - self.at < self.length:
            return False
        self.at, self.used = now, 0
        return True

    def spent(self, now: float) -> bool:
        """Is the quota of the window current at ``now`` spent (a cap is set)?"""
        return now - self.at < self.length and self.used >= max(self.quota, 1)
