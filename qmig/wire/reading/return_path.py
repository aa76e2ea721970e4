"""The destination-to-source return path, read into :class:`Record` values."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

from qmig.errors import MalformedError, TruncatedError
from qmig.wire import messages as m
from qmig.wire.fields import FieldError
from qmig.wire.page_requests import PageRequests
from qmig.wire.reading.buffer import ByteStream, InputBuffer
from qmig.wire.reading.records import END, NEED_DATA, Record, Sentinel, parse_payload, records_of
from qmig.wire.schema import Schema, schema_for

MAX_BITMAP = 32 << 20  # the largest RECV_BITMAP bitmap: 1 TiB of 4 KiB pages


class ReturnPathReader(InputBuffer):
    """Reads the destination-to-source return path into :class:`Record` values.

    The source's checks, in its order: a known message type, the fixed length or the
    512-byte buffer, then the message's own rules. A REQ_PAGES asks for pages of the block
    the last REQ_PAGES_ID named, so one with no REQ_PAGES_ID before it cannot be read: the
    reader keeps whether one came, as the stream reader keeps the block a CONTINUE record
    continues.
    """

    def __init__(self, version: str | None = None) -> None:
        self.schema: Schema = schema_for(version)
        self.profile = self.schema.profile
        self._page_requests = PageRequests(self.schema)
        self._named_block = False  # a REQ_PAGES_ID came: REQ_PAGES has a block to refer to
        # Each block's received-bitmap size as its used length makes it (the source sets
        # it from its blocks): a RECV_BITMAP for another block, or of another size, is
        # refused at its size field, before its bytes are waited for.
        self.bitmap_sizes: dict[str, int] | None = None
        self._init_input()

    def new_channel(self, offset: int = 0) -> None:
        """Postcopy recovery: the return path of a new connection, read from its first byte
        (a REQ_PAGES must again follow a REQ_PAGES_ID on it); its offsets count from
        ``offset`` (see StreamReader.new_channel)."""
        self._init_input()
        self._base = offset
        self._named_block = False

    def __iter__(self) -> Iterator[Record]:
        return records_of(self.next_record)

    def next_record(self) -> Record | Sentinel:
        available = len(self._buf) - self._pos
        offset = self.offset
        if available == 0:
            return END if self._eof else NEED_DATA
        head = self.schema.rp_header_size
        if available < head:
            return self._short("return path", offset)
        request = self._page_requests.read(self._buf, self._pos, len(self._buf))
        if request is not None:  # well formed: the schema would read the same (see its module)
            message, size = request
            self._note_request(message, offset)
            self._pos += size
            return Record(offset, size, message)
        header = self.schema.rp_header.parse(bytes(self._buf[self._pos : self._pos + head]))
        name = self.profile.rp_names.get(header.type)
        if name is None or name not in self.schema.rp_payloads:
            raise MalformedError(
                "unknown message",
                f"received invalid message {header.type:#06x} length {header.len:#06x}",
                offset,
            )
        rule = self.profile.rp_lengths[name]
        if not rule.allows(header.len) or header.len > self.profile.rp_max_length:
            expected = rule.expected()
            if header.len > self.profile.rp_max_length:
                expected = f"at most {self.profile.rp_max_length}"
            raise MalformedError(
                name, f"incorrect length {header.len} expecting {expected}", offset
            )
        size = head + header.len
        if available < size:
            return self._short(name, offset)
        payload = self._buf[self._pos + head : self._pos + size]
        message = parse_payload(
            name, "message", self.schema.rp_payloads[name], payload, offset, head
        )
        if name in self.schema.rp_trailers:
            trailer = self._read_trailer(name, offset, size, message.block)
            if trailer is None:
                return self._short(name, offset)
            message = dataclasses.replace(message, bitmap=trailer.bitmap)
            size += self.schema.recv_bitmap_fixed_size + trailer.size
        self._note_request(message, offset)
        self._pos += size
        return Record(offset, size, message)

    def _note_request(self, message: Any, offset: int) -> None:
        if isinstance(message, m.ReqPagesId):
            self._named_block = True
        elif isinstance(message, m.ReqPages) and not self._named_block:
            raise MalformedError(
                "REQ_PAGES", "no previous block: no REQ_PAGES_ID named one before it", offset
            )

    def _read_trailer(self, name: str, offset: int, at: int, block: str) -> Any:
        """The bitmap after RP RECV_BITMAP, ``at`` bytes into the record; None: not all here."""
        expected = None
        if self.bitmap_sizes is not None:
            expected = self.bitmap_sizes.get(block)
            if expected is None:
                raise MalformedError(name, f"invalid block name {block!r}", offset)
        start = self._pos + at
        size_end = start + self.schema.recv_bitmap_size_size
        if len(self._buf) < size_end:
            return None
        size = int.from_bytes(self._buf[start:size_end], "big")
        if expected is not None and size != expected:
            raise MalformedError(
                name,
                f"ramblock {block!r} bitmap size mismatch ({size:#x} != {expected:#x})",
                offset + at,
            )
        if size > MAX_BITMAP:
            raise MalformedError(
                name, f"bitmap of {size} bytes is more than qmig's {MAX_BITMAP} limit", offset + at
            )
        end = start + self.schema.recv_bitmap_fixed_size + size
        if len(self._buf) < end:
            return None
        with ByteStream(self._buf[start:end]) as stream:
            try:
                return self.schema.rp_trailers[name].parse_stream(stream)
            except FieldError as error:
                raise MalformedError(name, error.detail, offset + at + error.position) from None

    def _short(self, what: str, offset: int) -> Sentinel:
        if self._eof:
            raise TruncatedError(what, offset)
        return NEED_DATA
