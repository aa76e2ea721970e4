"""A capture folder as a pcapng file: each channel a synthetic TCP connection.

The relay records the bytes and when each chunk arrived, not the packets that carried them,
so the framing here is made up: Ethernet, IPv4 and TCP headers around each chunk (split into
segments that fit an IPv4 packet), with a three-way handshake first, sequence and
acknowledgement numbers that follow both directions, and FINs at the end. Each segment
carries its chunk's recorded time. The source is 10.0.0.1, the destination 10.0.0.2:PORT.
The main channel (stream and return path) comes from source port 50000, the
postcopy-preempt channel from 50001, multifd connection K from 50002 + K: each is its own
TCP stream to the destination's one port, as QEMU opens them.

pcapng is a simple block format (a section header, one interface, one Enhanced Packet Block
per packet; all little-endian here), written directly: no dependency.
"""

from __future__ import annotations

import bisect
import json
import struct
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from qmig import __version__
from qmig.capture.recording import (
    INDEX_HEADER,
    INDEX_NAME,
    META_NAME,
    STREAM_NAME,
    Direction,
    capture_file,
    open_capture_file,
    read_capture_file,
)
from qmig.errors import MalformedError, QmigError

DEFAULT_PORT = 4444
SOURCE_PORT = 50000
SOURCE_IP = bytes([10, 0, 0, 1])
DESTINATION_IP = bytes([10, 0, 0, 2])
SOURCE_MAC = bytes.fromhex("020000000001")
DESTINATION_MAC = bytes.fromhex("020000000002")
# An IPv4 packet holds at most 65535 bytes: 20 of IP header and 20 of TCP header leave this.
MAX_SEGMENT = 65535 - 40
WINDOW_SCALE = 14  # announced in the SYNs, so that no window looks full

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
    # The other channels' bytes, each its own TCP connection: preempt, multifd-0, ...
    channel_bytes: dict[str, int]

    def as_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "packets": self.packets,
            "stream_bytes": self.stream_bytes,
            "return_path_bytes": self.return_path_bytes,
            "channel_bytes": self.channel_bytes,
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
    """One side of one synthetic TCP connection: its address, port and next sequence number."""

    def __init__(self, *, source: bool, port: int, peer_port: int, seq: int) -> None:
        self.ip, self.peer_ip = (
            (SOURCE_IP, DESTINATION_IP) if source else (DESTINATION_IP, SOURCE_IP)
        )
        self.mac, self.peer_mac = (
            (SOURCE_MAC, DESTINATION_MAC) if source else (DESTINATION_MAC, SOURCE_MAC)
        )
        self.port, self.peer_port = port, peer_port
        self.seq = seq
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

STREAM = Direction.STREAM.value
RETURN_PATH = Direction.RETURN_PATH.value
PREEMPT = Direction.PREEMPT.value
MULTIFD_PREFIX = "multifd-"  # multifd-<K>: the K-th multifd connection the relay accepted


@dataclass(frozen=True)
class _Chunk:
    """One line of the index: ``direction`` as the index names it (``multifd-<K>`` too)."""

    direction: str
    offset: int
    length: int
    t_ns: int


@dataclass
class _Source:
    """Where the bytes and their times come from."""

    files: dict[str, Path]  # direction -> its data file
    chunks: list[_Chunk]
    start_ns: int  # wall-clock nanoseconds of t = 0
    # direction -> where each connection after the first starts in its file (a recovery)
    boundaries: dict[str, list[int]] = field(default_factory=dict)


def _multifd_number(direction: str) -> int | None:
    number = direction.removeprefix(MULTIFD_PREFIX)
    if number == direction or not number.isdigit():
        return None
    return int(number)


def _file_name(direction: str) -> str:
    if _multifd_number(direction) is not None:
        return f"{direction}.bin"
    return Direction(direction).file_name


