"""Quick looks into captured bytes without the full wire parser: return-path messages, and a
strict byte-pattern search for POSTCOPY_RAM_DISCARD commands in a stream.

The return path is a plain sequence of ``be16 type, be16 len, payload`` messages, so walking it
is exact. The stream search is not a parse (page contents could in principle contain the same
bytes); it is used to describe fixtures, and cross-checked against the real parser's counts.
"""

from __future__ import annotations

import re
import struct
from collections import Counter
from dataclasses import dataclass

from qmig.errors import TruncatedError

RP_NAMES = {
    1: "SHUT",
    2: "PONG",
    3: "REQ_PAGES_ID",
    4: "REQ_PAGES",
    5: "RECV_BITMAP",
    6: "RESUME_ACK",
}

# u8 QEMU_VM_COMMAND, be16 POSTCOPY_RAM_DISCARD, be16 len, u8 version 0, cstr8 name, u8 0
_DISCARD = re.compile(rb"\x08\x00\x06(..)\x00([\x01-\xff])", re.DOTALL)


@dataclass(frozen=True)
class RpMessage:
    offset: int
    type: int
    payload: bytes

    @property
    def name(self) -> str:
        return RP_NAMES.get(self.type, f"0x{self.type:04x}")


def return_path_messages(data: bytes) -> list[RpMessage]:
    """Split a return-path capture at message boundaries; a cut-off message raises."""
    messages = []
    offset = 0
    while offset < len(data):
        if offset + 4 > len(data):
            raise TruncatedError("return-path message header", offset)
        kind, length = struct.unpack_from(">HH", data, offset)
        if offset + 4 + length > len(data):
            raise TruncatedError(RP_NAMES.get(kind, "return-path message"), offset)
        messages.append(RpMessage(offset, kind, data[offset + 4 : offset + 4 + length]))
        offset += 4 + length
    return messages


def count_return_path(data: bytes) -> Counter[str]:
    return Counter(message.name for message in return_path_messages(data))


@dataclass(frozen=True)
class DiscardCommand:
    offset: int
    block: str
    ranges: list[tuple[int, int]]  # (start, length) in bytes within the block


def find_discard_commands(stream: bytes) -> list[DiscardCommand]:
    """POSTCOPY_RAM_DISCARD commands found by their exact framing (see module docstring)."""
    found = []
    for match in _DISCARD.finditer(stream):
        length = int.from_bytes(match.group(1), "big")
        name_length = match.group(2)[0]
        payload_start = match.start() + 5
        payload = stream[payload_start : payload_start + length]
        ranges_size = length - 3 - name_length
        if len(payload) != length or ranges_size <= 0 or ranges_size % 16:
            continue
        if payload[2 + name_length] != 0:
            continue
        try:
            block = payload[2 : 2 + name_length].decode("ascii")
        except UnicodeDecodeError:
            continue
        ranges_bytes = payload[3 + name_length :]
        ranges = [
            struct.unpack_from(">QQ", ranges_bytes, i) for i in range(0, len(ranges_bytes), 16)
        ]
        found.append(DiscardCommand(match.start(), block, ranges))
    return found
