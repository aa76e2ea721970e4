"""qmig's reader and destination machine on streams that real QEMU 7.2 sent.

The fixtures (``fixtures/*/``) were recorded from real QEMU by ``scripts/make_fixtures.py``;
each ``meta.json`` holds the source's own final ``query-migrate``, so the counts here are
checked against what QEMU says it sent, not against qmig.
"""

from __future__ import annotations

import json
import lzma
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from qmig.inspect import ReturnPathInspection, StreamInspection
from qmig.protocol import events as ev
from qmig.protocol.destination import Destination
from qmig.protocol.states import PostcopyState
from qmig.wire import messages as m
from qmig.wire.reader import END, NEED_DATA, ReturnPathReader, StreamReader

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
CAPTURES = ("precopy-file", "postcopy-tcp", "postcopy-sparse")
POSTCOPY = ("postcopy-tcp", "postcopy-sparse")


@cache
def fixture(name: str) -> tuple[dict[str, Any], bytes, bytes]:
    folder = FIXTURES / name
    meta = json.loads((folder / "meta.json").read_text())
    stream = lzma.decompress((folder / "stream.bin.xz").read_bytes())
    rp_path = folder / "return-path.bin.xz"
    return_path = lzma.decompress(rp_path.read_bytes()) if rp_path.exists() else b""
    return meta, stream, return_path


def inspect(stream: bytes, chunk: int = 1 << 20) -> StreamInspection:
    inspection = StreamInspection(StreamReader("7.2"))
    reader = inspection.reader
    for start in range(0, len(stream), chunk):
        reader.feed(stream[start : start + chunk])
        while (record := reader.next_record()) is not NEED_DATA:
            inspection.add(record)  # type: ignore[arg-type]
    reader.feed_eof()
    while (record := reader.next_record()) is not END:
        inspection.add(record)  # type: ignore[arg-type]
    return inspection


@pytest.mark.parametrize("name", CAPTURES)
def test_every_byte_is_accounted_for_and_pages_match_what_qemu_sent(name: str) -> None:
    meta, stream, _ = fixture(name)
    figures = inspect(stream).as_json()
    assert figures["bytes"] == len(stream) == meta["files"]["stream.bin"]["bytes"]
    ram = meta["source_query_migrate"]["ram"]
    zero_records = sum(block["zero_records"] for block in figures["ram_blocks"].values())
    # QEMU counts a page sent whole as "normal" and a same-byte page as "duplicate".
    assert figures["counts"]["RAM"] == ram["normal"] + ram["duplicate"]
    assert zero_records == ram["duplicate"]
    blocks = figures["ram_blocks"]
    assert sum(block["used_length"] for block in blocks.values()) == ram["total"]
    assert blocks["pc.ram"]["distinct_pages"] == blocks["pc.ram"]["used_length"] // 4096


@pytest.mark.parametrize("name", POSTCOPY)
def test_postcopy_captures_have_qemu_7_2s_shape(name: str) -> None:
    meta, stream, return_path = fixture(name)
    counts = inspect(stream).as_json()["counts"]
    assert counts["POSTCOPY_RAM_DISCARD"] == meta["observed"]["postcopy_ram_discard_commands"]
    assert counts["PING"] == 4
    assert counts["PACKAGED"] == counts["POSTCOPY_LISTEN"] == counts["POSTCOPY_RUN"] == 1
    # One device section per non-iterable device of a pc machine, all inside the package.
    assert counts["SECTION_FULL"] == counts["DEVICE_STATE"] == 31
    assert counts["EOF"] == 1 and "VMDESCRIPTION" not in counts
    rp = ReturnPathInspection()
    reader = ReturnPathReader("7.2")
    reader.feed(return_path)
    reader.feed_eof()
    for record in reader:
        rp.add(record)
    assert rp.bytes == len(return_path)
    requests = rp.counts["REQ_PAGES"] + rp.counts["REQ_PAGES_ID"]
    assert requests == meta["source_query_migrate"]["ram"]["postcopy-requests"] > 0
    assert (rp.counts["PONG"], rp.counts["SHUT"]) == (4, 1)


def test_the_precopy_file_decodes_every_device_with_its_vmdescription() -> None:
    _, stream, _ = fixture("precopy-file")
    reader = StreamReader("7.2")
    reader.feed(stream)
    reader.feed_eof()
    devices = [r.message for r in reader if isinstance(r.message, m.DeviceState)]
    assert len(devices) >= 30
    assert all(device.decoded is not None for device in devices)
    cpu = next(device for device in devices if device.idstr == "cpu")
    assert cpu.decoded is not None
    # The guest was running qmig's boot sector (loaded at 0x7c00) when it was saved.
    assert 0x7C00 <= cpu.decoded["env.eip"] < 0x7E00


@pytest.mark.parametrize("name", POSTCOPY)
def test_the_destination_machine_consumes_a_real_qemu_source(name: str, tmp_path: Path) -> None:
    """Fed the real stream, the machine passes QEMU's rules, answers the same PONGs, and its
    RAM ends equal to the capture's final page contents."""
    _, stream, return_path = fixture(name)
    dest = Destination("7.2")
    memory: dict[str, bytearray] = {}
    states = []
    for start in range(0, len(stream) + 1, 1 << 20):
        if start < len(stream):
            dest.receive_data(stream[start : start + (1 << 20)])
        else:
            dest.receive_eof()
        while (event := dest.next_event()) is not NEED_DATA and event is not END:
            states.append(dest.state)
            match event:
                case ev.RamBlocksAnnounced(blocks=blocks):
                    memory = {b.idstr: bytearray(b.used_length) for b in blocks}
                case ev.RangesDiscarded(block=block, ranges=ranges):
                    for span in ranges:
                        memory[block][span.start : span.start + span.length] = bytes(span.length)
                case ev.PagesReceived(run=run):
                    for offset, zero, body in run.pages():
                        page = body * 4096 if zero else body
                        memory[run.block][offset : offset + 4096] = page
    assert dest.state is PostcopyState.END
    assert PostcopyState.DISCARD in states and PostcopyState.RUNNING in states
    # The PONGs qmig sends answer the same PINGs QEMU's destination answered.
    rp = ReturnPathReader("7.2")
    rp.feed(dest.data_to_send())
    rp.feed_eof()
    ours = [r.message for r in rp]
    theirs = ReturnPathReader("7.2")
    theirs.feed(return_path)
    theirs.feed_eof()
    qemu_pongs = sorted(r.message.value for r in theirs if isinstance(r.message, m.Pong))
    assert sorted(msg.value for msg in ours if isinstance(msg, m.Pong)) == qemu_pongs
    assert ours[-1] == m.Shut(0)
    # The machine's RAM equals what inspect --extract writes for the same stream.
    inspection = StreamInspection(StreamReader("7.2"), tmp_path)
    inspection.reader.feed(stream)
    inspection.reader.feed_eof()
    for record in inspection.reader:
        inspection.add(record)
    inspection.close()
    written = sorted(path.name for path in tmp_path.glob("*.bin"))
    assert written == sorted(idstr.replace("/", "_") + ".bin" for idstr in memory)
    for idstr, contents in memory.items():
        extracted = (tmp_path / (idstr.replace("/", "_") + ".bin")).read_bytes()
        assert extracted == contents, idstr
    assert any(memory["pc.ram"][0x100000:0x2800000])
