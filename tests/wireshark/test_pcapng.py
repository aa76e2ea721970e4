"""`qmig export-pcap` writes a pcapng that holds each direction's bytes, at the recorded times.

The file is read back here with a small independent pcapng/Ethernet/IPv4/TCP reader; tshark
then checks the checksums and finds nothing amiss in the TCP conversation.
"""

from __future__ import annotations

import json
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from dissecting import FIXTURES, export, qmig

from qmig.capture.recording import (
    INDEX_NAME,
    RETURN_PATH_NAME,
    STREAM_NAME,
    Direction,
    capture_file,
    read_capture_file,
    read_index,
)
from qmig.pcap import write_pcapng

SYN, FIN, ACK = 0x02, 0x01, 0x10


@dataclass
class Packet:
    t_ns: int
    src_port: int
    seq: int
    ack: int
    flags: int
    payload: bytes


def ones_complement_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def read_pcapng(path: Path) -> list[Packet]:
    data = path.read_bytes()
    at, packets, resolution = 0, [], None
    kind, length = struct.unpack_from("<II", data, 0)
    assert kind == 0x0A0D0D0A and struct.unpack_from("<I", data, 8)[0] == 0x1A2B3C4D
    while at < len(data):
        kind, length = struct.unpack_from("<II", data, at)
        assert length % 4 == 0 and struct.unpack_from("<I", data, at + length - 4)[0] == length
        body = data[at + 8 : at + length - 4]
        if kind == 1:  # interface: Ethernet, and its if_tsresol option
            assert struct.unpack_from("<H", body)[0] == 1
            options = body[8:]
            while options:
                code, size = struct.unpack_from("<HH", options)
                if code == 9:
                    resolution = options[4]
                options = options[4 + size + (-size % 4) :]
        elif kind == 6:
            _, high, low, captured, original = struct.unpack_from("<IIIII", body)
            assert captured == original
            frame = body[20 : 20 + captured]
            packets.append(parse_frame((high << 32) | low, frame))
        at += length
    assert resolution == 9  # nanoseconds
    return packets


def parse_frame(t_ns: int, frame: bytes) -> Packet:
    assert frame[12:14] == b"\x08\x00"
    ip = frame[14:]
    assert ip[0] == 0x45 and ip[9] == 6
    total = struct.unpack_from("!H", ip, 2)[0]
    assert ones_complement_sum(ip[:20]) == 0xFFFF  # header checksum
    tcp = ip[20:total]
    pseudo = ip[12:20] + struct.pack("!BBH", 0, 6, len(tcp))
    assert ones_complement_sum(pseudo + tcp) == 0xFFFF  # TCP checksum
    src_port, _, seq, ack, offset, flags = struct.unpack_from("!HHIIBB", tcp)
    return Packet(t_ns, src_port, seq, ack, flags, tcp[(offset >> 4) * 4 :])


