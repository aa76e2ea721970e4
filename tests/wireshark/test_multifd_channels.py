"""Multifd connections in the pcapng and the dissector: each its own TCP stream, the handshake
and every packet decoded with its fields, the main channel beside them unchanged.

The folders are a shipped capture with multifd connections added by qmig's own builders
(:mod:`multifd_pcap_folder`), for a version without zero pages in the packet (7.2) and one with
them and with device-state packets (10.0); whole, in small TCP segments, and dissected
twice as the GUI does (tshark -2).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from dissecting import FIXTURES, column, export, inspect_json, run_tshark
from multifd_pcap_folder import build_folder
from test_pcapng import read_pcapng

from qmig.pcap import SOURCE_PORT

FIELDS = [
    "qmig.channel",
    "qmig.record",
    "qmig.multifd.channel",
    "qmig.multifd.packet_num",
    "qmig.multifd.normal_pages",
    "qmig.multifd.zero_pages",
    "qmig.multifd.ramblock",
    "qmig.multifd.page",
    "qmig.multifd.zero_page",
    "qmig.multifd.sync",
    "qmig.multifd.data",
    "qmig.undecoded",
    "qmig.cmd",
    "qmig.rp.message",
]
UNCOUNTED = {"EOS", "HOOK", "MULTIFD_FLUSH"}


@pytest.mark.parametrize("version", ["7.2", "10.0"])
@pytest.mark.parametrize(
    ("segment", "passes"),
    [(None, []), (1448, []), (9000, ["-2"])],
    ids=["whole", "small-segments", "two-passes"],
)
def test_multifd_channels_are_dissected_packet_by_packet(
    version: str,
    segment: int | None,
    passes: list[str],
    tshark: str,
    lua_for: Callable[[str], Path],
    tmp_path: Path,
) -> None:
    built = build_folder(FIXTURES / "postcopy-tcp", tmp_path / "capture", version)
    options = [] if segment is None else ["--segment-size", str(segment)]
    pcapng = export(tmp_path / "capture", tmp_path / "c.pcapng", *options)
    # Each channel its own TCP stream: the main one from SOURCE_PORT, multifd K from +2+K.
    ports = {packet.src_port for packet in read_pcapng(pcapng) if packet.src_port != 4444}
    assert ports == {SOURCE_PORT, SOURCE_PORT + 2, SOURCE_PORT + 3}
    rows = run_tshark(tshark, lua_for(version), pcapng, FIELDS, *passes)
    by_channel: dict[str, list[list[list[str]]]] = {}
    for row in rows:
        if row and row[0]:
            by_channel.setdefault(row[0][0], []).append(row)
    multifd = by_channel["multifd"]
    records = Counter(column(multifd, 1))
    assert records == Counter(
        {"MULTIFD_INIT": built.inits, "MULTIFD_PACKET": built.packets}
        | ({"MULTIFD_DEVICE_STATE": built.device_states} if built.device_states else {})
    )
    assert sorted(int(v) for v in column(multifd, 2)) == [0, 1]
    assert sorted(int(v) for v in column(multifd, 3)) == sorted(built.packet_numbers)
    assert sum(int(v) for v in column(multifd, 4)) == built.normal_pages
    zero = [int(v) for v in column(multifd, 5)]
    assert sum(zero) == built.zero_pages and (len(zero) > 0) == (version == "10.0")
    assert Counter(column(multifd, 6)) == Counter(built.blocks)
    assert sorted(int(v, 16) for v in column(multifd, 7)) == sorted(built.normal_offsets)
    assert len(column(multifd, 8)) == built.zero_pages
    assert sum(v in ("1", "True") for v in column(multifd, 9)) == built.syncs
    assert sum(len(v.replace(":", "")) // 2 for v in column(multifd, 10)) == built.data_bytes
    assert column(multifd, 11) == []
    # The main channel is dissected as without the multifd connections.
    main = by_channel["main"]
    assert column(main, 11) == []
    expected = inspect_json(FIXTURES / "postcopy-tcp")
    stream = Counter(name for name in column(main, 1) if name not in UNCOUNTED)
    stream["COMMAND"] = len(column(main, 12))
    assert dict(stream) == expected["counts"]
    assert dict(Counter(column(main, 13))) == expected["return_path"]["counts"]


def test_a_damaged_multifd_packet_is_flagged_where_it_starts(
    tshark: str, lua_for: Callable[[str], Path], tmp_path: Path
) -> None:
    """A packet whose magic is wrong: the channel's bytes from there on are undecoded, with
    an expert note that names the field; the other channel is decoded whole."""
    built = build_folder(FIXTURES / "postcopy-tcp", tmp_path / "capture", "10.0")
    damaged = tmp_path / "capture" / "multifd-1.bin"
    data = bytearray(damaged.read_bytes())
    data[64] ^= 0xFF  # the first packet's magic, after the 64-byte handshake
    damaged.write_bytes(bytes(data))
    pcapng = export(tmp_path / "capture", tmp_path / "c.pcapng")
    rows = run_tshark(
        tshark, lua_for("10.0"), pcapng,
        ["qmig.channel", "qmig.record", "qmig.multifd.channel", "qmig.undecoded",
         "_ws.expert.message"],
    )  # fmt: skip
    multifd = [row for row in rows if row and row[0][:1] == ["multifd"]]
    notes = column(multifd, 4)
    assert any(note == "MULTIFD_PACKET: magic 0xee223344 is not 0x11223344" for note in notes)
    assert column(multifd, 3) != []
    records = Counter(column(multifd, 1))
    assert records["MULTIFD_INIT"] == 2
    # Channel 0's packets all decoded; none of channel 1's.
    assert records["MULTIFD_PACKET"] == sum(n % 2 == 0 for n in built.packet_numbers)
