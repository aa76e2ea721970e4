"""A capture's postcopy-preempt channel, for ``qmig inspect``: its records, and which page
requests it answered.

The channel is read with the main stream's reader's blocks (its records name them), on the
relay's clock like the other two directions. A request is answered on the preempt channel
when every target page of its range came there after the request reached the relay, earlier
than the main stream answered it (or when the main stream did not, or only had it in
flight).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from pathlib import Path

from qmig.inspect import PageRequest, Timeline, read_records
from qmig.wire import messages as m
from qmig.wire.reader import Record, StreamReader
from qmig.wire.reading.preempt import PreemptReader
from qmig.wire.schema import RAM_RECORD_HEADER

CHANNEL = "preempt"


def preempt_records(path: Path, main: StreamReader) -> list[Record]:
    """Every record of the recorded preempt channel (``main``: the main stream's reader,
    read to its end, whose blocks the channel's records name)."""
    from qmig.capture.connections import preempt_boundaries
    from qmig.capture.recording import open_capture_file

    with open_capture_file(path) as file:
        boundaries = preempt_boundaries(path.parent)
        return list(read_records(file, PreemptReader(main), boundaries=boundaries))


def _pages(records: list[Record], timeline: Timeline) -> Iterator[tuple[str, int, int, int]]:
    """(block, page offset, record start, arrival) of every page on the channel."""
    for record in records:
        run = record.message
        if not isinstance(run, m.RamPageRun):
            continue
        mask = run.target_page_size - 1
        for index, (header, body) in enumerate(zip(run.headers, run.bodies, strict=True)):
            size = run.target_page_size if header & run.page_flag else 1
            start = body - RAM_RECORD_HEADER.sizeof()
            if index == 0 and record.offset < start:
                start = record.offset  # the first record names its block
            yield run.block, header & ~mask, start, timeline.arrival(body, size)


def match_preempt(
    requests: list[PageRequest], records: list[Record], timeline: Timeline, page_size: int
) -> None:
    """Mark the requests the preempt channel answered (first, of both channels)."""
    arrivals: dict[tuple[str, int], list[tuple[int, int]]] = {}
    for block, page, start, arrived in _pages(records, timeline):
        arrivals.setdefault((block, page), []).append((arrived, start))
    for found in arrivals.values():
        found.sort()
    for request in requests:
        if request.block is None:
            continue
        first = request.start - request.start % page_size
        answer: tuple[int, int] | None = None
        for page in range(first, request.start + max(request.length, 1), page_size):
            found = arrivals.get((request.block, page), [])
            at = bisect.bisect_left(found, (request.t_ns, -1))
            if at == len(found):
                answer = None
                break
            answer = max(answer or found[at], found[at])
        if answer is None:
            continue
        main_first = request.answered_t_ns is not None and not request.in_flight
        if main_first and request.answered_t_ns is not None and request.answered_t_ns <= answer[0]:
            continue
        request.answered_t_ns, request.answered_at_byte = answer
        request.in_flight = False
        request.answered_on = CHANNEL
