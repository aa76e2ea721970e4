"""A capture folder as a pcapng file: both directions on one synthetic TCP connection.

The relay records the bytes and when each chunk arrived, not the packets that carried them,
so the framing here is made up: Ethernet, IPv4 and TCP headers around each chunk (split into
segments that fit an IPv4 packet), with a three-way handshake first, sequence and
acknowledgement numbers that follow both directions, and FINs at the end. Each segment
carries its chunk's recorded time. The source is 10.0.0.1, the destination 10.0.0.2:PORT.

pcapng is a simple block format (a section header, one interface, one Enhanced Packet Block
per packet; all little-endian here), written directly: no dependency.
"""

from __future__ import annotations

import json
import struct
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from qmig import __version__
from qmig.capture.recording import (
    INDEX_NAME,
    META_NAME,
    RETURN_PATH_NAME,
    STREAM_NAME,
    Chunk,
    Direction,
    capture_file,
    open_capture_file,
    read_index,
)
from qmig.errors import QmigError

DEFAULT_PORT = 4444
SOURCE_PORT = 50000
SOURCE_IP = bytes([10, 0, 0, 1])
DESTINATION_IP = bytes([10, 0, 0, 2])
SOURCE_MAC = bytes.fromhex("020000000001")
DESTINATION_MAC = bytes.fromhex("020000000002")
# An IPv4 packet holds at most 65535 bytes: 20 of IP header and 20 of TCP header leave this.
MAX_SEGMENT = 65535 - 40
WINDOW_SCALE = 14  # announced in the SYNs, so that no window looks full
INITIAL_SEQ = {Direction.STREAM: 1000, Direction.RETURN_PATH: 5000}

LINKTYPE_ETHERNET = 1
ETHERTYPE_IPV4 = 0x0800
TCP_FIN, TCP_SYN, TCP_PSH, TCP_ACK = 0x01, 0x02, 0x08, 0x10


@dataclass(frozen=True)
class PcapSummary:
    path: Path
    packets: int
    stream_bytes: int
    return_path_bytes: int
    duration_s: float

    def as_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "packets": self.packets,
            "stream_bytes": self.stream_bytes,
            "return_path_bytes": self.return_path_bytes,
            "duration_s": self.duration_s,
        }


# --- pcapng blocks -------------------------------------------------------------------------


def _option(code: int, value: bytes) -> bytes:
    return struct.pack("<HH", code, len(value)) + value + b"\0" * (-len(value) % 4)


def _block(kind: int, body: bytes) -> bytes:
    length = 12 + len(body)
    return struct.pack("<II", kind, length) + body + struct.pack("<I", length)


def section_header() -> bytes:
    options = _option(4, f"qmig {__version__}".encode()) + _option(0, b"")  # shb_userappl
    return _block(0x0A0D0D0A, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1) + options)


def interface_description() -> bytes:
    # if_tsresol 9: timestamps in nanoseconds, the resolution the relay records.
    options = _option(2, b"qmig-capture") + _option(9, bytes([9])) + _option(0, b"")
    return _block(1, struct.pack("<HHI", LINKTYPE_ETHERNET, 0, 0) + options)


def enhanced_packet(t_ns: int, frame: bytes) -> bytes:
    header = struct.pack("<IIIII", 0, t_ns >> 32, t_ns & 0xFFFFFFFF, len(frame), len(frame))
    return _block(6, header + frame + b"\0" * (-len(frame) % 4))


# --- Ethernet / IPv4 / TCP ------------------------------------------------------------------


