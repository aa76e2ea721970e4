"""The stored real-QEMU fixtures are intact and say what their meta.json claims."""

from __future__ import annotations

import hashlib
import json
import lzma
from pathlib import Path
from typing import Any

import pytest

from qmig.capture import read_capture
from qmig.inspect import count_return_path, find_discard_commands
from qmig.qemu.guest import known_data

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
OURS = ("precopy-file", "precopy-known", "postcopy-tcp", "postcopy-sparse")


def load(name: str) -> tuple[dict[str, Any], dict[str, bytes]]:
    folder = FIXTURES / name
    meta = json.loads((folder / "meta.json").read_text())
    files = {file: lzma.decompress((folder / f"{file}.xz").read_bytes()) for file in meta["files"]}
    return meta, files


@pytest.mark.parametrize("name", OURS)
def test_files_match_their_recorded_size_and_hash(name: str) -> None:
    meta, files = load(name)
    for file, info in meta["files"].items():
        assert len(files[file]) == info["bytes"], file
        assert hashlib.sha256(files[file]).hexdigest() == info["sha256"], file
    assert meta["qemu_version"].startswith("QEMU emulator version 7.2")
    assert files["stream.bin"].startswith(b"QEVM\x00\x00\x00\x03")


@pytest.mark.parametrize("name", ["postcopy-tcp", "postcopy-sparse"])
def test_postcopy_captures_hold_discards_and_page_requests(name: str, tmp_path: Path) -> None:
    meta, files = load(name)
    for file, data in files.items():
        (tmp_path / file).write_bytes(data)
    (tmp_path / "meta.json").write_text(json.dumps(meta["capture_meta"]))
    capture = read_capture(tmp_path)  # the index tiles both files
    counts = count_return_path(capture.return_path)  # splits exactly at message boundaries
    requests = counts["REQ_PAGES"] + counts["REQ_PAGES_ID"]
    assert requests == meta["source_query_migrate"]["ram"]["postcopy-requests"] > 0
    assert counts["PONG"] == 4 and counts["SHUT"] == 1
    discards = find_discard_commands(capture.stream)
    assert len(discards) == meta["observed"]["postcopy_ram_discard_commands"] > 0
    assert all(len(d.ranges) <= 12 for d in discards)


def test_sparse_capture_splits_pc_ram_discards_into_commands_of_twelve() -> None:
    _, files = load("postcopy-sparse")
    discards = [d for d in find_discard_commands(files["stream.bin"]) if d.block == "pc.ram"]
    assert len(discards) > 1
    assert all(len(d.ranges) == 12 for d in discards[:-1])
    assert all(length == 4096 for d in discards for _, length in d.ranges)


def test_known_data_fixture_carries_every_known_page_as_a_page_record() -> None:
    meta, files = load("precopy-known")
    known = meta["known_data"]
    data = known_data(known["size"], seed=known["seed"])
    assert hashlib.sha256(data).hexdigest() == known["sha256"]
    stream = files["stream.bin"]
    for offset in range(0, len(data), 4096):
        at = stream.find(data[offset : offset + 4096])
        header = int.from_bytes(stream[at - 8 : at], "big")
        assert header & ~0xFFF == known["address"] + offset  # pc.ram offset = guest address
        assert header & 0x08, "a RAM_SAVE_FLAG_PAGE record"
