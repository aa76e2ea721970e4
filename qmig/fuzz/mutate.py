"""Mutations of migration-stream bytes.

Plain byte mutations (bit flips, interesting values, inserts, deletes, splices) find framing
bugs; the structure-aware ones find the checks behind them: a length field of a command or
a return-path message set to an edge value (0, one off, 0xffff, a name length past the
command), a be32/be64 set to a boundary, a whole known record spliced in at a record-like
boundary.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from qmig.wire.profiles import Profile
from qmig.wire.schema import (
    DISCARD_VERSION,
    Schema,
    discard_range,
    field_offset,
    schema_for,
)

MAX_SIZE = 1 << 20


def _edges(bits: int) -> list[int]:
    """The integer edges of a field of ``bits``: 0, 1, the sign bit and its neighbours, all ones."""
    top = 1 << (bits - 1)
    return [0, 1, top - 1, top, (1 << bits) - 1]


@dataclass(frozen=True)
class Interesting:
    """Values worth writing into a field of each width: integer edges and the wire's own
    numbers (section types, RAM flags, the lengths the receiver insists on, the page size)."""

    u8: list[int]
    u16: list[int]
    u32: list[int]
    u64: list[int]

    @classmethod
    def of(cls, schema: Schema) -> Interesting:
        profile = schema.profile
        page = schema.target_page_size
        flags = profile.ram_flags
        return cls(
            u8=_unique(_edges(8), profile.section_types.values(), _low_flags(profile)),
            u16=_unique(_edges(16), _lengths(profile)),
            u32=_unique(_edges(32), [page, (1 << 32) - page]),
            u64=_unique(
                _edges(64),
                [page, (1 << 64) - page, flags["EOS"], flags["CONTINUE"] | flags["PAGE"]],
            ),
        )


def _low_flags(profile: Profile) -> list[int]:
    return [value for value in profile.ram_flags.values() if value < 1 << 8]


def _lengths(profile: Profile) -> list[int]:
    """Every length a command or return-path message must have, and one below each minimum."""
    out: list[int] = []
    for rule in (*profile.command_lengths.values(), *profile.rp_lengths.values()):
        out.extend(rule.accepted or ())
        if rule.min_length:
            out.extend([rule.min_length - 1, rule.min_length])
    return out


def _unique(*groups: Iterable[int]) -> list[int]:
    values: list[int] = []
    for group in groups:
        for value in group:
            if value not in values:
                values.append(value)
    return values


class Mutator:
    """Stacks a few random mutations; deterministic for a given ``random.Random``."""

    def __init__(
        self,
        rng: random.Random,
        dictionary: Sequence[bytes],
        channel: str = "stream",
        version: str | None = None,
    ) -> None:
        self.rng = rng
        self.dictionary = list(dictionary)
        self.channel = channel
        schema = schema_for(version)
        self.interesting = Interesting.of(schema)
        self.command_byte = schema.profile.section_types["COMMAND"]
        self.command_numbers = set(schema.profile.commands.values())
        self.length_at = schema.command_length_at  # the be16 length, from the command's start
        self.rp_length_at = field_offset(schema.rp_header, "len")
        # A discard's name-length byte: after its version byte, at the payload's start.
        self.discard_name_length_at = schema.command_header_size + DISCARD_VERSION.sizeof()
        self.operations: list[Callable[[bytearray, Sequence[bytes]], None]] = [
            self.flip_bit,
            self.set_byte,
            self.insert_bytes,
            self.delete_bytes,
            self.duplicate,
            self.set_word,
            self.tweak_length,
            self.tweak_length,
            self.insert_record,
            self.splice,
            self.truncate,
        ]

    def mutate(self, data: bytes, corpus: Sequence[bytes]) -> bytes:
        out = bytearray(data)
        for _ in range(1 + min(int(self.rng.expovariate(0.7)), 7)):
            self.rng.choice(self.operations)(out, corpus)
        return bytes(out[:MAX_SIZE])

    def _at(self, out: bytearray, extra: int = 0) -> int:
        return self.rng.randrange(len(out) + extra) if len(out) + extra else 0

    # --- byte level -----------------------------------------------------------------------

    def flip_bit(self, out: bytearray, corpus: Sequence[bytes]) -> None:
        if out:
            out[self._at(out)] ^= 1 << self.rng.randrange(8)

    def set_byte(self, out: bytearray, corpus: Sequence[bytes]) -> None:
        if out:
            out[self._at(out)] = self.rng.choice([*self.interesting.u8, self.rng.randrange(256)])

    def insert_bytes(self, out: bytearray, corpus: Sequence[bytes]) -> None:
        at = self._at(out, 1)
        if self.rng.random() < 0.5:
            out[at:at] = bytes([self.rng.choice(self.interesting.u8)]) * self.rng.randint(1, 4)
        else:
            out[at:at] = self.rng.randbytes(self.rng.randint(1, 16))

    def delete_bytes(self, out: bytearray, corpus: Sequence[bytes]) -> None:
        if out:
            at = self._at(out)
            del out[at : at + self.rng.choice([1, 1, 2, 4, 8, 16, 64])]

    def duplicate(self, out: bytearray, corpus: Sequence[bytes]) -> None:
        if out:
            at = self._at(out)
            piece = out[at : at + self.rng.randint(1, 64)]
            where = self._at(out, 1)
            out[where:where] = piece

    def truncate(self, out: bytearray, corpus: Sequence[bytes]) -> None:
        if out:
            del out[self._at(out) :]

    def set_word(self, out: bytearray, corpus: Sequence[bytes]) -> None:
        size = self.rng.choice([2, 4, 8])
        if len(out) < size:
            return
        table = {
            2: self.interesting.u16,
            4: self.interesting.u32,
            8: self.interesting.u64,
        }[size]
        at = self.rng.randrange(len(out) - size + 1)
        old = int.from_bytes(out[at : at + size], "big")
        value = self.rng.choice([*table, old + 1, old - 1, old ^ (1 << (8 * size - 1))])
        out[at : at + size] = (value % (1 << (8 * size))).to_bytes(size, "big")

    # --- structure aware -----------------------------------------------------------------

    def _length_fields(self, out: bytearray) -> list[int]:
        """Offsets of be16 length fields: of commands (COMMAND, be16 number this version
        knows, be16 length), or of return-path messages (be16 type, be16 length) when fuzzing
        the return path (any offset may start one there)."""
        if self.channel == "return_path":
            return list(range(self.rp_length_at, len(out) - 1, 1))
        found: list[int] = []
        at = out.find(self.command_byte)
        while 0 <= at < len(out) - self.length_at - 1 and len(found) < 64:
            number = int.from_bytes(out[at + 1 : at + self.length_at], "big")
            if number in self.command_numbers:
                found.append(at + self.length_at)
            at = out.find(self.command_byte, at + 1)
        return found

    def tweak_length(self, out: bytearray, corpus: Sequence[bytes]) -> None:
        fields = self._length_fields(out)
        if not fields:
            self.set_word(out, corpus)
            return
        at = self.rng.choice(fields)
        old = int.from_bytes(out[at : at + 2], "big")
        span = discard_range().sizeof()  # a length one discard range longer or shorter
        value = self.rng.choice(
            [*self.interesting.u16, old + 1, old - 1, old + span, old - span, old * 2]
        )
        out[at : at + 2] = (value % (1 << 16)).to_bytes(2, "big")
        name_length_at = at - self.length_at + self.discard_name_length_at
        if self.rng.random() < 0.3 and self.channel == "stream" and name_length_at < len(out):
            # A discard's name-length byte (after the command header and the version byte).
            out[name_length_at] = self.rng.choice([0, 1, old % 256, (old + 1) % 256, 0xFF])

    def insert_record(self, out: bytearray, corpus: Sequence[bytes]) -> None:
        if not self.dictionary:
            return
        record = self.rng.choice(self.dictionary)
        boundaries = self._length_fields(out)
        if boundaries and self.rng.random() < 0.7 and self.channel == "stream":
            at = self.rng.choice(boundaries) - self.length_at  # before a command
        else:
            at = self._at(out, 1)
        out[at:at] = record

    def splice(self, out: bytearray, corpus: Sequence[bytes]) -> None:
        if not corpus:
            return
        other = self.rng.choice(corpus)
        if not other:
            return
        cut = self._at(out, 1)
        start = self.rng.randrange(len(other))
        out[cut:] = other[start : start + self.rng.randint(1, max(1, len(other) - start))]
