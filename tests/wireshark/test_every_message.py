"""Every command, RAM record and return-path message the profiles know, through tshark.

A capture folder is built with qmig's own schemas (one of each message, PACKAGED holding
device state and commands, a MEM_SIZE list with page sizes and region addresses), exported
with `qmig export-pcap`, and dissected with each profile's generated dissector. A profile's
dissector decodes what `qmig inspect` with the same profile decodes, and rejects what it
rejects: QEMU 7.2's dissector knows neither SWITCHOVER_START nor SWITCHOVER_ACK.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from dissecting import column, dissected_counts, export, inspect_json, qmig, run_tshark

from qmig.wire import messages as m
from qmig.wire.schema import Schema, schema_for

BLOCKS = (
    m.RamBlockInfo("pc.ram", 0x200000, page_size=0x200000, mr_addr=0x1000000),
    m.RamBlockInfo("vga.vram", 0x10000, mr_addr=0x2000000),
)


def ram_section(schema: Schema, header: m.SectionStart | m.SectionPart, body: bytes) -> bytes:
    eos = schema.build_ram_flag("EOS")
    return schema.build_section(header) + body + eos + schema.build_footer(header.section_id)


def build_stream(schema: Schema, multifd_flush: bool = True) -> bytes:
    page = schema.target_page_size
    configuration = schema.configuration.build(
        m.Configuration("pc-i440fx-7.2", page.bit_length() - 1, ("x-ignore-shared",), b"u" * 16)
    )
    cmd = schema.build_command
    total = sum(block.used_length for block in BLOCKS)
    precopy = b"".join(
        [
            schema.build_ram_page(m.RamPage("pc.ram", 0, False, bytes(range(256)) * (page // 256))),
            schema.build_ram_page(m.RamPage(None, page, True, b"\0")),
            schema.build_ram_xbzrle(m.RamXbzrle(None, 2 * page, b"\x01\x02\x03")),
            schema.build_ram_flag("MULTIFD_FLUSH") if multifd_flush else b"",
            schema.build_ram_page(m.RamPage("vga.vram", 0, True, b"\x07")),
        ]
    )
    device = (
        schema.build_section(m.SectionFull(9, "timer", 0, 2))
        + bytes(range(40))
        + schema.build_footer(9)
    )
    empty = schema.build_section(m.SectionFull(10, "empty", 0, 1)) + schema.build_footer(10)
    package = cmd(m.PostcopyListen()) + device + empty + cmd(m.Ping(3)) + cmd(m.PostcopyRun())
    return b"".join(
        [
            schema.header.build(m.StreamHeader()),
            configuration,
            cmd(m.OpenReturnPath()),
            cmd(m.Ping(1)),
            cmd(m.PostcopyAdvise(0x201000, page)),
            ram_section(
                schema,
                m.SectionStart(2, "ram", 0, schema.profile.ram_section_version),
                schema.build_mem_size(m.MemSize(total, BLOCKS)),
            ),
            ram_section(schema, m.SectionPart(2), precopy),
            cmd(
                m.PostcopyRamDiscard(
                    "pc.ram", (m.DiscardRange(0, page), m.DiscardRange(8 * page, 3 * page))
                )
            ),
            cmd(m.EnableColo()),
            cmd(m.RecvBitmap("pc.ram")),
            cmd(m.PostcopyResume()),
            cmd(m.SwitchoverStart()),
            schema.build_packaged(package),
            ram_section(schema, m.SectionPart(2), b""),
            schema.section_end.build(m.SectionEnd(2)) + schema.build_ram_flag("EOS"),
            schema.build_footer(2),
            b"\x00",  # EOF
        ]
    )


def build_return_path(schema: Schema) -> bytes:
    return b"".join(
        schema.build_rp(message)
        for message in [
            m.Pong(1),
            m.ReqPagesId(0x3000, 0x1000, "pc.ram"),
            m.ReqPages(0x5000, 0x2000),
            m.RpRecvBitmap("pc.ram", b"\xff" * 8),
            m.ResumeAck(1),
            m.SwitchoverAck(),
            m.Shut(0),
        ]
    )


def write_capture(folder: Path, multifd_flush: bool = True) -> Path:
    """A capture folder holding the messages, as `qmig capture` writes one."""
    schema = schema_for("10.0")
    stream, return_path = build_stream(schema, multifd_flush), build_return_path(schema)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "stream.bin").write_bytes(stream)
    (folder / "return-path.bin").write_bytes(return_path)
    half = len(stream) // 2
    (folder / "index.tsv").write_text(
        "direction\toffset\tlength\tt_ns\n"
        f"stream\t0\t{half}\t1000\n"
        f"return-path\t0\t{len(return_path)}\t2000\n"
        f"stream\t{half}\t{len(stream) - half}\t3000\n"
    )
    (folder / "meta.json").write_text(json.dumps({"started_unix": 1_700_000_000.0}))
    return folder


@pytest.fixture(scope="module")
def capture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_capture(tmp_path_factory.mktemp("every-message"))


def test_the_newest_profile_s_dissector_decodes_every_message(
    capture: Path, tshark: str, lua_for: Callable[[str], Path], tmp_path: Path
) -> None:
    pcapng = export(capture, tmp_path / "all.pcapng", "--segment-size", "1000")
    stream, return_path, undecoded = dissected_counts(tshark, lua_for("10.0"), pcapng)
    expected = inspect_json(capture, "10.0")
    assert undecoded == []
    assert stream == expected["counts"]
    assert return_path == expected["return_path"]["counts"]
    assert set(return_path) == set(schema_for("10.0").profile.rp_messages)
    assert set(schema_for("10.0").profile.commands) <= set(stream)
    rows = run_tshark(
        tshark,
        lua_for("10.0"),
        pcapng,
        ["qmig.mem_size.page_size", "qmig.mem_size.mr_addr", "qmig.ram.kind", "qmig.depth"],
    )
    assert [int(v, 16) for v in column(rows, 0)] == [0x200000]
    assert [int(v, 16) for v in column(rows, 1)] == [0x1000000, 0x2000000]
    assert column(rows, 2) == ["PAGE", "ZERO", "XBZRLE", "ZERO"]
    assert len(column(rows, 3)) == 9  # LISTEN, two devices' three records each, PING, RUN


@pytest.mark.parametrize(
    ("multifd_flush", "first_unknown"),
    [
        (True, "RAM: unknown combination of migration flags 0x200"),
        (False, "unknown command: MIG_CMD 0xb (len 0x0)"),
    ],
)
def test_an_older_profile_s_dissector_rejects_what_its_qemu_did_not_send(
    multifd_flush: bool,
    first_unknown: str,
    tshark: str,
    lua_for: Callable[[str], Path],
    tmp_path: Path,
) -> None:
    """QEMU 7.2 had no MULTIFD_FLUSH flag, no SWITCHOVER_START, no SWITCHOVER_ACK."""
    capture = write_capture(tmp_path / "capture", multifd_flush)
    pcapng = export(capture, tmp_path / "all.pcapng")
    rows = run_tshark(
        tshark, lua_for("7.2"), pcapng, ["qmig.record", "qmig.rp.message", "_ws.expert.message"]
    )
    experts = column(rows, 2)
    assert first_unknown in experts
    assert "received invalid message 0x0007 length 0x0000" in experts
    assert "SWITCHOVER_START" not in column(rows, 0)
    assert column(rows, 1) == ["PONG", "REQ_PAGES_ID", "REQ_PAGES", "RECV_BITMAP", "RESUME_ACK"]
    # qmig's own reader, with the same profile, stops at the same record.
    result = qmig("inspect", str(capture / "stream.bin"), "--qemu-version", "7.2")
    assert result.returncode == 1
    assert first_unknown in result.stderr