def _read_chunks(path: Path) -> list[_Chunk]:
    """The index, with the multifd connections' directions as well as the main ones."""
    lines = read_capture_file(path).decode("ascii", "replace").splitlines()
    if not lines or lines[0] + "\n" != INDEX_HEADER:
        raise MalformedError(str(path), "not a qmig capture index (bad header line)")
    known = {d.value for d in Direction}
    chunks = []
    for number, line in enumerate(lines[1:], start=2):
        fields = line.split("\t")
        try:
            if len(fields) != 4 or (fields[0] not in known and _multifd_number(fields[0]) is None):
                raise ValueError
            offset, length, t_ns = (int(field) for field in fields[1:])
        except ValueError:
            raise MalformedError(str(path), f"bad index line {number}: {line!r}") from None
        chunks.append(_Chunk(fields[0], offset, length, t_ns))
    return chunks


def _open_source(capture: Path, max_segment: int) -> _Source:
    if capture.is_file():
        return _Source({STREAM: capture}, _even_chunks(capture, max_segment), _mtime_ns(capture))
    if not capture.is_dir():
        raise QmigError(str(capture), "no such capture folder or stream file")
    stream = capture_file(capture, STREAM_NAME)
    if stream is None:
        raise QmigError(str(capture), f"not a capture folder: no {STREAM_NAME}")
    index = capture_file(capture, INDEX_NAME)
    meta = _meta(capture)
    started = meta.get("started_unix", meta.get("capture_meta", {}).get("started_unix"))
    start_ns = int(started * 1e9) if isinstance(started, int | float) else _mtime_ns(stream)
    if index is None:  # a stream recorded without the relay (e.g. migrate to a file)
        return _Source({STREAM: stream}, _even_chunks(stream, max_segment), start_ns)
    chunks = _read_chunks(index)
    files = {STREAM: stream}
    for direction in dict.fromkeys(chunk.direction for chunk in chunks):
        if direction in files:
            continue
        found = capture_file(capture, _file_name(direction))
        if found is None:
            raise QmigError(
                str(capture), f"the index has {direction} chunks but no {_file_name(direction)}"
            )
        files[direction] = found
    return _Source(files, chunks, start_ns, _boundaries(meta))


# meta.json's ``connections`` (postcopy recovery): where each one starts in each direction.
BOUNDARY_KEYS = {
    STREAM: "stream_offset",
    RETURN_PATH: "return_path_offset",
    PREEMPT: "preempt_offset",
}
GENERATION_STEP = 100  # source port of a channel's next connection after a recovery: +100


def _boundaries(meta: dict[str, Any]) -> dict[str, list[int]]:
    connections = meta.get("connections")
    if not isinstance(connections, list):
        return {}
    found: dict[str, list[int]] = {}
    for direction, key in BOUNDARY_KEYS.items():
        offsets = [c.get(key) for c in connections[1:] if isinstance(c, dict)]
        found[direction] = sorted(o for o in offsets if isinstance(o, int) and o >= 0)
    return found


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


def _even_chunks(stream: Path, size: int) -> list[_Chunk]:
    """No index: one chunk per segment, a microsecond apart (the times are not known)."""
    with open_capture_file(stream) as handle:
        total = 0
        while block := handle.read(1 << 20):
            total += len(block)
    return [
        _Chunk(STREAM, offset, min(size, total - offset), index * 1000)
        for index, offset in enumerate(range(0, total, size))
    ]


def _read_exactly(handle: BinaryIO, size: int, what: str, offset: int) -> bytes:
    data = handle.read(size)
    if len(data) != size:
        raise QmigError(INDEX_NAME, f"{what} chunk at {offset} runs past the end of its file")
    return data


class _Connection:
    """One synthetic TCP connection: the source's end (client) and the destination's."""

    def __init__(self, source_port: int, port: int) -> None:
        self.client = _Endpoint(source=True, port=source_port, peer_port=port, seq=1000)
        self.server = _Endpoint(source=False, port=port, peer_port=source_port, seq=5000)

    def open(self, max_segment: int) -> Iterator[bytes]:
        mss = struct.pack("!BBH", 2, 4, min(max_segment, 0xFFFF))
        syn_options = mss + b"\x01" + struct.pack("!BBB", 3, 3, WINDOW_SCALE)  # MSS, NOP, WS
        yield tcp_frame(self.client, self.server, TCP_SYN, options=syn_options)
        yield tcp_frame(self.server, self.client, TCP_SYN | TCP_ACK, options=syn_options)
        yield tcp_frame(self.client, self.server, TCP_ACK)

    def close(self) -> Iterator[bytes]:
        yield tcp_frame(self.client, self.server, TCP_FIN | TCP_ACK)
        yield tcp_frame(self.server, self.client, TCP_FIN | TCP_ACK)
        yield tcp_frame(self.client, self.server, TCP_ACK)


