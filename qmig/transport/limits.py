"""Time limits on a migration connection, which a hostile or broken peer cannot stretch.

A per-read timeout alone bounds nothing: a peer that sends one byte every few seconds, or
that floods the stream while never reading the return path, keeps every single wait short.
:class:`Limits` names four bounds, each checked on every read and every blocked write:

* ``idle``: one read waited this long with no byte from the peer (the per-read timeout), or
  the peer has not taken, for this long, the bytes it had been sent (a return path it never
  reads; seen through the kernel's send queue, ``TIOCOUTQ``, so it fires even while the
  peer's kernel still takes a few bytes now and then);
* ``deadline``: the whole phase (from :meth:`Meter.start`) takes at most this long;
* ``min_rate`` over ``rate_window``: fewer than ``min_rate * rate_window`` bytes arrived
  while qmig spent ``rate_window`` seconds waiting for them. Only time spent waiting counts:
  while qmig is busy with what it has, the peer cannot send it more, and is not to blame.

When one fires, :class:`LimitExceeded` (a TransportError) names it, its setting and the
stream offset: ``idle timeout 5 s: no byte from the source for 5 s at stream offset 120``.
"""

from __future__ import annotations

import collections
import fcntl
import socket
import struct
import termios
import time
from dataclasses import dataclass

from qmig.errors import TransportError

WAIT_SLICE = 0.5  # the longest single wait, so that every limit is looked at this often


@dataclass(frozen=True)
class Limits:
    """The bounds on one connection; None switches one off."""

    idle: float | None = 60.0
    deadline: float | None = None
    min_rate: float | None = None  # bytes per second
    rate_window: float = 10.0
    peer: str = "the peer"  # how messages name the other side: "the source"


class LimitExceeded(TransportError):
    """A configured limit fired; ``limit`` says which (idle, deadline, min_rate)."""

    def __init__(self, what: str, limit: str, detail: str) -> None:
        self.limit = limit
        super().__init__(what, detail)


def _seconds(value: float) -> str:
    return f"{value:g} s"


class Meter:
    """Bytes in and out of one socket, and the clocks the limits are measured by."""

    def __init__(self, name: str, limits: Limits, sock: socket.socket | None) -> None:
        self.name = name
        self.limits = limits
        self._socket = sock
        self.received = 0
        self.sent = 0
        self.elsewhere = 0  # bytes the same peer sent on the migration's other channels
        self.start()

    def start(self) -> None:
        """Start a phase: the deadline and the rate window count from now."""
        now = time.monotonic()
        self.started = now
        self.waited = 0.0  # seconds spent waiting for the peer's bytes in this phase
        self.wait_started: float | None = None
        # The send side's idle clock: since last_acked, the peer has not yet taken every byte
        # that had been sent to it by then (_owed).
        self._owed = self.sent
        self.last_acked = now
        self.behind = False  # the peer has not caught up with what it was sent
        # (seconds waited, bytes received) in this phase, about one a second of waiting.
        self._samples: collections.deque[tuple[float, int]] = collections.deque([(0.0, 0)])
        self._phase_base = self.received + self.elsewhere

    # --- accounting -------------------------------------------------------------------

    def begin_wait(self) -> None:
        self.wait_started = time.monotonic()

    def end_wait(self) -> None:
        if self.wait_started is not None:
            self.waited += time.monotonic() - self.wait_started
            self.wait_started = None

    def _waited_now(self, now: float) -> float:
        return self.waited + (0.0 if self.wait_started is None else now - self.wait_started)

    def got(self, count: int) -> None:
        self.received += count
        self._sample()

    def got_elsewhere(self, count: int) -> None:
        """``count`` bytes came from the same peer on another channel of this migration
        (multifd's): it is not idle, so a read waiting here starts its idle time again, and
        they count for its rate (not for this channel's offset). Called from other threads:
        the worst a race does is count a wait's start a moment off."""
        self.elsewhere += count
        started = self.wait_started
        if started is not None:
            now = time.monotonic()
            self.waited += now - started
            self.wait_started = now
        self._sample()

    def _sample(self) -> None:
        waited = self.waited
        if waited - self._samples[-1][0] >= 1.0:
            self._samples.append((waited, self.received + self.elsewhere - self._phase_base))

    def put(self, count: int) -> None:
        self.sent += count

    def _acknowledged(self) -> int:
        """Bytes the peer's side has taken: sent minus what still waits in our send queue."""
        if self._socket is None:
            return self.sent
        try:
            raw = fcntl.ioctl(self._socket.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
        except OSError:
            return self.sent
        return self.sent - struct.unpack("i", raw)[0]

    # --- checking ---------------------------------------------------------------------

    def wait_slice(self) -> float:
        """How long a single wait may last before the limits must be looked at again."""
        limits, now = self.limits, time.monotonic()
        left = [WAIT_SLICE]
        if limits.idle is not None and self.wait_started is not None:
            left.append(self.wait_started + limits.idle - now)
        if limits.deadline is not None:
            left.append(self.started + limits.deadline - now)
        return max(0.0, min(left))

    def check(self, *, reading: bool) -> None:
        """Raise LimitExceeded if a limit has fired. ``reading``: waiting for the peer's
        bytes (else: waiting for it to take ours, where only the send side's idle counts)."""
        limits, now = self.limits, time.monotonic()
        peer, at = limits.peer, f"at stream offset {self.received}"
        if limits.deadline is not None and now - self.started >= limits.deadline:
            raise LimitExceeded(
                self.name,
                "deadline",
                f"deadline {_seconds(limits.deadline)}: the phase did not end in "
                f"{_seconds(limits.deadline)} {at}",
            )
        if limits.idle is None:
            pass
        elif reading and self.wait_started is not None and now - self.wait_started >= limits.idle:
            raise LimitExceeded(
                self.name,
                "idle",
                f"idle timeout {_seconds(limits.idle)}: no byte from {peer} for "
                f"{_seconds(limits.idle)} {at}",
            )
        else:
            self._check_send_side(now, limits.idle, at)
        if reading and limits.min_rate:
            self._check_rate(now, limits.min_rate, limits.rate_window, at)

    def _check_send_side(self, now: float, idle: float, at: str) -> None:
        """A peer that reads takes what it was sent within moments; one that does not may
        still see its kernel take a little now and then (a full receive queue is compacted
        to make room), so the test is whether it has caught up with what it owed."""
        acked = self._acknowledged()
        self.behind = acked < self._owed
        if not self.behind:
            self._owed, self.last_acked = self.sent, now
        elif now - self.last_acked >= idle:
            raise LimitExceeded(
                self.name,
                "idle",
                f"idle timeout {_seconds(idle)}: {self.limits.peer} took none of the "
                f"{self.sent - acked} bytes waiting for it for {_seconds(idle)} (is it reading "
                f"the return path?) {at}",
            )

    def _check_rate(self, now: float, rate: float, window: float, at: str) -> None:
        waited = self._waited_now(now)
        samples = self._samples
        while len(samples) > 1 and waited - samples[1][0] >= window:
            samples.popleft()
        since, base = samples[0]
        if waited - since < window:
            return
        got = self.received + self.elsewhere - self._phase_base - base
        if got < rate * (waited - since):
            raise LimitExceeded(
                self.name,
                "min_rate",
                f"minimum rate {rate:g} B/s: {got} bytes from {self.limits.peer} in "
                f"{_seconds(round(waited - since, 1))} of waiting for them {at}",
            )