def _checksum(data: bytes) -> bytes:
    """The Internet checksum, as the two bytes to put in the header.

    The one's-complement sum commutes with byte swapping, so summing native-order words and
    writing the result back in native order gives the network-order bytes on any host.
    """
    if len(data) % 2:
        data += b"\0"
    total = sum(array("H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return struct.pack("=H", ~total & 0xFFFF)


class _Endpoint:
    def __init__(self, direction: Direction, port: int) -> None:
        self.direction = direction
        source = direction is Direction.STREAM
        self.ip, self.peer_ip = (
            (SOURCE_IP, DESTINATION_IP) if source else (DESTINATION_IP, SOURCE_IP)
        )
        self.mac, self.peer_mac = (
            (SOURCE_MAC, DESTINATION_MAC) if source else (DESTINATION_MAC, SOURCE_MAC)
        )
        self.port, self.peer_port = (SOURCE_PORT, port) if source else (port, SOURCE_PORT)
        self.seq = INITIAL_SEQ[direction]
        self.ip_id = 0


def tcp_frame(
    sender: _Endpoint, receiver: _Endpoint, flags: int, payload: bytes = b"", options: bytes = b""
) -> bytes:
    """One Ethernet frame from ``sender``; advances its sequence number (SYN, FIN count one)."""
    header_length = 20 + len(options)
    ack = receiver.seq if flags & TCP_ACK else 0
    tcp = (
        struct.pack(
            "!HHIIBBHHH",
            sender.port,
            sender.peer_port,
            sender.seq & 0xFFFFFFFF,
            ack & 0xFFFFFFFF,
            (header_length // 4) << 4,
            flags,
            0xFFFF,
            0,
            0,
        )
        + options
    )
    pseudo = sender.ip + sender.peer_ip + struct.pack("!BBH", 0, 6, len(tcp) + len(payload))
    tcp = tcp[:16] + _checksum(pseudo + tcp + payload) + tcp[18:]
    sender.ip_id = (sender.ip_id + 1) & 0xFFFF
    ip = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(tcp) + len(payload),
        sender.ip_id,
        0x4000,  # don't fragment
        64,
        6,
        0,
        sender.ip,
        sender.peer_ip,
    )
    ip = ip[:10] + _checksum(ip) + ip[12:]
    sender.seq += len(payload) + (1 if flags & (TCP_SYN | TCP_FIN) else 0)
    ethernet = sender.peer_mac + sender.mac + struct.pack("!H", ETHERTYPE_IPV4)
    return ethernet + ip + tcp + payload


# --- the capture folder ---------------------------------------------------------------------


@dataclass
class _Source:
    """Where the bytes and their times come from."""

    stream: Path
    return_path: Path | None
    chunks: list[Chunk]
    start_ns: int  # wall-clock nanoseconds of t = 0


def _open_source(capture: Path, max_segment: int) -> _Source:
    if capture.is_file():
        return _Source(capture, None, _even_chunks(capture, max_segment), _mtime_ns(capture))
    if not capture.is_dir():
        raise QmigError(str(capture), "no such capture folder or stream file")
    stream = capture_file(capture, STREAM_NAME)
    if stream is None:
        raise QmigError(str(capture), f"not a capture folder: no {STREAM_NAME}")
    return_path = capture_file(capture, RETURN_PATH_NAME)
    index = capture_file(capture, INDEX_NAME)
    meta = _meta(capture)
    started = meta.get("started_unix", meta.get("capture_meta", {}).get("started_unix"))
    start_ns = int(started * 1e9) if isinstance(started, int | float) else _mtime_ns(stream)
    if index is None:  # a stream recorded without the relay (e.g. migrate to a file)
        return _Source(stream, None, _even_chunks(stream, max_segment), start_ns)
    chunks = read_index(index)
    if return_path is None and any(c.direction is Direction.RETURN_PATH for c in chunks):
        raise QmigError(str(capture), f"the index has return-path chunks but no {RETURN_PATH_NAME}")
    return _Source(stream, return_path, chunks, start_ns)


def _meta(capture: Path) -> dict[str, Any]:
    path = capture / META_NAME
    if not path.is_file():
        return {}
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise QmigError(str(path), f"unreadable: {error}") from None
    return document if isinstance(document, dict) else {}


def _mtime_ns(path: Path) -> int:
    return path.stat().st_mtime_ns


def _even_chunks(stream: Path, size: int) -> list[Chunk]:
    """No index: one chunk per segment, a microsecond apart (the times are not known)."""
    with open_capture_file(stream) as handle:
        total = 0
        while block := handle.read(1 << 20):
            total += len(block)
    return [
        Chunk(Direction.STREAM, offset, min(size, total - offset), index * 1000)
        for index, offset in enumerate(range(0, total, size))
    ]


def _read_exactly(handle: BinaryIO, size: int, what: str, offset: int) -> bytes:
    data = handle.read(size)
    if len(data) != size:
        raise QmigError(INDEX_NAME, f"{what} chunk at {offset} runs past the end of its file")
    return data


def _packets(source: _Source, port: int, max_segment: int) -> Iterator[tuple[int, bytes]]:
    """(t_ns since t = 0, frame) for the whole connection, in time order."""
    # One synthetic connection: the main channel's two directions (a postcopy-preempt
    # capture's third channel is not in it).
    ends = {d: _Endpoint(d, port) for d in (Direction.STREAM, Direction.RETURN_PATH)}
    src, dst = ends[Direction.STREAM], ends[Direction.RETURN_PATH]
    mss = struct.pack("!BBH", 2, 4, min(max_segment, 0xFFFF))
    syn_options = mss + b"\x01" + struct.pack("!BBB", 3, 3, WINDOW_SCALE)  # MSS, NOP, WS
    yield 0, tcp_frame(src, dst, TCP_SYN, options=syn_options)
    yield 0, tcp_frame(dst, src, TCP_SYN | TCP_ACK, options=syn_options)
    yield 0, tcp_frame(src, dst, TCP_ACK)
    handles = {Direction.STREAM: open_capture_file(source.stream)}
    if source.return_path is not None:
        handles[Direction.RETURN_PATH] = open_capture_file(source.return_path)
    expected = {d: 0 for d in Direction}
    last = 0
    try:
        for chunk in source.chunks:
            if chunk.direction is Direction.PREEMPT:
                continue
            if chunk.offset != expected[chunk.direction]:
                raise QmigError(
                    INDEX_NAME,
                    f"{chunk.direction.value} chunk at {chunk.offset}, "
                    f"expected {expected[chunk.direction]}",
                )
            expected[chunk.direction] += chunk.length
            data = _read_exactly(
                handles[chunk.direction], chunk.length, chunk.direction.value, chunk.offset
            )
            sender = ends[chunk.direction]
            receiver = dst if sender is src else src
            last = max(last, chunk.t_ns)
            for at in range(0, len(data), max_segment):
                piece = data[at : at + max_segment]
                push = TCP_PSH if at + max_segment >= len(data) else 0
                yield chunk.t_ns, tcp_frame(sender, receiver, TCP_ACK | push, piece)
        for direction, handle in handles.items():
            if handle.read(1):
                raise QmigError(
                    INDEX_NAME,
                    f"{direction.value} chunks end at {expected[direction]}, "
                    "before the end of the file",
                )
    finally:
        for handle in handles.values():
            handle.close()
    yield last, tcp_frame(src, dst, TCP_FIN | TCP_ACK)
    yield last, tcp_frame(dst, src, TCP_FIN | TCP_ACK)
    yield last, tcp_frame(src, dst, TCP_ACK)


def write_pcapng(
    capture_dir: Path,
    path: Path,
    *,
    port: int = DEFAULT_PORT,
    max_segment: int = MAX_SEGMENT,
) -> PcapSummary:
    """Write ``capture_dir`` (a ``qmig capture`` folder, or a bare stream file) as pcapng.

    ``port`` is the destination's TCP port (the dissector's default is 4444);
    ``max_segment`` the largest TCP payload per packet.
    """
    if not 1 <= max_segment <= MAX_SEGMENT:
        raise QmigError("--segment-size", f"must be 1..{MAX_SEGMENT}, got {max_segment}")
    if not 1 <= port <= 0xFFFF or port == SOURCE_PORT:
        raise QmigError("--port", f"must be 1..65535 and not {SOURCE_PORT}, got {port}")
    source = _open_source(capture_dir, max_segment)
    packets = 0
    last = 0
    with path.open("wb") as out:
        out.write(section_header() + interface_description())
        for t_ns, frame in _packets(source, port, max_segment):
            out.write(enhanced_packet(source.start_ns + t_ns, frame))
            packets += 1
            last = t_ns
    sizes = {d: 0 for d in Direction}
    for chunk in source.chunks:
        sizes[chunk.direction] += chunk.length
    return PcapSummary(
        path, packets, sizes[Direction.STREAM], sizes[Direction.RETURN_PATH], last / 1e9
    )
