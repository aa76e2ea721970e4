"""``qmig inspect`` and the replay loader on mapped-ram files and bare multifd channels built by
qmig's writers: every block from its bitmap, every channel byte in a packet, one error line for
each hostile field."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qmig import strategies as qs
from qmig.cli import main
from qmig.mapped_ram.file import MappedRamFile
from qmig.mapped_ram.writer import BlockContent, build_mapped_ram_file
from qmig.replay import load_recording
from qmig.wire.multifd import MultifdInit, MultifdPacketHeader, multifd_schema

PAGE = 4096
BLOCKS = [
    BlockContent("pc.ram", 64 * PAGE, {0: b"a" * PAGE, 5: b"b" * PAGE, 6: b"c" * PAGE}),
    BlockContent("/rom@etc/acpi/rsdp", 4 * PAGE, {3: b"d" * PAGE}),
]


def inspect_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    assert main(["inspect", "--json", *args]) == 0
    document: dict[str, Any] = json.loads(capsys.readouterr().out)
    return document


def one_error_line(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert main(["inspect", *args]) == 1
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and error.startswith("qmig: error: ")
    return error


@pytest.fixture
def mapped(tmp_path: Path) -> Path:
    path = tmp_path / "saved.mr"
    path.write_bytes(build_mapped_ram_file("10.0", BLOCKS))
    return path


def test_inspect_and_dump_a_mapped_ram_file(
    mapped: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dump = tmp_path / "dump"
    report = inspect_json(capsys, str(mapped), "--dump-ram", str(dump))
    blocks = report["mapped_ram"]["blocks"]
    assert [(b["block"], b["pages"], b["pages_present"], b["zero_pages"]) for b in blocks] == [
        ("pc.ram", 64, 3, 61),
        ("/rom@etc/acpi/rsdp", 4, 1, 3),
    ]
    assert report["counts"]["MEM_SIZE"] == 1 and report["counts"]["EOF"] == 1
    ram = (dump / "pc.ram.bin").read_bytes()
    assert ram == b"a" * PAGE + bytes(4 * PAGE) + b"b" * PAGE + b"c" * PAGE + bytes(57 * PAGE)
    assert (dump / "_rom@etc_acpi_rsdp.bin").read_bytes() == bytes(3 * PAGE) + b"d" * PAGE
    assert os.stat(dump / "pc.ram.bin").st_blocks * 512 < 64 * PAGE, "absent pages are holes"


def test_mapped_ram_recording(mapped: Path) -> None:
    recording = load_recording(mapped, "10.0")
    try:
        ram = next(b for b in recording.blocks if b.idstr == "pc.ram").memory
        assert ram[5 * PAGE : 7 * PAGE] == b"b" * PAGE + b"c" * PAGE
        assert recording.pages == 4
        # the replay sends page records: the capability no longer holds
        assert recording.configuration.capabilities is None
    finally:
        recording.close()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mapped_ram_round_trip(data: st.DataObject) -> None:
    pages = data.draw(st.integers(1, 200))
    present = data.draw(st.sets(st.integers(0, pages - 1), max_size=20))
    contents = {index: bytes([index % 255 + 1]) * PAGE for index in present}
    raw = build_mapped_ram_file("10.0", [BlockContent("pc.ram", pages * PAGE, contents)])
    import tempfile

    with tempfile.NamedTemporaryFile() as file:
        file.write(raw)
        file.flush()
        with MappedRamFile(Path(file.name), "10.0") as parsed:
            (block,) = parsed.blocks
            found = {
                index: chunk
                for first, count in parsed.page_runs(block)
                for index, chunk in zip(
                    range(first, first + count),
                    (
                        c[i : i + PAGE]
                        for c in parsed.read_pages(block, first, count)
                        for i in range(0, len(c), PAGE)
                    ),
                    strict=True,
                )
            }
            assert found == contents
            assert parsed.stream().read(8) == raw[:8]


def test_hostile_mapped_ram_files(
    mapped: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = mapped.read_bytes()
    with MappedRamFile(mapped, "10.0") as parsed:
        first = parsed.blocks[0]
        mem_size_at = parsed.mem_size_offset
    broken = tmp_path / "broken.mr"

    def error_for(at: int, value: bytes, size: int | None = None) -> str:
        bad = bytearray(data[:size] if size is not None else data)
        bad[at : at + len(value)] = value
        broken.write_bytes(bad)
        return one_error_line(capsys, str(broken))

    # the first block claims more than the MEM_SIZE total
    used_at = first.entry_offset + 1 + len("pc.ram")
    line = error_for(used_at, (1 << 40).to_bytes(8, "big"))
    assert "overruns the total" in line and line.endswith(f"at byte {used_at}")
    # the bitmap and pages of a block outside the file
    line = error_for(first.header_offset + 12, (1 << 50).to_bytes(8, "big"))
    assert "bitmap_offset" in line and line.endswith(f"at byte {first.header_offset + 12}")
    line = error_for(first.header_offset + 20, len(data).to_bytes(8, "big"))
    assert "pages_offset" in line and line.endswith(f"at byte {first.header_offset + 20}")
    # a newer header version
    line = error_for(first.header_offset, (2).to_bytes(4, "big"))
    assert "version: 2 is newer" in line
    # the MEM_SIZE total claims more blocks than the file holds
    line = error_for(mem_size_at, ((1 << 50) | 4).to_bytes(8, "big"))
    assert "MEM_SIZE" in line
    # a file cut inside its stream part: the error is at the file's offset
    line = error_for(0, b"", len(data) - 3)
    at = int(line.rsplit(" ", 1)[1])
    assert first.header_offset < at < len(data) - 3, line


def channel_bytes() -> bytes:
    schema = multifd_schema("10.0")
    header = MultifdPacketHeader(0, 128, 1, PAGE, 7, 2, "pc.ram")
    sync = MultifdPacketHeader(1, 0, 0, 0, 8, 0, "")
    return (
        schema.build_init(MultifdInit(bytes(16), 0))
        + schema.build_packet(header, [0, PAGE, 2 * PAGE])
        + b"p" * PAGE
        + schema.build_packet(sync, [])
    )


def test_inspect_a_multifd_channel(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "channel.bin"
    path.write_bytes(channel_bytes())
    report = inspect_json(capsys, str(path))
    assert report["handshake"] == {"uuid": "00" * 16, "channel": 0}
    assert (report["packets"][0]["normal_pages"], report["packets"][0]["zero_pages"]) == (1, 2)
    assert report["syncs"] == 1 and report["normal_pages"] == 1 and report["zero_pages"] == 2
    assert 64 + sum(p["size"] for p in report["packets"]) == report["bytes"] == path.stat().st_size
    assert main(["inspect", str(path)]) == 0
    listing = capsys.readouterr().out
    assert "MULTIFD_INIT" in listing and "SYNC" in listing


@settings(max_examples=20, deadline=None)
@given(qs.multifd_channels("10.0"))
def test_inspect_any_channel(channel: qs.MultifdChannel) -> None:
    import contextlib
    import io
    import tempfile

    with tempfile.NamedTemporaryFile() as file:
        file.write(channel.data)
        file.flush()
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(["inspect", "--json", file.name]) == 0
    report = json.loads(out.getvalue())
    assert len(report["packets"]) == len(channel.packets)
    assert report["bytes"] == len(channel.data)


def test_hostile_channels(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = channel_bytes()
    path = tmp_path / "channel.bin"
    path.write_bytes(data[:-5])
    assert "MULTIFD_PACKET" in one_error_line(capsys, str(path))
    bad = bytearray(data)
    bad[64 + 16 : 64 + 20] = (1000).to_bytes(4, "big")  # normal_pages
    path.write_bytes(bad)
    line = one_error_line(capsys, str(path))
    assert "normal_pages: 1000" in line and line.endswith(f"at byte {64 + 16}")


def test_a_huge_sparse_block_is_read_in_bounded_memory(tmp_path: Path) -> None:
    """A 64 GiB block with three pages present: its 2 MiB bitmap is read in pieces, its pages
    copied in chunks, its image left sparse; the inspecting process stays small."""
    import subprocess
    import sys

    from qmig.wire.mapped_ram import MappedRamHeader, mapped_ram_schema

    small = tmp_path / "small.mr"
    small.write_bytes(build_mapped_ram_file("10.0", [BlockContent("pc.ram", PAGE)]))
    with MappedRamFile(small, "10.0") as parsed:
        mem_size_at = parsed.mem_size_offset
        tail_at = parsed.blocks[0].layout.stream_resumes_at
    data = small.read_bytes()
    used = 64 << 30
    layout = mapped_ram_schema("10.0")
    entry = bytes([6]) + b"pc.ram" + used.to_bytes(8, "big")
    bitmap_offset = mem_size_at + 8 + len(entry) + layout.header_size
    size = layout.bitmap_size(used, PAGE)
    pages_offset = layout.pages_offset_for(bitmap_offset, size)
    present = {0: b"x" * PAGE, 12345: b"y" * PAGE, used // PAGE - 1: b"z" * PAGE}
    path = tmp_path / "huge.mr"
    with path.open("wb") as file:
        file.write(data[:mem_size_at] + (used | 4).to_bytes(8, "big") + entry)
        file.write(layout.build_header(MappedRamHeader(1, PAGE, bitmap_offset, pages_offset)))
        for index, content in present.items():
            word = index // 64 * 8
            file.seek(bitmap_offset + word)
            file.write((1 << index % 64).to_bytes(8, "little"))
            file.seek(pages_offset + index * PAGE)
            file.write(content)
        file.seek(pages_offset + used)
        file.write(data[tail_at:])
    dump = tmp_path / "dump"
    # The process reports its own peak, VmHWM: its address space's high-water mark, which
    # starts afresh at exec (ru_maxrss would carry over the forking test process's).
    program = (
        "import re, sys\nfrom qmig.cli import main\ncode = main(sys.argv[1:])\n"
        "status = open('/proc/self/status').read()\n"
        "print('peak', re.search(r'VmHWM:\\s+(\\d+)', status)[1], file=sys.stderr)\n"
        "sys.exit(code)"
    )
    result = subprocess.run(
        [sys.executable, "-c", program, "inspect", "--json", str(path), "--dump-ram", str(dump)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    peak_kib = int(result.stderr.split("peak ")[1].split()[0])
    assert peak_kib < 100 << 10, f"{peak_kib} KiB for a 64 GiB block"
    (block,) = json.loads(result.stdout)["mapped_ram"]["blocks"]
    assert (block["pages_present"], block["pages_written"]) == (3, 3)
    image = dump / "pc.ram.bin"
    assert image.stat().st_size == used and image.stat().st_blocks * 512 < 1 << 20
    with image.open("rb") as file:
        file.seek(12345 * PAGE)
        assert file.read(PAGE) == b"y" * PAGE


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(qs.mapped_ram_files("10.0"))
def test_any_mapped_ram_file_extracts_its_pages(file: qs.MappedRamFileBytes) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "saved.mr"
        path.write_bytes(file.data)
        with MappedRamFile(path, "10.0") as parsed:
            assert [b.layout.name for b in parsed.blocks] == [b.name for b in file.blocks]
            for block, content in zip(parsed.blocks, file.blocks, strict=True):
                target = Path(folder) / "block.bin"
                assert parsed.dump(block, target) == len(content.pages)
                image = target.read_bytes()
                for index in range(block.layout.pages):
                    expected = content.pages.get(index, bytes(PAGE))
                    assert image[index * PAGE : (index + 1) * PAGE] == expected