@pytest.mark.parametrize("recording", ["postcopy-tcp", "precopy-known"])
def test_each_direction_s_bytes_and_times_are_in_the_pcapng(recording: str, tmp_path: Path) -> None:
    folder = FIXTURES / recording
    summary = write_pcapng(folder, tmp_path / "c.pcapng", port=4444, max_segment=30000)
    packets = read_pcapng(tmp_path / "c.pcapng")
    assert summary.packets == len(packets)
    source = [p for p in packets if p.src_port != 4444]
    destination = [p for p in packets if p.src_port == 4444]
    # The handshake, then data, then both FINs.
    assert [p.flags & (SYN | ACK | FIN) for p in packets[:3]] == [SYN, SYN | ACK, ACK]
    assert packets[-3].flags & FIN and packets[-2].flags & FIN and not packets[-1].flags & FIN
    stream_file = capture_file(folder, STREAM_NAME)
    assert stream_file is not None
    stream = read_capture_file(stream_file)
    assert b"".join(p.payload for p in source) == stream
    rp_file = capture_file(folder, RETURN_PATH_NAME)
    rp = read_capture_file(rp_file) if rp_file else b""
    assert b"".join(p.payload for p in destination) == rp
    assert max(len(p.payload) for p in packets) <= 30000
    # Sequence numbers run on without gaps; every ACK acknowledges all the peer has sent.
    next_seq = {source[0].src_port: source[0].seq, 4444: destination[0].seq}
    for packet in packets:
        peer = 4444 if packet.src_port != 4444 else source[0].src_port
        assert packet.seq == next_seq[packet.src_port]
        next_seq[packet.src_port] += len(packet.payload) + (1 if packet.flags & (SYN | FIN) else 0)
        if packet.flags & ACK:
            assert packet.ack == next_seq[peer]
    index = capture_file(folder, INDEX_NAME)
    if index is None:
        return
    meta = json.loads((folder / "meta.json").read_text())
    start_ns = int(meta["capture_meta"]["started_unix"] * 1e9)
    chunks = read_index(index)
    data_packets = [p for p in packets if p.payload]
    times = []
    for chunk in chunks:
        pieces = -(-chunk.length // 30000)
        times += [(chunk.direction, start_ns + chunk.t_ns)] * pieces
    assert [
        (Direction.STREAM if p.src_port != 4444 else Direction.RETURN_PATH, p.t_ns)
        for p in data_packets
    ] == times


def test_tshark_finds_the_tcp_conversation_sound(tshark: str, tmp_path: Path) -> None:
    pcapng = export(FIXTURES / "postcopy-sparse", tmp_path / "c.pcapng")
    result = subprocess.run(
        [
            tshark,
            "-r",
            str(pcapng),
            "-o",
            "tcp.check_checksum:TRUE",
            "-o",
            "ip.check_checksum:TRUE",
            "-Y",
            "tcp.analysis.flags || tcp.checksum.status == 2 || ip.checksum.status == 2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""


def test_an_index_that_does_not_fit_its_files_is_refused_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "stream.bin").write_bytes(b"QEVM")
    (tmp_path / "return-path.bin").write_bytes(b"")
    (tmp_path / "index.tsv").write_text("direction\toffset\tlength\tt_ns\nstream\t0\t9\t1\n")
    result = qmig("export-pcap", str(tmp_path), str(tmp_path / "x.pcapng"))
    assert result.returncode == 1
    assert (
        result.stderr == "qmig: error: index.tsv: stream chunk at 0 runs past the end of its file\n"
    )


@pytest.mark.parametrize(
    ("line", "error"),
    [
        ("multifd-x\t0\t4\t2", "{dir}/index.tsv: bad index line 3: 'multifd-x\\t0\\t4\\t2'"),
        ("multifd-0\t0\t4\t2", "{dir}: the index has multifd-0 chunks but no multifd-0.bin"),
    ],
)
def test_a_channel_the_folder_cannot_hold_is_refused_in_one_line(
    line: str, error: str, tmp_path: Path
) -> None:
    (tmp_path / "stream.bin").write_bytes(b"QEVM")
    (tmp_path / "index.tsv").write_text(
        f"direction\toffset\tlength\tt_ns\nstream\t0\t4\t1\n{line}\n"
    )
    result = qmig("export-pcap", str(tmp_path), str(tmp_path / "x.pcapng"))
    assert result.returncode == 1
    assert result.stderr == f"qmig: error: {error.format(dir=tmp_path)}\n"


def test_a_recovery_s_connections_are_split_at_their_boundaries(tmp_path: Path) -> None:
    """meta.json says where the second connection starts: a chunk that holds the boundary is
    cut there, and the bytes past it go on a new connection from the next port."""
    (tmp_path / "stream.bin").write_bytes(b"A" * 10 + b"B" * 6)
    (tmp_path / "return-path.bin").write_bytes(b"ab")
    (tmp_path / "index.tsv").write_text(
        "direction\toffset\tlength\tt_ns\nstream\t0\t8\t1\nreturn-path\t0\t1\t2\n"
        "stream\t8\t8\t3\nreturn-path\t1\t1\t4\n"
    )
    connections = [
        {"t_ns": 0, "stream_offset": 0, "return_path_offset": 0},
        {"t_ns": 3, "stream_offset": 10, "return_path_offset": 1},
    ]
    (tmp_path / "meta.json").write_text(json.dumps({"connections": connections}))
    write_pcapng(tmp_path, tmp_path / "c.pcapng")
    packets = read_pcapng(tmp_path / "c.pcapng")
    payloads: dict[int, bytes] = {}
    for packet in packets:
        payloads[packet.src_port] = payloads.get(packet.src_port, b"") + packet.payload
    assert payloads == {50000: b"A" * 10, 4444: b"ab", 50100: b"B" * 6}
    # The first connection is closed (FIN) before the second one's SYN.
    order = [(p.src_port, p.flags & (SYN | FIN)) for p in packets if p.flags & (SYN | FIN)]
    assert order.index((50000, FIN)) < order.index((50100, SYN))
