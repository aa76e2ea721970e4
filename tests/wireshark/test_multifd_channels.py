"""Multifd connections in the pcapng and the dissector: each its own TCP stream, the handshake
and every packet decoded with its fields, the main channel beside them unchanged.

The folders are a shipped capture with multifd connections added by qmig's own builders
(:mod:`multifd_folder`), for a version without zero pages in the packet (7.2) and one with
them and with device-state packets (10.0).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from dissecting import FIXTURES, column, export, inspect_json, run_tshark
from multifd_folder import build_folder
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
@pytest.mark.parametrize("segment", [None, 1448])
def test_multifd_channels_are_dissected_packet_by_packet(
    version: str,
    segment: int | None,
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
    rows = run_tshark(tshark, lua_for(version), pcapng, FIELDS)
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
