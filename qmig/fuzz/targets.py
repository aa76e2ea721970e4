"""What ``qmig fuzz`` fuzzes: functions from bytes to a verdict.

A target runs one input and returns its :class:`Verdict`: ``accepted`` or ``rejected``
naming WHAT and the byte offset, exactly as a qmig error would. Anything else it raises is
a finding: an exception that is not a documented :class:`~qmig.errors.QmigError`, or an
``AssertionError`` from one of the oracles below.

Every input runs twice, fed whole and fed in small chunks (the chunk size is derived from
the input, so a reproducer replays identically): a reader must give the same verdict however
the bytes arrive, as they arrive from a socket in pieces of any size.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from qmig.errors import QmigError
from qmig.protocol import events as ev
from qmig.protocol.destination import Destination
from qmig.wire import messages as m
from qmig.wire.reader import END, NEED_DATA, ReturnPathReader, StreamReader

MAX_EVENTS_PER_BYTE = 4  # a record takes at least one byte; more events means no progress


@dataclass(frozen=True)
class Verdict:
    """How one input ended: accepted, or rejected with qmig's WHAT, detail and offset."""

    accepted: bool
    what: str | None = None
    detail: str | None = None
    offset: int | None = None
    error_type: str | None = None

    @classmethod
    def of(cls, error: QmigError) -> Verdict:
        return cls(False, error.what, error.detail, error.offset, type(error).__name__)

    def line(self) -> str:
        if self.accepted:
            return "accepted"
        where = "" if self.offset is None else f" at byte {self.offset}"
        return f"rejected {self.what}: {self.detail}{where}"


class OracleError(AssertionError):
    """An oracle saw qmig do something wrong without raising (a bug, not a rejection)."""


def chunk_size(data: bytes) -> int:
    """The chunk size of the incremental run, fixed by the input's bytes: 1..97 bytes, or
    about a sixteenth of a large input (each feed copies the unread tail: tiny chunks of a
    large input would cost quadratic time and teach nothing more)."""
    return 1 + zlib.crc32(data) % 97 + len(data) // 16


def _chunks(data: bytes, size: int | None) -> list[bytes]:
    if size is None or not data:
        return [data]
    return [data[at : at + size] for at in range(0, len(data), size)]


def _drain_reader(reader: StreamReader | ReturnPathReader, budget: int) -> int:
    count = 0
    for _record in reader:
        count += 1
        if count > budget:
            raise OracleError(f"the reader is not making progress ({count} records)")
    return count


def read_stream(data: bytes, version: str | None, chunk: int | None = None) -> Verdict:
    """The stream reader alone: framing, lengths, names, offsets."""
    return _read_all(StreamReader(version), data, chunk)


def read_return_path(data: bytes, version: str | None, chunk: int | None = None) -> Verdict:
    """The return-path reader alone (what a source parses)."""
    return _read_all(ReturnPathReader(version), data, chunk)


def _read_all(reader: StreamReader | ReturnPathReader, data: bytes, chunk: int | None) -> Verdict:
    budget = MAX_EVENTS_PER_BYTE * len(data) + 8
    try:
        for piece in _chunks(data, chunk):
            reader.feed(piece)
            _drain_reader(reader, budget)
        reader.feed_eof()
        _drain_reader(reader, budget)
    except QmigError as error:
        return Verdict.of(error)
    return Verdict(True)


def run_destination(data: bytes, version: str | None, chunk: int | None = None) -> Verdict:
    """The destination machine: the reader plus QEMU's rules. Every decision it hands the
    runner is checked against the blocks it announced: nothing may land outside a block."""
    dest = Destination(version)
    budget = MAX_EVENTS_PER_BYTE * len(data) + 8
    events = 0
    try:
        for piece in _chunks(data, chunk):
            dest.receive_data(piece)
            events += _drain_destination(dest, budget - events)
        dest.receive_eof()
        _drain_destination(dest, budget - events)
    except QmigError as error:
        return Verdict.of(error)
    return Verdict(True)


def _drain_destination(dest: Destination, budget: int) -> int:
    count = 0
    while True:
        event = dest.next_event()
        if event is NEED_DATA or event is END:
            return count
        count += 1
        if count > budget:
            raise OracleError(f"the destination is not making progress ({count} events)")
        _check_bounds(dest, event)


def _check_bounds(dest: Destination, event: Any) -> None:
    """The runner writes what these events say into mapped blocks: they must fit."""
    if isinstance(event, ev.RangesDiscarded):
        tracker = dest.blocks.get(event.block)
        for span in event.ranges:
            if tracker is None or span.start + span.length > tracker.info.used_length:
                raise OracleError(f"discard outside block {event.block!r}: {span}")
    elif isinstance(event, ev.PagesReceived):
        run: m.RamPageRun = event.run
        tracker = dest.blocks.get(run.block)
        if tracker is None:
            raise OracleError(f"pages for unannounced block {run.block!r}")
        mask = run.target_page_size - 1
        limit = tracker.info.used_length
        for header in run.headers:
            if (header & ~mask) + run.target_page_size > _round_up(limit, run.target_page_size):
                raise OracleError(f"page {header & ~mask:#x} outside block {run.block!r}")


def _round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


Runner = Callable[[bytes, str | None, int | None], Verdict]


@dataclass(frozen=True)
class Target:
    name: str
    run: Runner
    channel: str  # "stream" or "return_path": which reader ``qmig inspect`` replays it with
    description: str

    def check(self, data: bytes, version: str | None) -> Verdict:
        """Run ``data`` whole and in chunks; different verdicts are a finding."""
        whole = self.run(data, version, None)
        pieces = self.run(data, version, chunk_size(data))
        if _comparable(whole) != _comparable(pieces):
            raise OracleError(
                f"verdict depends on chunking (chunks of {chunk_size(data)}): "
                f"whole: {whole.line()}; in chunks: {pieces.line()}"
            )
        return whole


def starting_inputs(target: Target, version: str | None, seed: int = 0) -> list[bytes]:
    """What every engine starts ``target`` from: the real captures in ``fixtures/`` made
    small, then inputs drawn from qmig.strategies (reproducibly from ``seed``)."""
    import random

    from qmig.fuzz import seeds

    inputs: list[bytes] = []
    for _name, stream, return_path in seeds.capture_seeds(version):
        if target.channel == "stream":
            inputs.append(stream)
        elif return_path is not None:
            inputs.append(return_path)
    return inputs + seeds.strategy_seeds(target.channel, version, random.Random(seed))


def _comparable(verdict: Verdict) -> tuple[Any, ...]:
    # The detail may say how much was buffered; what failed and where must not differ.
    return (verdict.accepted, verdict.what, verdict.offset)


TARGETS: dict[str, Target] = {
    "stream": Target("stream", read_stream, "stream", "the stream reader (StreamReader)"),
    "return-path": Target("return-path", read_return_path, "return_path", "the return-path reader"),
    "destination": Target(
        "destination", run_destination, "stream", "the destination machine fed stream bytes"
    ),
}
