"""An incremental, sans-IO reader of one multifd channel: the handshake, then packets.

Feed it bytes as they arrive (``feed``/``feed_eof``) and take events (``next_event``) until
it says :data:`NEED_DATA` or :data:`END`. It keeps only what arrived and is not yet read: a
packet's counts are checked before they size anything, and a payload larger than the
version's packet allows (or than ``max_payload``) is refused before it is waited for.
Compressed packets keep one decompressor per channel, as QEMU's sender flushes (never ends)
one stream per channel across its packets.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any

from qmig.errors import MalformedError, QmigError, TruncatedError
from qmig.wire.multifd import (
    WHAT_INIT,
    WHAT_PACKET,
    MultifdDeviceStateHeader,
    MultifdInit,
    MultifdPacketHeader,
    multifd_schema,
)
from qmig.wire.reading.records import END, NEED_DATA, Sentinel

DEFAULT_MAX_PAYLOAD = 8 << 20  # the largest device-state payload qmig buffers (bytes)


@dataclass(frozen=True)
class Handshake:
    init: MultifdInit
    offset: int
    size: int


@dataclass(frozen=True)
class Packet:
    """One RAM packet: where it is, its header, its page offsets and (decoded) normal pages."""

    header: MultifdPacketHeader
    offsets: tuple[int, ...]
    offset: int
    size: int
    method: str
    sync: bool
    pages: tuple[bytes, ...] = field(repr=False)

    @property
    def normal_offsets(self) -> tuple[int, ...]:
        return self.offsets[: self.header.normal_pages]

    @property
    def zero_offsets(self) -> tuple[int, ...]:
        return self.offsets[self.header.normal_pages :]


@dataclass(frozen=True)
class DeviceState:
    header: MultifdDeviceStateHeader
    offset: int
    size: int
    data: bytes = field(repr=False)


Event = Handshake | Packet | DeviceState


class _Decoder:
    """The channel's decompression stream for one method."""

    def __init__(self, method: str) -> None:
        self.method = method
        self._obj: Any
        if method == "ZLIB":
            self._obj = zlib.decompressobj()
        elif method == "ZSTD":
            import zstandard

            self._obj = zstandard.ZstdDecompressor().decompressobj()
        else:
            raise QmigError(WHAT_PACKET, f"qmig cannot decode {method} packets")

    def decode(self, payload: bytes, expected: int, offset: int) -> bytes:
        try:
            if self.method == "ZLIB":
                out = self._obj.decompress(payload, expected + 1)
            else:
                out = self._obj.decompress(payload)
        except Exception as error:  # zlib.error, zstandard.ZstdError
            raise MalformedError(
                WHAT_PACKET, f"{self.method} payload does not decode: {error}", offset
            ) from None
        if len(out) != expected:
            raise MalformedError(
                WHAT_PACKET,
                f"{self.method} payload decodes to {len(out)} bytes, not {expected}",
                offset,
            )
        return bytes(out)


