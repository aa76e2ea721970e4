"""The fast path for POSTCOPY_RAM_DISCARD, beside the schema it mirrors.

At switchover the source sends one discard command per 12 dirty runs: a thousand or more
for a guest that dirties pages at random, and all of it is downtime. construct costs about a
third of a millisecond per command. :meth:`DiscardReader.read` takes a whole well-formed
command with one ``struct.unpack_from`` and keeps its ranges as the bytes they came in
(:class:`DiscardRanges`), which the destination hands to C as they are
(:func:`apply_to_state`, and ``RamBlock.discard_ranges``).

It decodes exactly what ``Schema.command_payloads["POSTCOPY_RAM_DISCARD"]`` decodes, and
declines anything else (another command, a bad length, a wrong version, an empty name, a
missing terminator, ranges that are not whole, a command not complete yet): the schema then
decodes it and reports what is wrong. ``tests/wire/test_discard.py`` proves the two agree.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from typing import Any, overload

from qmig.wire import messages as m
from qmig.wire._ramscan import ffi, lib
from qmig.wire.fields import NAME_ENCODING
from qmig.wire.schema import DISCARD_TERMINATOR, Schema

_HEAD = struct.Struct(">BHHBB")  # section type, cmd, len; then the payload's version, name length
_RANGE = struct.Struct(">QQ")  # start, length


_TERMINATOR = DISCARD_TERMINATOR.sizeof()


class DiscardRanges(Sequence[m.DiscardRange]):
    """A discard command's ranges as on the wire: ``packed`` holds (start, length) pairs as
    big-endian u64s. Ranges are decoded only when looked at; equal (and hashing equal) to the
    tuple of the same :class:`~qmig.wire.messages.DiscardRange` values that the schema parses."""

    __slots__ = ("packed",)

    def __init__(self, packed: bytes) -> None:
        if len(packed) % _RANGE.size:
            raise ValueError(f"{len(packed)} bytes are not whole (start, length) pairs")
        self.packed = packed

    @classmethod
    def of(cls, ranges: Sequence[m.DiscardRange]) -> DiscardRanges:
        """``ranges`` in this form (as is when they already are)."""
        if isinstance(ranges, DiscardRanges):
            return ranges
        return cls(b"".join(_RANGE.pack(span.start, span.length) for span in ranges))

    def __len__(self) -> int:
        return len(self.packed) // _RANGE.size

    @overload
    def __getitem__(self, index: int) -> m.DiscardRange: ...

    @overload
    def __getitem__(self, index: slice) -> tuple[m.DiscardRange, ...]: ...

    def __getitem__(self, index: int | slice) -> m.DiscardRange | tuple[m.DiscardRange, ...]:
        if isinstance(index, slice):
            return tuple(self)[index]
        count = len(self)
        if not -count <= index < count:
            raise IndexError("discard range index out of range")
        return m.DiscardRange(*_RANGE.unpack_from(self.packed, _RANGE.size * (index % count)))

    def __iter__(self) -> Iterator[m.DiscardRange]:
        return (m.DiscardRange(start, length) for start, length in _RANGE.iter_unpack(self.packed))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, DiscardRanges):
            return self.packed == other.packed
        if isinstance(other, tuple | list):
            return tuple(self) == tuple(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        return repr(tuple(self))


class DiscardReader:
    """Decodes well-formed POSTCOPY_RAM_DISCARD commands; declines everything else."""

    def __init__(self, schema: Schema) -> None:
        profile = schema.profile
        self.section_type = profile.section_types["COMMAND"]
        self.cmd = profile.commands.get("POSTCOPY_RAM_DISCARD", -1)
        self.rule = profile.command_lengths.get("POSTCOPY_RAM_DISCARD")
        self.version = profile.discard_version
        self.command_header_size = schema.command_header_size
        self.enabled = self.rule is not None and "POSTCOPY_RAM_DISCARD" in schema.command_payloads

    def read(self, buf: Any, pos: int, limit: int) -> tuple[m.PostcopyRamDiscard, int] | None:
        """The command at ``buf[pos:limit]`` and its size, or None: the schema's to decode."""
        found = self._find(buf, pos, limit)
        if found is None:
            return None
        name, version, ranges_at, end = found
        block = bytes(name).decode(NAME_ENCODING)
        ranges = DiscardRanges(bytes(buf[ranges_at:end]))
        return m.PostcopyRamDiscard(block, ranges, version), end - pos

    def _find(self, buf: Any, pos: int, limit: int) -> tuple[Any, int, int, int] | None:
        """(name bytes, version, where the ranges start, end) of the well-formed command at
        ``buf[pos:limit]``, or None."""
        if not self.enabled or pos + _HEAD.size > limit:
            return None
        kind, cmd, length, version, name_length = _HEAD.unpack_from(buf, pos)
        if kind != self.section_type or cmd != self.cmd or version != self.version:
            return None
        end = pos + self.command_header_size + length
        name_at = pos + _HEAD.size
        ranges_at = name_at + name_length + _TERMINATOR  # after the name's terminator
        if (
            name_length == 0
            or end > limit
            or ranges_at > end
            or (end - ranges_at) % _RANGE.size
            or buf[ranges_at - 1] != 0
            or self.rule is None
            or not self.rule.allows(length)
        ):
            return None
        return buf[name_at : ranges_at - 1], version, ranges_at, end

    def read_run(
        self, buf: Any, pos: int, limit: int, first: tuple[m.PostcopyRamDiscard, int]
    ) -> tuple[m.PostcopyRamDiscard | m.PostcopyRamDiscards, int]:
        """``first`` (the command :meth:`read` found at ``pos``) with the well-formed discard
        commands of the same block that follow it in ``buf[:limit]``, as one message and
        its size; ``first`` itself when none follows."""
        message, size = first
        name = message.block.encode(NAME_ENCODING)
        parts = [DiscardRanges.of(message.ranges).packed]
        commands = [(0, len(parts[0]) // _RANGE.size)]
        at = pos + size
        while (found := self._find(buf, at, limit)) is not None:
            other, version, ranges_at, end = found
            if other != name or version != message.version:
                break
            parts.append(bytes(buf[ranges_at:end]))
            commands.append((at - pos, (end - ranges_at) // _RANGE.size))
            at = end
        if len(parts) == 1:
            return first
        ranges = DiscardRanges(b"".join(parts))
        run = m.PostcopyRamDiscards(message.block, ranges, message.version, tuple(commands))
        return run, at - pos


def apply_to_state(
    ranges: DiscardRanges,
    page_size: int,
    used_length: int,
    target_page_size: int,
    state: bytearray,
) -> tuple[int | None, int]:
    """Mark every target page of ``ranges`` missing (0) in ``state``, one byte per page.

    Returns ``(None, pages cleared)``; or, when a range is not aligned to ``page_size`` or
    not inside ``used_length``, ``(its index, 0)`` with nothing changed. One C call.
    """
    count = len(ranges)
    if not count:
        return None, 0
    cleared = ffi.new("uint64_t *")
    first_bad = lib.qmig_discard_apply(
        ffi.from_buffer(ranges.packed),
        count,
        page_size,
        used_length,
        target_page_size,
        ffi.from_buffer(state),
        len(state),
        cleared,
    )
    if first_bad < count:
        return int(first_bad), 0
    return None, int(cleared[0])
