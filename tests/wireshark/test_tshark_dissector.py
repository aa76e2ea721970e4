"""tshark with qmig's generated dissector decodes what `qmig inspect` decodes, record for record.

Each shipped recording is exported with `qmig export-pcap`, read by Debian's tshark with the
dissector from `qmig export-pcap --lua`, and the records tshark shows are counted as
`qmig inspect --json` counts them (`counts`, `return_path.counts`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from dissecting import (
    CAPTURES,
    FIXTURE_QEMU,
    FIXTURES,
    RECORDINGS,
    column,
    dissected_counts,
    export,
    inspect_json,
    run_tshark,
)


@pytest.mark.parametrize("recording", RECORDINGS)
def test_every_record_of_a_recording_is_dissected(
    recording: str, tshark: str, lua_for: Callable[[str], Path], tmp_path: Path
) -> None:
    pcapng = export(FIXTURES / recording, tmp_path / "capture.pcapng")
    stream, return_path, undecoded = dissected_counts(tshark, lua_for(FIXTURE_QEMU), pcapng)
    expected = inspect_json(FIXTURES / recording)
    assert undecoded == []
    assert stream == expected["counts"]
    assert return_path == expected.get("return_path", {}).get("counts", {})


@pytest.mark.parametrize(("recording", "segment"), [("postcopy-tcp", 1448), ("precopy-known", 100)])
def test_records_split_across_small_segments_are_reassembled(
    recording: str, segment: int, tshark: str, lua_for: Callable[[str], Path], tmp_path: Path
) -> None:
    """A page record, a device section or the configuration spread over many TCP segments."""
    pcapng = export(FIXTURES / recording, tmp_path / "small.pcapng", "--segment-size", str(segment))
    stream, return_path, undecoded = dissected_counts(tshark, lua_for(FIXTURE_QEMU), pcapng)
    expected = inspect_json(FIXTURES / recording)
    assert undecoded == []
    assert stream == expected["counts"]
    assert return_path == expected.get("return_path", {}).get("counts", {})


@pytest.mark.parametrize(
    ("recording", "segment"), [("postcopy-sparse", 9000), ("precopy-known", 100)]
)
def test_two_pass_dissection_shows_the_same_records(
    recording: str, segment: int, tshark: str, lua_for: Callable[[str], Path], tmp_path: Path
) -> None:
    """tshark -2 dissects every frame again after the first pass, as the GUI does: TCP then
    hands over reassembled records cut where the first pass found them to end."""
    pcapng = export(FIXTURES / recording, tmp_path / "p.pcapng", "--segment-size", str(segment))
    stream, return_path, undecoded = dissected_counts(tshark, lua_for(FIXTURE_QEMU), pcapng, "-2")
    expected = inspect_json(FIXTURES / recording)
    assert undecoded == []
    assert stream == expected["counts"]
    assert return_path == expected.get("return_path", {}).get("counts", {})


def test_a_stream_on_another_port_is_found_by_its_magic(
    tshark: str, lua_for: Callable[[str], Path], tmp_path: Path
) -> None:
    pcapng = export(FIXTURES / "postcopy-tcp", tmp_path / "p.pcapng", "--port", "5999")
    stream, return_path, _ = dissected_counts(tshark, lua_for(FIXTURE_QEMU), pcapng)
    expected = inspect_json(FIXTURES / "postcopy-tcp")
    assert stream == expected["counts"]
    assert return_path == expected["return_path"]["counts"]


@pytest.mark.parametrize("recording", CAPTURES[:2])
def test_command_fields_equal_qmig_s_decoding(
    recording: str, tshark: str, lua_for: Callable[[str], Path], tmp_path: Path
) -> None:
    """PING values, ADVISE sizes, discard ranges, and PACKAGED's nested commands."""
    pcapng = export(FIXTURES / recording, tmp_path / "p.pcapng")
    rows = run_tshark(
        tshark,
        lua_for(FIXTURE_QEMU),
        pcapng,
        [
            "qmig.cmd",
            "qmig.ping",
            "qmig.discard.block",
            "qmig.discard.start",
            "qmig.discard.length",
            "qmig.advise.page_size_summary",
            "qmig.packaged.length",
        ],
    )
    commands = inspect_json(FIXTURES / recording)["commands"]
    names = {1: "OPEN_RETURN_PATH", 2: "PING", 3: "POSTCOPY_ADVISE", 4: "POSTCOPY_LISTEN"}
    names |= {5: "POSTCOPY_RUN", 6: "POSTCOPY_RAM_DISCARD", 7: "PACKAGED"}
    # -T fields shows a field's value with its value string's name for a uint with one.
    dissected = [value.split(" ")[0] for value in column(rows, 0)]
    assert [names.get(int(n), n) if n.isdigit() else n for n in dissected] == [
        c["name"] for c in commands
    ]
    assert [int(v, 16) for v in column(rows, 1)] == [
        c["value"] for c in commands if c["name"] == "PING"
    ]
    discards = [c for c in commands if c["name"] == "POSTCOPY_RAM_DISCARD"]
    assert column(rows, 2) == [c["block"] for c in discards]
    ranges = [r for c in discards for r in c["ranges"]]
    assert [int(v, 16) for v in column(rows, 3)] == [r["start"] for r in ranges]
    assert [int(v, 16) for v in column(rows, 4)] == [r["length"] for r in ranges]
    advise = [c for c in commands if c["name"] == "POSTCOPY_ADVISE"]
    assert [int(v, 16) for v in column(rows, 5)] == [c["page_size_summary"] for c in advise]
    packaged = [c for c in commands if c["name"] == "PACKAGED"]
    assert [int(v) for v in column(rows, 6)] == [c["length"] for c in packaged]


def test_return_path_fields_equal_qmig_s_decoding(
    tshark: str, lua_for: Callable[[str], Path], tmp_path: Path
) -> None:
    pcapng = export(FIXTURES / "postcopy-tcp", tmp_path / "p.pcapng")
    rows = run_tshark(
        tshark,
        lua_for(FIXTURE_QEMU),
        pcapng,
        ["qmig.rp.message", "qmig.rp.start", "qmig.rp.length", "qmig.rp.block", "qmig.rp.value"],
    )
    document = inspect_json(FIXTURES / "postcopy-tcp")
    requests = document["requests"]
    pongs = [m["value"] for m in document["return_path"]["messages"] if m["name"] == "PONG"]
    assert [int(v, 16) for v in column(rows, 4)] == pongs  # 1, 2, 4, 3: as they came back
    assert [int(v, 16) for v in column(rows, 1)] == [r["start"] for r in requests]
    assert [int(v, 16) for v in column(rows, 2)] == [r["len"] for r in requests]
    ids = [r["block"] for r in requests if r["name"] == "REQ_PAGES_ID"]
    assert column(rows, 3) == ids
    assert column(rows, 0)[-1] == "SHUT"


def test_other_tcp_traffic_on_another_port_is_left_alone(
    tshark: str, lua_for: Callable[[str], Path], tmp_path: Path
) -> None:
    """The heuristic wants the whole header: the magic and the stream version."""
    other = tmp_path / "other.bin"
    other.write_bytes(b"QEVM\x00\x00\x00\x09" + bytes(range(256)) * 64)
    pcapng = export(other, tmp_path / "other.pcapng", "--port", "5999")
    rows = run_tshark(tshark, lua_for(FIXTURE_QEMU), pcapng, ["qmig.record", "tcp.len"])
    assert column(rows, 0) == []
    assert sum(int(v) for v in column(rows, 1)) == 8 + 256 * 64
