"""The report's data: one JSON document, the same whichever command made it.

``series``: bytes per bucket on each channel and direction, as MiB/s, on seconds from the
start; ``events``: the migration's steps (passes, stop, discards, LISTEN, RUN, pauses,
recoveries); ``pauses``: each postcopy pause with its cause, bytes and pages by then, and when
it resumed; ``requests``: each page request with its time and latency; ``latency``: the
fault-latency distribution in QEMU 10.1's ``postcopy-latency-dist`` buckets and its p50/p99/max;
``syncs``: multifd sync points (the main stream's records at which every channel syncs);
``tables``: per RAM block, per vCPU and per multifd channel; ``summary_text``: the summary
the command prints.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from qmig.latency import LATENCY_DIST_BUCKETS, latency_dist

MiB = 1 << 20
FORMAT = "qmig-report"
FORMAT_VERSION = 1


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {"title": self.title, "columns": self.columns, "rows": self.rows}


@dataclass
class ReportDocument:
    command: str
    title: str
    bucket_s: float = 0.01
    series: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    latency: dict[str, Any] = field(default_factory=dict)
    tables: list[Table] = field(default_factory=list)
    pauses: list[dict[str, Any]] = field(default_factory=list)
    syncs: list[dict[str, Any]] = field(default_factory=list)
    summary_text: str = ""
    summary: dict[str, Any] = field(default_factory=dict)

    def add_series(self, name: str, buckets: dict[int, int]) -> None:
        """``buckets``: bucket index → bytes; drawn densely, zeros included, so that a
        stalled channel shows as a drop to zero rather than a line across the gap."""
        if not buckets:
            return
        first, last = min(buckets), max(buckets)
        scale = 1 / (MiB * self.bucket_s)
        self.series.append(
            {
                "name": name,
                "t": [round(index * self.bucket_s, 4) for index in range(first, last + 1)],
                "mib_s": [
                    round(buckets.get(index, 0) * scale, 3) for index in range(first, last + 1)
                ],
                "bytes": sum(buckets.values()),
            }
        )

    def add_event(
        self, name: str, t: float | None, kind: str = "switchover", detail: str | None = None
    ) -> None:
        """``t``: seconds from the start; ``kind``: pass, switchover, pause, recovery, end;
        ``detail``: shown when the pointer is on the mark's label."""
        if t is not None:
            event: dict[str, Any] = {"t": round(t, 6), "name": name, "kind": kind}
            if detail is not None:
                event["detail"] = detail
            self.events.append(event)

    def add_sync(self, t: float, detail: str) -> None:
        """A multifd sync point at ``t`` s from the start: a small mark, not a line (a
        per-section sync comes at every section's end)."""
        self.syncs.append({"t": round(t, 6), "detail": detail})

    def add_request(
        self,
        t: float,
        latency_us: float | None,
        block: str | None,
        offset: int,
        *,
        in_flight: bool = False,
    ) -> None:
        self.requests.append(
            {
                "t": round(t, 6),
                "latency_us": latency_us,
                "block": block,
                "offset": offset,
                "in_flight": in_flight,
            }
        )

    def add_pause(self, pause: dict[str, Any]) -> None:
        """One pause as a summary's ``pauses`` lists it (:mod:`qmig.runner.pauses`, times in
        s from the start): a mark where it paused, one where it resumed, the span between."""
        number = len(self.pauses) + 1
        self.pauses.append(
            {
                "t": pause["at_s"],
                "resumed_t": pause["resumed_at_s"],
                "cause": pause["cause"],
                "bytes": pause["bytes"],
                "pages": pause["pages"],
                "paused_ms": pause["paused_ms"],
                "channels": pause["channels"],
            }
        )
        paused = "not resumed" if pause["paused_ms"] is None else f"paused {pause['paused_ms']} ms"
        self.add_event(
            f"pause {number}",
            pause["at_s"],
            "pause",
            f"{pause['cause']}: {pause['bytes']:,} stream bytes, {pause['pages']:,} postcopy "
            f"pages by then; {paused}",
        )
        self.add_event(
            f"resumed {number}",
            pause["resumed_at_s"],
            "recovery",
            f"{paused}, {pause['channels']} new channel(s)",
        )

    def pause_table(self, pages: str) -> None:
        """The pauses as a table (``pages``: what the pages column counts)."""
        table = Table(
            "Pauses and recoveries",
            ["pause", "at (s)", "cause", "stream bytes", pages, "new channels", "resumed at (s)",
             "paused (ms)"],
        )  # fmt: skip
        for number, pause in enumerate(self.pauses, 1):
            table.rows.append(
                [number, pause["t"], pause["cause"], pause["bytes"], pause["pages"],
                 pause["channels"], pause["resumed_t"], pause["paused_ms"]]
            )  # fmt: skip
        self.tables.append(table)

    def set_latency(self, what: str, samples_ns: Sequence[int], figures: dict[str, Any]) -> None:
        """``figures``: the command's own p50/p99/max in µs, as its summary prints them."""
        self.latency = {
            "what": what,
            "count": len(samples_ns),
            "dist": latency_dist(samples_ns),
            **{f"{key}_us": figures.get(key) for key in ("p50", "p99", "max")},
        }

    def set_latency_dist(self, what: str, dist: list[int], figures: dict[str, Any]) -> None:
        """As :meth:`set_latency`, from buckets already counted (by another process)."""
        dist = list(dist) + [0] * (LATENCY_DIST_BUCKETS - len(dist))
        self.latency = {
            "what": what,
            "count": sum(dist),
            "dist": dist,
            **{f"{key}_us": figures.get(key) for key in ("p50", "p99", "max")},
        }

    def as_json(self) -> dict[str, Any]:
        self.events.sort(key=lambda event: event["t"])
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "command": self.command,
            "title": self.title,
            "bucket_s": self.bucket_s,
            "series": self.series,
            "events": self.events,
            "requests": self.requests,
            "latency": self.latency or {"what": "", "count": 0, "dist": [0] * LATENCY_DIST_BUCKETS},
            "tables": [table.as_json() for table in self.tables],
            "pauses": self.pauses,
            "syncs": self.syncs,
            "summary_text": self.summary_text,
            "summary": self.summary,
        }


def printed(draw: Callable[[Any], None]) -> str:
    """What ``draw(console)`` prints, as plain text (the summary as the command shows it)."""
    from rich.console import Console

    console = Console(file=io.StringIO(), record=True, width=120, highlight=False)
    draw(console)
    return console.export_text()


def per_block(
    requests: Iterable[dict[str, Any]],
) -> tuple[dict[str | None, int], dict[str | None, float]]:
    """Requests per block, and the sum of their latencies per block in ms."""
    counts: dict[str | None, int] = {}
    waits: dict[str | None, float] = {}
    for request in requests:
        block = request["block"]
        counts[block] = counts.get(block, 0) + 1
        waits[block] = waits.get(block, 0.0) + (request["latency_us"] or 0.0) / 1000
    return counts, waits
