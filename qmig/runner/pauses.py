"""Each postcopy pause of a run and its recovery, as the runner that lived through it saw it.

A runner appends one :class:`Pause` when its channel breaks (or is cut on purpose) and
closes it when the migration resumes (RESUME_ACK on a source, POSTCOPY_RESUME on a
destination). The summaries' ``pauses`` list and the report's marks come from these.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Pause:
    at: float  # monotonic: the channel broke
    cause: str  # what broke it, as the transport said
    bytes: int  # stream bytes by then (sent by a source, received by a destination)
    pages: int  # postcopy target pages by then (sent by a source, placed by a destination)
    resumed_at: float | None = None  # monotonic; None: never resumed
    channels: int = 0  # new main channels opened to resume (more than one: a double failure)
    # A destination's: target pages its received map held while paused (its RECV_BITMAP
    # reports them received), and of those, pages its C receive threads had placed ahead of
    # the protocol machine's reading (learned from that map). None: not a destination's.
    received_pages: int | None = None
    placed_ahead: int | None = None

    def as_json(self, start: float) -> dict[str, Any]:
        """``start``: the monotonic time the summary's times count from."""
        figures = {
            "at_s": round(self.at - start, 6),
            "cause": self.cause,
            "bytes": self.bytes,
            "pages": self.pages,
            "resumed_at_s": None if self.resumed_at is None else round(self.resumed_at - start, 6),
            "paused_ms": None
            if self.resumed_at is None
            else round((self.resumed_at - self.at) * 1000, 2),
            "channels": self.channels,
        }
        if self.received_pages is not None:
            figures["received_pages"] = self.received_pages
            figures["placed_ahead"] = self.placed_ahead
        return figures


def pauses_json(pauses: list[Pause], start: float) -> list[dict[str, Any]]:
    return [pause.as_json(start) for pause in pauses]


def pause_rows(pauses: list[dict[str, Any]], pages: str) -> list[tuple[str, str]]:
    """A summary table's rows for the ``pauses`` of a summary (``pages``: what its page
    count counts, "sent" or "placed")."""
    rows = []
    for number, pause in enumerate(pauses, 1):
        resumed = "not resumed" if pause["paused_ms"] is None else f"paused {pause['paused_ms']} ms"
        received = ""
        if pause.get("received_pages") is not None:
            received = (
                f", {pause['received_pages']:,} target pages in place "
                f"({pause['placed_ahead']:,} placed before their records were read)"
            )
        rows.append(
            (
                f"pause {number}",
                f"at {pause['at_s']:.3f} s, {pause['bytes']:,} bytes, {pause['pages']:,} "
                f"postcopy pages {pages}{received}, {resumed} ({pause['cause']})",
            )
        )
    return rows
