"""A recording of several connections of one migration (postcopy recovery), read in order.

A capture folder holds one migration. When its channel broke and the migration resumed on a
new connection, the relay appended the new connection's bytes to the same files and noted
in ``meta.json`` where each connection starts (``connections``: stream and return-path
offsets, and the time). A reader of the stream must start over at each such offset as the
destination did: drop an unfinished record of the old connection, read the new one from
the top level (:meth:`qmig.wire.reader.StreamReader.new_channel`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from qmig.capture.recording import META_NAME


@dataclass(frozen=True)
class NewConnection:
    """In a stream of recorded bytes: here the next connection's bytes begin."""

    offset: int  # in the direction's file


def stream_boundaries(directory: Path) -> list[int]:
    """Where each connection after the first starts in ``stream.bin`` (none: one)."""
    return _boundaries(directory, "stream_offset")


def return_path_boundaries(directory: Path) -> list[int]:
    return _boundaries(directory, "return_path_offset")


def preempt_boundaries(directory: Path) -> list[int]:
    """Where each preempt channel after the first starts in ``preempt.bin`` (postcopy-
    preempt opens it again after a recovery)."""
    return _boundaries(directory, "preempt_offset")


def _boundaries(directory: Path, key: str) -> list[int]:
    try:
        meta = json.loads((directory / META_NAME).read_text())
    except (OSError, ValueError):
        return []
    connections = meta.get("connections") if isinstance(meta, dict) else None
    if not isinstance(connections, list):
        return []
    offsets = [c.get(key) for c in connections[1:] if isinstance(c, dict)]
    return sorted(offset for offset in offsets if isinstance(offset, int) and offset >= 0)


def split_at(
    chunks: Iterable[bytes], boundaries: list[int], start: int = 0
) -> Iterator[bytes | NewConnection]:
    """``chunks`` (consecutive bytes from ``start``) with a :class:`NewConnection` marker
    put at each boundary, the chunk that holds one split around it."""
    pending = [b for b in boundaries if b >= start]
    at = start
    for chunk in chunks:
        view = memoryview(chunk)
        while pending and pending[0] <= at + len(view):
            cut = pending.pop(0) - at
            if cut:
                yield bytes(view[:cut])
            yield NewConnection(at + cut)
            view = view[cut:]
            at += cut
        if view:
            yield bytes(view)
            at += len(view)
