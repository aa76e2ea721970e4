"""libvirt save images around a real QEMU 7.2 stream: every format libvirt writes, both byte
orders, version 1, partial and broken images.

The inner stream is the precopy fixture (a 32 MiB guest); an image's RAM, as ``qmig inspect
--dump-ram`` extracts it, must equal the bare stream's byte for byte.
"""

from __future__ import annotations

import json
import lzma
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from libvirt_images import COOKIE, DOMAIN_XML, build_image, compress, header

from qmig.cli import main
from qmig.libvirt.image import read_image
from qmig.libvirt.layout import header_size, load_layout
from qmig.libvirt.streams import open_stream

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "precopy-file" / "stream.bin.xz"
COMPRESSIONS = ["raw", "gzip", "bzip2", "xz", "zstd", "lzop"]


@pytest.fixture(scope="module")
def stream() -> bytes:
    return lzma.decompress(FIXTURE.read_bytes())


@pytest.fixture(scope="module")
def plain(stream: bytes, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    """The bare stream's inspection and RAM, to compare every image with."""
    folder = tmp_path_factory.mktemp("plain")
    path = folder / "stream.bin"
    path.write_bytes(stream)
    return inspect_json(path, folder / "ram"), folder / "ram"


def inspect_json(path: Path, dump: Path | None = None) -> dict[str, Any]:
    import contextlib
    import io

    out = io.StringIO()
    extra = [] if dump is None else ["--dump-ram", str(dump)]
    with contextlib.redirect_stdout(out):
        assert main(["inspect", str(path), "--json", "--qemu-version", "7.2", *extra]) == 0
    return json.loads(out.getvalue())  # type: ignore[no-any-return]


def same_ram(left: Path, right: Path) -> None:
    names = sorted(p.name for p in left.glob("*.bin"))
    assert names == sorted(p.name for p in right.glob("*.bin")) and "pc.ram.bin" in names
    for name in names:
        assert (left / name).read_bytes() == (right / name).read_bytes(), name


def fails(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert main(list(argv)) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qmig: error: "), lines
    return lines[0]


@pytest.mark.parametrize("name", COMPRESSIONS)
def test_each_format_holds_the_streams_ram(
    name: str, stream: bytes, plain: tuple[dict[str, Any], Path], tmp_path: Path
) -> None:
    image = tmp_path / f"{name}.save"
    image.write_bytes(build_image(stream, name))
    report = inspect_json(image, tmp_path / "ram")
    expected, expected_ram = plain
    assert report["bytes"] == expected["bytes"] == len(stream)
    assert report["ram_blocks"] == expected["ram_blocks"]
    same_ram(tmp_path / "ram", expected_ram)
    libvirt = report["libvirt"]
    assert libvirt["format"] == libvirt["compression"] == name
    assert libvirt["format_number"] == load_layout().format_number(name)
    assert libvirt["complete"] and libvirt["was_running"] and libvirt["version"] == 2
    xml_len = len(DOMAIN_XML) + 1
    assert libvirt["cookie_offset"] == xml_len
    assert libvirt["data_len"] == xml_len + len(COOKIE) + 1 + 65536
    assert libvirt["stream_offset"] == header_size() + libvirt["data_len"]
    assert libvirt["domain"] == {
        "name": "built",
        "uuid": "6f1c0b52-6a0e-4d37-9f52-2b2ef1b8b0a1",
        "domain_type": "qemu",
        "machine_type": "pc-i440fx-7.2",
        "arch": "x86_64",
        "memory_bytes": 32 << 20,
        "vcpus": 1,
    }


def test_header_is_libvirts_92_bytes() -> None:
    # 16-byte magic, then version, data_len, was_running, format, cookieOffset and 14 unused
    # uint32 words.
    assert header_size() == 16 + 4 * (5 + 14) == 92
    built = header({"data_len": 0x10203, "format": 3, "cookie_offset": 7})
    assert built[:16] == b"LibvirtQemudSave"
    assert built[16:36] == bytes.fromhex("02000000 03020100 01000000 03000000 07000000")
    assert built[36:] == bytes(56)


def test_listing_shows_header_and_domain(
    stream: bytes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = tmp_path / "xz.save"
    image.write_bytes(build_image(stream, "xz"))
    assert main(["inspect", str(image), "--qemu-version", "7.2"]) == 0
    out = capsys.readouterr().out
    assert "libvirt save image" in out and "format 3 xz" in out
    assert "machine pc-i440fx-7.2 (x86_64), memory 32 MiB" in out
    assert "CONFIGURATION" in out and "machine pc-i440fx-7.2" in out


def test_other_byte_order_and_version_1(
    stream: bytes, plain: tuple[dict[str, Any], Path], tmp_path: Path
) -> None:
    swapped = tmp_path / "big.save"
    swapped.write_bytes(build_image(stream, "gzip", byte_order="big"))
    report = inspect_json(swapped, tmp_path / "big")
    assert report["libvirt"]["byte_order"] == "big" and report["libvirt"]["compression"] == "gzip"
    same_ram(tmp_path / "big", plain[1])
    # Version 1 predates compression: libvirt reads its stream raw whatever the format word.
    old = tmp_path / "v1.save"
    image = bytearray(build_image(stream, "raw", version=1))
    image[28:32] = (3).to_bytes(4, "little")
    old.write_bytes(image)
    report = inspect_json(old, tmp_path / "v1")
    assert report["libvirt"]["format"] == "xz" and report["libvirt"]["compression"] == "raw"
    same_ram(tmp_path / "v1", plain[1])


def test_partial_image_warns_and_reads_on(
    stream: bytes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = tmp_path / "partial.save"
    image.write_bytes(build_image(stream, "raw", magic=load_layout().partial_magic))
    report = inspect_json(image)
    assert report["libvirt"]["complete"] is False
    assert "partial magic: the save never finished" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("field", "value", "message", "offset"),
    [
        ("version", 3, "version 3 is newer than 2", 16),
        ("format", 9, "unknown format 9 (known: 0 raw, 1 gzip", 28),
        ("data_len", 0, "data length 0", 20),
        ("cookie_offset", 1 << 20, "cookie offset 1048576 past the data's", 32),
    ],
)
def test_bad_header_fields(
    field: str, value: int, message: str, offset: int, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    image = tmp_path / "bad.save"
    good = {"data_len": 64, "format": 0}
    # Version 3 would read as the other byte order: only the swapped word stays above 2.
    byte_order = "big" if field == "version" else "little"
    image.write_bytes(header({**good, field: value}, byte_order) + bytes(64))
    line = fails(capsys, "inspect", str(image))
    assert message in line and line.endswith(f"at byte {offset}"), line


def test_truncated_xml_and_bad_xml(
    stream: bytes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = tmp_path / "cut.save"
    image.write_bytes(build_image(stream, "raw")[:2000])
    line = fails(capsys, "inspect", str(image))
    assert "unexpected end of stream during the domain XML" in line
    assert line.endswith("at byte 2000")
    image.write_bytes(build_image(b"", "raw", xml="<domain><name>x</domain>", cookie=None))
    assert "domain XML does not parse" in fails(capsys, "inspect", str(image))


def test_stream_errors_name_the_file_byte(
    stream: bytes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A raw image's stream error is placed in the image; a compressed one's is said so."""
    cut = len(stream) // 2
    bare = tmp_path / "cut.bin"
    bare.write_bytes(stream[:cut])
    bare_line = fails(capsys, "inspect", str(bare), "--qemu-version", "7.2")
    bare_offset = int(bare_line.rsplit(" ", 1)[1])
    raw = tmp_path / "cut.save"
    raw.write_bytes(build_image(stream[:cut], "raw"))
    line = fails(capsys, "inspect", str(raw), "--qemu-version", "7.2")
    stream_offset = read_image(raw).stream_offset
    assert line.endswith(f"at byte {bare_offset + stream_offset}"), (line, bare_line)
    packed = tmp_path / "cut-xz.save"
    packed.write_bytes(build_image(stream[:cut], "xz"))
    line = fails(capsys, "inspect", str(packed), "--qemu-version", "7.2")
    assert line.endswith(f"(of the xz-decompressed QEMU stream) at byte {bare_offset}"), line


@pytest.mark.parametrize("name", ["gzip", "bzip2", "xz", "zstd", "lzop"])
def test_damaged_compressed_data(
    name: str, stream: bytes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = bytearray(build_image(stream, name))
    start = read_image_bytes(tmp_path, bytes(image)).stream_offset
    middle = start + (len(image) - start) // 2
    image[middle : middle + 64] = bytes(64)
    path = tmp_path / "damaged.save"
    path.write_bytes(image)
    line = fails(capsys, "inspect", str(path), "--qemu-version", "7.2")
    assert f"qmig: error: {name} data:" in line or "decompressed QEMU stream" in line, line
    # Cut short: the compressed stream ends before its end marker.
    path.write_bytes(image[: start + (len(image) - start) // 3])
    line = fails(capsys, "inspect", str(path), "--qemu-version", "7.2")
    assert f"{name} data" in line or "decompressed QEMU stream" in line, line


def read_image_bytes(tmp_path: Path, data: bytes) -> Any:
    path = tmp_path / "probe.save"
    path.write_bytes(data)
    return read_image(path)


def test_sparse_is_recognised_not_decoded(
    stream: bytes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = tmp_path / "sparse.save"
    image.write_bytes(build_image(stream, "sparse"))
    assert main(["inspect", str(image)]) == 0
    out = capsys.readouterr().out
    assert "format 6 sparse" in out
    assert "stream not decoded" in out and "mapped-ram" in out
    report = inspect_json(image)
    assert report["libvirt"]["format"] == "sparse" and report["stream_decoded"] is False
    line = fails(capsys, "inspect", str(image), "--dump-ram", str(tmp_path / "ram"))
    assert "qmig does not read mapped-ram streams yet" in line
    line = fails(capsys, "replay", str(image), "--connect", "tcp:127.0.0.1:9")
    assert "qmig does not read mapped-ram streams yet" in line


def test_decompression_streams_in_bounded_memory(tmp_path: Path) -> None:
    """A 96 MiB stream comes out of an xz image without Python ever holding much of it."""
    size = 96 << 20
    image = tmp_path / "big.save"
    block = bytes(range(256)) * 4096  # 1 MiB
    image.write_bytes(build_image(b"", "xz")[: -len(compress(b"", "xz"))])
    with image.open("ab") as file:
        file.write(compress(block * (size // len(block)), "xz"))
    tracemalloc.start()
    try:
        total = 0
        with open_stream(read_image(image)) as inner:
            while chunk := inner.read(1 << 20):
                total += len(chunk)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert total == size
    assert peak < 16 << 20, peak


def test_the_documented_real_header() -> None:
    """formats/libvirt-save.md's example (a libvirt 9.0 header) is what the Struct builds."""
    import re

    doc = (Path(__file__).resolve().parents[2] / "formats" / "libvirt-save.md").read_text()
    words = {
        int(offset, 16): bytes.fromhex(hexes.replace(" ", ""))
        for offset, hexes in re.findall(r"^(00[0-9a-f]{2}): ((?:[0-9a-f]{8} ?)+)", doc, re.M)
    }
    built = header({"data_len": 67224, "format": 3, "cookie_offset": 1452, "was_running": 0})
    assert set(words) == {0x00, 0x10, 0x20, 0x5C}
    for offset in (0x00, 0x10, 0x20):
        assert built[offset : offset + len(words[offset])] == words[offset], hex(offset)
    assert words[0x5C] == b"<domain "
