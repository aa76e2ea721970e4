"""Mutations of migration-stream bytes.

Plain byte mutations (bit flips, interesting values, inserts, deletes, splices) find framing
bugs; the structure-aware ones find the checks behind them: a length field of a command or
a return-path message set to an edge value (0, one off, 0xffff, a name length past the
command), a be32/be64 set to a boundary, a whole known record spliced in at a record-like
boundary.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

INTERESTING_8 = [0x00, 0x01, 0x02, 0x07, 0x08, 0x10, 0x20, 0x7E, 0x7F, 0x80, 0xFF]
INTERESTING_16 = [0, 1, 3, 4, 12, 13, 16, 19, 20, 0x7FFF, 0x8000, 0xFFFF]
INTERESTING_32 = [0, 1, 0x1000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0xFFFFFFF0]
INTERESTING_64 = [0, 0x1000, 1 << 63, (1 << 64) - 1, (1 << 64) - 0x1000, 0x10, 0x20 | 0x08]
COMMAND_BYTE = 0x08
MAX_SIZE = 1 << 20


class Mutator:
    """Stacks a few random mutations; deterministic for a given ``random.Random``."""

    def __init__(
        self, rng: random.Random, dictionary: Sequence[bytes], channel: str = "stream"
    ) -> None:
        self.rng = rng
        self.dictionary = list(dictionary)
        self.channel = channel
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
            out[self._at(out)] = self.rng.choice([*INTERESTING_8, self.rng.randrange(256)])

    def insert_bytes(self, out: bytearray, corpus: Sequence[bytes]) -> None:
        at = self._at(out, 1)
        if self.rng.random() < 0.5:
            out[at:at] = bytes([self.rng.choice(INTERESTING_8)]) * self.rng.randint(1, 4)
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
        table = {2: INTERESTING_16, 4: INTERESTING_32, 8: INTERESTING_64}[size]
        at = self.rng.randrange(len(out) - size + 1)
        old = int.from_bytes(out[at : at + size], "big")
        value = self.rng.choice([*table, old + 1, old - 1, old ^ (1 << (8 * size - 1))])
        out[at : at + size] = (value % (1 << (8 * size))).to_bytes(size, "big")

    # --- structure aware -----------------------------------------------------------------

    def _length_fields(self, out: bytearray) -> list[int]:
        """Offsets of be16 length fields: of commands (0x08 cmd16 len16), or of return-path
        messages (type16 len16) when fuzzing the return path."""
        if self.channel == "return_path":
            return list(range(2, len(out) - 1, 1))
        found: list[int] = []
        at = out.find(COMMAND_BYTE)
        while 0 <= at < len(out) - 4 and len(found) < 64:
            if out[at + 1] == 0 and 0 < out[at + 2] < 16:
                found.append(at + 3)
            at = out.find(COMMAND_BYTE, at + 1)
        return found

    def tweak_length(self, out: bytearray, corpus: Sequence[bytes]) -> None:
        fields = self._length_fields(out)
        if not fields:
            self.set_word(out, corpus)
            return
        at = self.rng.choice(fields)
        old = int.from_bytes(out[at : at + 2], "big")
        value = self.rng.choice([*INTERESTING_16, old + 1, old - 1, old + 16, old - 16, old * 2])
        out[at : at + 2] = (value % 0x10000).to_bytes(2, "big")
        if self.rng.random() < 0.3 and at + 4 < len(out):
            # A discard's name-length byte (version, name_len after the header).
            out[at + 4] = self.rng.choice([0, 1, old % 256, (old + 1) % 256, 0xFF])

    def insert_record(self, out: bytearray, corpus: Sequence[bytes]) -> None:
        if not self.dictionary:
            return
        record = self.rng.choice(self.dictionary)
        boundaries = self._length_fields(out)
        if boundaries and self.rng.random() < 0.7 and self.channel == "stream":
            at = self.rng.choice(boundaries) - 3  # before a command
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