class MultifdChannelReader:
    """Reads one multifd connection's bytes into :data:`Event` values."""

    def __init__(
        self,
        version: str | None = None,
        *,
        page_size: int | None = None,
        uuid: bytes | None = None,
        channels: int | None = None,
        blocks: dict[str, int] | None = None,
        decode: bool = True,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        method: str | None = None,
    ) -> None:
        """``uuid``/``channels``: the destination's checks of the handshake (None: any);
        ``blocks``: name -> used length, to check every page offset; ``decode``: decompress
        compressed payloads (else ``pages`` is empty for them); ``method``: the negotiated
        compression (NOCOMP, ZLIB, ...), which every packet with pages must carry (None:
        any the version knows)."""
        self.schema = multifd_schema(version)
        self.spec = self.schema.spec
        self.page_size = page_size or 1 << self.schema.profile.default_target_page_bits
        self.uuid = uuid
        self.channels = channels
        self.blocks = blocks
        self.decode = decode
        self.max_payload = max_payload
        if method is not None and method not in self.spec.compression:
            known = ", ".join(self.spec.compression)
            raise QmigError("multifd", f"unknown compression {method!r} (known: {known})")
        self.method = method
        self.init: MultifdInit | None = None
        self._buf = bytearray()
        self._base = 0  # absolute offset of _buf[0]
        self._eof = False
        self._decoders: dict[str, _Decoder] = {}
        self._page_count = self.spec.packet_size // self.page_size

    @property
    def offset(self) -> int:
        return self._base

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._eof:
            raise QmigError("multifd", "data fed after the end of the channel")
        self._buf += data

    def feed_eof(self) -> None:
        self._eof = True

    def __iter__(self) -> Any:
        while True:
            event = self.next_event()
            if event is NEED_DATA or event is END:
                return
            yield event

    def _consume(self, size: int) -> bytes:
        data = bytes(self._buf[:size])
        del self._buf[:size]
        self._base += size
        return data

    def _need(self, size: int, what: str) -> bool:
        if len(self._buf) >= size:
            return True
        if self._eof:
            raise TruncatedError(what, self._base)
        return False

    def next_event(self) -> Event | Sentinel:
        if not self._buf and self._eof and self.init is not None:
            return END
        if self.init is None:
            return self._read_init()
        if not self._need(self.schema.hdr_size, WHAT_PACKET):
            return NEED_DATA
        flags = self.schema.parse_hdr(self._buf, self._base)
        if self.schema.is_device_state(flags):
            return self._read_device_state()
        return self._read_packet()

    def _read_init(self) -> Handshake | Sentinel:
        size = self.schema.init_size
        if not self._need(size, WHAT_INIT):
            return NEED_DATA
        start = self._base
        self.init = self.schema.parse_init(self._buf, start, uuid=self.uuid, channels=self.channels)
        self._consume(size)
        return Handshake(self.init, start, size)

    def _read_packet(self) -> Packet | Sentinel:
        fixed, head = self.schema.packet_size, self.schema.packet_len(self.page_size)
        if not self._need(fixed, WHAT_PACKET):
            return NEED_DATA
        start = self._base
        header = self.schema.parse_packet(self._buf, start, self.page_size)
        count = header.normal_pages + header.zero_pages
        method = self.spec.compression_names[header.flags & self.spec.compression_mask]
        if self.method is not None and header.normal_pages and method != self.method:
            raise MalformedError(
                WHAT_PACKET, f"flags: {method} packet where {self.method} was negotiated", start + 8
            )
        payload = self.schema.payload_size(header, self.page_size)
        if method != "NOCOMP" and payload > 2 * self.spec.packet_size:
            raise MalformedError(
                WHAT_PACKET,
                f"next_packet_size: {payload} is more than qmig's limit of "
                f"{2 * self.spec.packet_size} for a compressed packet",
                start + 20,
            )
        total = head + payload
        if not self._need(total, WHAT_PACKET):
            return NEED_DATA
        offsets = tuple(
            int.from_bytes(self._buf[fixed + 8 * i : fixed + 8 * i + 8], "big")
            for i in range(count)
        )
        if count:
            self._check_block(header, offsets, start + fixed)
        data = self._consume(total)[head:]
        pages = self._pages(header, method, data, start + head)
        sync = bool(header.flags & self.spec.sync_flag)
        return Packet(header, offsets, start, total, method, sync, pages)

    def _check_block(self, header: MultifdPacketHeader, offsets: tuple[int, ...], at: int) -> None:
        if self.blocks is None:
            length = (1 << 64) - 1
        elif header.ramblock not in self.blocks:
            raise MalformedError(
                WHAT_PACKET, f"ramblock: unknown block {header.ramblock!r}", at - 256
            )
        else:
            length = self.blocks[header.ramblock]
        self.schema.check_offsets(header, list(offsets), length, self.page_size, at)

    def _pages(
        self, header: MultifdPacketHeader, method: str, data: bytes, at: int
    ) -> tuple[bytes, ...]:
        expected = header.normal_pages * self.page_size
        if method != "NOCOMP":
            if not self.decode or not header.normal_pages:
                return ()
            decoder = self._decoders.get(method)
            if decoder is None:
                decoder = self._decoders[method] = _Decoder(method)
            data = decoder.decode(data, expected, at)
        size = self.page_size
        return tuple(data[i : i + size] for i in range(0, expected, size))

    def _read_device_state(self) -> DeviceState | Sentinel:
        head = self.schema.device_state_size
        if not self._need(head, WHAT_PACKET):
            return NEED_DATA
        start = self._base
        header = self.schema.parse_device_state(self._buf, start)
        if header.next_packet_size > self.max_payload:
            raise MalformedError(
                WHAT_PACKET,
                f"next_packet_size: {header.next_packet_size} is more than qmig's "
                f"{self.max_payload}-byte limit for device state",
                start + head - 4,
            )
        total = head + header.next_packet_size
        if not self._need(total, WHAT_PACKET):
            return NEED_DATA
        data = self._consume(total)[head:]
        return DeviceState(header, start, total, data)
