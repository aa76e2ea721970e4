"""The multifd runner over real loopback connections: a SourceRunner with multifd migrates a
guest to a plain listener that keeps each connection's bytes, with socket buffers small
enough that packets leave in pieces; every channel then reads back, with the main channel,
to the guest's RAM. And the hostile side: a damaged multifd channel in a capture folder is
one error line naming its file and byte."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest
from keeper import Keeper

from qmig.protocol.multifd_source import MultifdSendOptions
from qmig.protocol.source import Source, SourceBlock
from qmig.runner.channels import Channels
from qmig.runner.multifd_send import _advance, channel_kind
from qmig.runner.source import SourcePlan, SourceRunner
from qmig.transport import connect
from qmig.wire import messages as m
from qmig.wire.multifd_reader import Handshake, MultifdChannelReader, Packet
from qmig.wire.reader import StreamReader

PAGE = 4096


def guest(pages: int) -> SourceBlock:
    rng = random.Random(7)
    ram = bytearray(pages * PAGE)
    for page in range(0, pages, 2):
        ram[page * PAGE : (page + 1) * PAGE] = rng.randbytes(PAGE)
    return SourceBlock("pc.ram", len(ram), ram)


@pytest.mark.parametrize(
    ("version", "machine", "cap"),
    [("7.2", "pc-i440fx-7.2", None), ("10.0", "pc-q35-10.0", None), ("10.0", "pc-q35-10.0", 4)],
)
def test_runner_sends_every_channel_whole(version: str, machine: str, cap: int | None) -> None:
    """``cap``: MiB/s for the bandwidth cap, which the packets' bytes count against too."""
    block = guest(1500)
    keeper = Keeper()
    source = Source(
        [block], version=version, machine_type=machine, postcopy_ram=False,
        return_path=False, multifd=MultifdSendOptions(3),
    )  # fmt: skip

    def small(timeout: float) -> object:
        connection = connect(keeper.uri, timeout=timeout)
        connection.limit_buffers(send=4096)
        return connection

    main = connect(keeper.uri)
    openers = {channel_kind(k): small for k in range(3)}
    channels = Channels(main, openers=openers)  # type: ignore[arg-type]
    bandwidth = None if cap is None else cap << 20
    runner = SourceRunner(channels, source, SourcePlan(postcopy_after=None, bandwidth=bandwidth))
    try:
        report = runner.run()
    finally:
        channels.close_all()
        runner.multifd.close()  # type: ignore[union-attr]
    data = keeper.close()
    assert len(data) == 4
    if cap is not None:  # ~3 MiB of pages under the cap: no faster than it allows
        sent = sum(len(d) for d in data)
        assert report.finished - report.started >= sent / (cap << 20) - 0.2
    assert report.multifd_bytes == [len(d) for d in data[1:]]
    ram = bytearray(block.used_length)
    reader = StreamReader(version)
    reader.feed(data[0])
    reader.feed_eof()
    for record in reader:
        if isinstance(record.message, m.RamPageRun):
            for header in record.message.headers:
                assert not header & record.message.page_flag, "main: zero pages at most"
    ids = set()
    for kept in data[1:]:
        chan = MultifdChannelReader(version, channels=3, blocks={"pc.ram": block.used_length})
        chan.feed(kept)
        chan.feed_eof()
        for event in chan:
            if isinstance(event, Handshake):
                ids.add(event.init.channel)
                continue
            assert isinstance(event, Packet)
            for offset, page in zip(event.normal_offsets, event.pages, strict=True):
                ram[offset : offset + PAGE] = page
    assert ids == {0, 1, 2}
    assert ram == block.ram


def test_advance_over_pieces() -> None:
    pieces: list[memoryview | bytes] = [b"abc", memoryview(b"defg"), b"h"]
    assert [bytes(p) for p in _advance(pieces, 0)] == [b"abc", b"defg", b"h"]
    assert [bytes(p) for p in _advance(pieces, 2)] == [b"c", b"defg", b"h"]
    assert [bytes(p) for p in _advance(pieces, 3)] == [b"defg", b"h"]
    assert [bytes(p) for p in _advance(pieces, 5)] == [b"fg", b"h"]
    assert _advance(pieces, 8) == []


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda b: b"\x00" + b[1:], "multifd-1.bin: MULTIFD_INIT: magic"),
        (lambda b: b[:64] + b"\xde\xad" + b[66:], "multifd-1.bin: MULTIFD_PACKET: magic"),
        (lambda b: b[:-5], "multifd-1.bin: MULTIFD_PACKET: unexpected end of stream"),
        # the first packet's normal_pages, above pages_alloc
        (lambda b: b[:64 + 16] + b"\x00\x00\x01\x00" + b[64 + 20 :],
         "multifd-1.bin: MULTIFD_PACKET: normal_pages: 256 is more than pages_alloc 128"),
    ],
)  # fmt: skip
def test_damaged_multifd_channel_in_a_capture_is_one_line(
    tmp_path: Path, damage: object, expected: str
) -> None:
    sys.path.insert(0, str(Path(__file__).parents[1] / "qemu"))
    from multifd_replay_folder import write_multifd_folder  # the replay tests' folder writer

    fixtures = Path(__file__).parents[2] / "fixtures"
    folder = tmp_path / "capture"
    write_multifd_folder(fixtures / "precopy-file", folder, "7.2", 2, range(0))
    path = folder / "multifd-1.bin"
    path.write_bytes(damage(path.read_bytes()))  # type: ignore[operator]
    result = subprocess.run(
        [sys.executable, "-m", "qmig", "replay", str(folder), "--to", "tcp:127.0.0.1:1",
         "--qemu-version", "7.2"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith(f"qmig: error: {expected}"), result.stderr
    assert " at byte " in result.stderr and result.stderr.count("\n") == 1
