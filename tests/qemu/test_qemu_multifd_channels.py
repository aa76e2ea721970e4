"""Multifd channels as real QEMU sends them (7.2 and 10.0, two channels, TCP): each connection is
recorded by a plain listener in the test, and every multifd channel must read to its end with
qmig's channel reader, its pages (decompressed where zlib or zstd) equal to the source's
memory. (Receiving, replaying and capturing several connections belong to the runners, not
tested here.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from keeper import Keeper
from qemu_helpers import MachineFactory, need

from qmig.qemu.guest import MIB, GuestSpec
from qmig.wire import messages as m
from qmig.wire.multifd_reader import Handshake, MultifdChannelReader, Packet
from qmig.wire.reader import StreamReader

MEMORY_MIB = 32
SPEC = GuestSpec(end=8 * MIB)
PAGE = 4096
MAGIC = (0x11223344).to_bytes(4, "big")


@pytest.mark.qemu
@pytest.mark.parametrize(
    ("version", "compression"),
    [("7.2", "none"), ("7.2", "zlib"), ("10.0", "none"), ("10.0", "zstd")],
)
def test_real_multifd_channels_read_to_their_end(
    machines: MachineFactory, tmp_path: Path, version: str, compression: str
) -> None:
    qemu_version = need(version)
    keeper = Keeper()
    source = machines("source", memory_mib=MEMORY_MIB, guest=SPEC, qemu_version=qemu_version)
    try:
        source.wait_serial(3)
        source.set_capabilities(multifd=True)
        source.set_parameters(multifd_channels=2, multifd_compression=compression)
        source.stop()
        ram = source.pmemsave(0, MEMORY_MIB * MIB, tmp_path / "source.ram")
        source.migrate(keeper.uri)
        source.wait_migration(timeout=60)
    finally:
        kept = keeper.close()
    channels = [data for data in kept if data[:4] == MAGIC]
    assert len(kept) == 3 and len(channels) == 2
    # The main channel is an ordinary stream: its MEM_SIZE names the blocks the packets use.
    main = StreamReader(version)
    main.feed(kept[0])
    main.feed_eof()
    sizes = [r.message for r in main if isinstance(r.message, m.MemSize)]
    blocks = {info.idstr: info.used_length for info in sizes[0].blocks}
    ids, normal, zero = set(), set(), set()
    for data in channels:
        reader = MultifdChannelReader(version, blocks=blocks, channels=2)
        for start in range(0, len(data), 65536):  # as it would arrive
            reader.feed(data[start : start + 65536])
            events = list(reader)
            for event in events:
                if isinstance(event, Handshake):
                    ids.add(event.init.channel)
                    continue
                assert isinstance(event, Packet)
                if event.header.normal_pages:  # 7.2 flags only packets with pages
                    method = "NOCOMP" if compression == "none" else compression.upper()
                    assert event.method == method
                if event.header.ramblock != "pc.ram":
                    continue
                for offset, page in zip(event.normal_offsets, event.pages, strict=True):
                    assert page == ram[offset : offset + PAGE], f"page {offset:#x}"
                    normal.add(offset)
                for offset in event.zero_offsets:
                    assert ram[offset : offset + PAGE] == bytes(PAGE)
                    zero.add(offset)
        reader.feed_eof()
        assert list(reader) == []
    assert ids == {0, 1}
    # the guest writes every page of [1 MiB, 8 MiB): each went as a normal page
    assert set(range(SPEC.start, SPEC.end, PAGE)) <= normal
    assert bool(zero) == (version == "10.0"), "9.0+ lists zero pages in the packets"
    # the CLI accounts for every byte of a channel
    channel = tmp_path / "channel.bin"
    channel.write_bytes(channels[0])
    result = subprocess.run(
        [sys.executable, "-m", "qmig", "inspect", str(channel), "--json",
         "--qemu-version", version],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["bytes"] == len(channels[0])
    assert sum(p["size"] for p in report["packets"]) + 64 == report["bytes"]
    assert report["syncs"] >= 1