def source_port(direction: str) -> int:
    """The source's TCP port of the connection that carries ``direction``: the main channel
    SOURCE_PORT, the preempt channel the next, multifd connection K SOURCE_PORT + 2 + K. Every
    connection goes to the destination's one port, as QEMU's channels do."""
    if direction in (STREAM, RETURN_PATH):
        return SOURCE_PORT
    if direction == PREEMPT:
        return SOURCE_PORT + 1
    number = _multifd_number(direction)
    assert number is not None
    return SOURCE_PORT + 2 + number


def _packets(source: _Source, port: int, max_segment: int) -> Iterator[tuple[int, bytes]]:
    """(t_ns since t = 0, frame) for every connection, in time order.

    The main channel (the stream and its return path) is opened at t = 0, the preempt
    channel and each multifd connection at their first chunk's time. Where meta.json says
    a recovery replaced a channel, its next connection (source port + 100) opens with the
    first bytes past the boundary, and the one before is closed then.
    """
    connections: dict[int, _Connection] = {SOURCE_PORT: _Connection(SOURCE_PORT, port)}
    closed: set[int] = set()
    for frame in connections[SOURCE_PORT].open(max_segment):
        yield 0, frame
    handles = {direction: open_capture_file(path) for direction, path in source.files.items()}
    expected = dict.fromkeys(source.files, 0)
    last = 0
    try:
        for chunk in source.chunks:
            direction = chunk.direction
            if chunk.offset != expected[direction]:
                raise QmigError(
                    INDEX_NAME,
                    f"{direction} chunk at {chunk.offset}, expected {expected[direction]}",
                )
            expected[direction] += chunk.length
            data = _read_exactly(handles[direction], chunk.length, direction, chunk.offset)
            last = max(last, chunk.t_ns)
            cuts = source.boundaries.get(direction, [])
            for generation, part in _split(data, chunk.offset, cuts):
                number = source_port(direction) + GENERATION_STEP * generation
                connection = connections.get(number)
                if connection is None:
                    previous = number - GENERATION_STEP
                    if generation and previous in connections and previous not in closed:
                        closed.add(previous)
                        for frame in connections[previous].close():
                            yield chunk.t_ns, frame
                    connection = connections[number] = _Connection(number, port)
                    for frame in connection.open(max_segment):
                        yield chunk.t_ns, frame
                sender, receiver = connection.client, connection.server
                if direction == RETURN_PATH:
                    sender, receiver = receiver, sender
                for at in range(0, len(part), max_segment):
                    piece = part[at : at + max_segment]
                    push = TCP_PSH if at + max_segment >= len(part) else 0
                    yield chunk.t_ns, tcp_frame(sender, receiver, TCP_ACK | push, piece)
        for direction, handle in handles.items():
            if handle.read(1):
                raise QmigError(
                    INDEX_NAME,
                    f"{direction} chunks end at {expected[direction]}, before the end of the file",
                )
    finally:
        for handle in handles.values():
            handle.close()
    for number, connection in connections.items():
        if number not in closed:
            for frame in connection.close():
                yield last, frame


def _split(data: bytes, offset: int, cuts: list[int]) -> Iterator[tuple[int, bytes]]:
    """(connection number, bytes) of a chunk at ``offset`` of its file, cut where a
    connection starts (``cuts``: ascending offsets of the second connection on)."""
    generation = bisect.bisect_right(cuts, offset)
    at = 0
    while at < len(data):
        end = len(data)
        if generation < len(cuts):
            end = min(end, cuts[generation] - offset)
        if end > at:
            yield generation, data[at:end]
        at = max(at, end)
        generation += 1


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
    sizes: dict[str, int] = {}
    for chunk in source.chunks:
        sizes[chunk.direction] = sizes.get(chunk.direction, 0) + chunk.length
    return PcapSummary(
        path,
        packets,
        sizes.pop(STREAM, 0),
        sizes.pop(RETURN_PATH, 0),
        last / 1e9,
        {direction: sizes[direction] for direction in sorted(sizes, key=source_port)},
    )
