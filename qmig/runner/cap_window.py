"""The bandwidth cap's current window, as QEMU's rate limit keeps it: a quota of bytes per
window, counted from the window's start (see ``SourceRunner._wait_for_credit``)."""

from __future__ import annotations


class CapWindow:
    """A cap of ``rate`` bytes per second (None: no cap), in windows of ``length`` seconds:
    when the current one began (``at``, monotonic) and the bytes sent in it (``used``)."""

    def __init__(self, rate: float | None, length: float) -> None:
        self.rate = rate
        self.length = length
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
