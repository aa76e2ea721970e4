"""``qmig receive --multifd N`` against a source written here byte by byte (QEMU 7.2's wire):
the sync rules decide which version of a page wins even when every channel's bytes are all
there at once, and a bad channel ends the run with one line naming the channel and the byte.
(Real QEMU sources: tests/qemu/test_multifd_receive.py.)"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from processes import started

from qmig.wire import messages as m
from qmig.wire.multifd import MultifdInit, MultifdPacketHeader, multifd_schema
from qmig.wire.schema import schema_for

VERSION = "7.2"
PAGE = 4096
BLOCK = m.RamBlockInfo("pc.ram", 1 << 20)
SYNC = 1
A, B, C = b"A" * PAGE, b"B" * PAGE, b"C" * PAGE


def main_stream(
    rounds: list[bytes], version: str = VERSION, machine: str = "pc-i440fx-7.2"
) -> bytes:
    """Header, CONFIGURATION, the RAM section's setup (MEM_SIZE), one section part per round
    (its records, then the sync point: EOS in 7.2, MULTIFD_FLUSH and EOS after it), EOF."""
    schema = schema_for(version)
    sync = schema.build_ram_flag("EOS")
    if version != "7.2":
        sync = schema.build_ram_flag("MULTIFD_FLUSH") + sync
    parts = [
        bytes(schema.header.build(m.StreamHeader(schema.profile.stream_version))),
        bytes(schema.configuration.build(m.Configuration(machine))),
        schema.build_section(m.SectionStart(2, "ram", 0, schema.profile.ram_section_version)),
        schema.build_mem_size(m.MemSize(BLOCK.used_length, (BLOCK,))),
        sync,
        schema.build_footer(2),
    ]
    for records in rounds:
        parts += [schema.build_section(m.SectionPart(2)), records, sync, schema.build_footer(2)]
    return b"".join(parts) + bytes(schema.eof.build(m.Eof()))


def packet(
    pages: dict[int, bytes], flags: int = 0, number: int = 0, version: str = VERSION
) -> bytes:
    schema = multifd_schema(version)
    header = MultifdPacketHeader(flags, 128, len(pages), 0, number, 0, "pc.ram")
    return schema.build_packet(header, list(pages), PAGE) + b"".join(pages.values())


def handshake(channel: int, uuid: bytes = bytes(16), version: str = VERSION) -> bytes:
    return multifd_schema(version).build_init(MultifdInit(uuid, channel))


@contextmanager
def receive(
    tmp_path: Path, *args: str, version: str = VERSION
) -> Iterator[tuple[subprocess.Popen[str], int]]:
    with started(
        "receive", "--listen", "tcp:127.0.0.1:0", "--json", "--qemu-version", version,
        "--workload", "none", "--accept-timeout", "30", "--idle-timeout", "30",
        "--dump-ram", str(tmp_path / "dump"), *args,
    ) as (process, line):  # fmt: skip
        yield process, int(line.rsplit(":", 1)[1])


def migrate(port: int, main: bytes, channels: list[bytes]) -> None:
    """Every channel's bytes at once, multifd channels first (QEMU may open them first)."""
    sockets = []
    for data in channels:
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(data)
        sockets.append(sock)
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(main)
    sockets.append(sock)
    for sock in sockets:
        sock.shutdown(socket.SHUT_WR)
    return None


def outcome(process: subprocess.Popen[str]) -> tuple[int, str, str]:
    stdout, stderr = process.communicate(timeout=60)
    return process.returncode, stdout, stderr


@pytest.mark.uffd
def test_the_newest_version_of_each_page_wins(tmp_path: Path) -> None:
    # Round 1: page 1 and 2 on channel 0, page 3 on channel 1. Round 2: page 1 again on
    # channel 1, page 3 as a ZERO record on the main channel. Each channel's SYNC packets
    # match the main stream's EOS records (setup, round 1, round 2).
    schema = schema_for(VERSION)

    def zero(page: int) -> bytes:
        return schema.build_ram_page(m.RamPage("pc.ram", page * PAGE, True, b"\0"))

    # Every other page is zero, as ZERO records in round 1 (a dump needs every page).
    others = b"".join(zero(page) for page in [0, *range(4, BLOCK.used_length // PAGE)])
    main = main_stream([others, zero(3)])
    channel0 = handshake(0) + packet({}, SYNC) + packet({PAGE: A, 2 * PAGE: A}, SYNC, 1)
    channel0 += packet({}, SYNC, 2)
    channel1 = handshake(1) + packet({}, SYNC) + packet({3 * PAGE: B}, SYNC, 1)
    channel1 += packet({PAGE: C}, SYNC, 2)
    with receive(tmp_path, "--multifd", "2") as (process, port):
        migrate(port, main, [channel1, channel0])
        code, stdout, stderr = outcome(process)
    assert code == 0, stderr
    ram = (tmp_path / "dump" / "pc.ram.bin").read_bytes()
    assert ram[PAGE : 2 * PAGE] == C
    assert ram[2 * PAGE : 3 * PAGE] == A
    assert ram[3 * PAGE : 4 * PAGE] == bytes(PAGE)
    assert ram[4 * PAGE :] == bytes(len(ram) - 4 * PAGE)
    summary = json.loads(stdout)
    assert summary["multifd_pages"] == {"main": 254, "multifd-0": 2, "multifd-1": 2}
    assert summary["multifd_syncs"] == 3
    assert summary["multifd"]["flush_after_each_section"] is True


def one_line_error(process: subprocess.Popen[str]) -> str:
    code, _stdout, stderr = outcome(process)
    assert code != 0
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


@pytest.mark.uffd
@pytest.mark.parametrize(
    ("channel1", "expected"),
    [
        pytest.param(
            handshake(1, b"\x11" * 16),
            "multifd channel 1 MULTIFD_INIT: uuid: 111111",  # no id yet: the accept order
            id="wrong-uuid",
        ),
        pytest.param(
            handshake(0),
            "MULTIFD_INIT: id: channel 0 is already set up at byte 24",
            id="same-id",
        ),
        pytest.param(
            handshake(2),
            "MULTIFD_INIT: channel id: 2 is not below the 2 channels at byte 24",
            id="id-too-large",
        ),
        pytest.param(
            handshake(1) + packet({}, SYNC) + packet({1 << 20: B}, SYNC, 1),
            "multifd channel 1 MULTIFD_PACKET: offset[0] (normal page) 0x100000 is outside "
            f"block 'pc.ram' of 0x100000 bytes or not page aligned at byte {64 + 1344 + 320}",
            id="offset-outside-block",
        ),
        pytest.param(
            handshake(1) + packet({}, SYNC) + packet({PAGE: B}, SYNC, 1)[:-100],
            "multifd channel 1 MULTIFD_PACKET: unexpected end of stream at byte "
            f"{64 + 1344 + 1344 + PAGE - 100}",
            id="truncated-packet",
        ),
    ],
)
def test_a_bad_channel_is_one_line_naming_it(
    tmp_path: Path, channel1: bytes, expected: str
) -> None:
    main = main_stream([b""])
    channel0 = handshake(0) + packet({}, SYNC) + packet({PAGE: A}, SYNC, 1)
    with receive(tmp_path, "--multifd", "2") as (process, port):
        # Channel 0 first: the bad one is the second accepted (index 1 until its id is known).
        migrate(port, main, [channel0])
        migrate_more(port, channel1)
        line = one_line_error(process)
    assert expected in line, line


def migrate_more(port: int, data: bytes) -> None:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)


# --- multifd with postcopy (QEMU 10.1+ semantics, on 10.0's wire) ---------------------------

V10 = "10.0"


def postcopy_stream(postcopy_pages: dict[int, bytes]) -> bytes:
    """Precopy with its sync points (MULTIFD_FLUSH: pc-i440fx-10.0 syncs no section's EOS),
    the flush and sync before the switch, page 1 discarded, LISTEN and RUN, then page 1 sent
    again in postcopy on the main channel, and the end."""
    schema = schema_for(V10)
    cmd = schema.build_command
    flush, eos = schema.build_ram_flag("MULTIFD_FLUSH"), schema.build_ram_flag("EOS")
    version = schema.profile.ram_section_version
    postcopy = b"".join(
        schema.build_ram_page(m.RamPage("pc.ram", offset, False, data))
        for offset, data in postcopy_pages.items()
    )
    return b"".join(
        [
            bytes(schema.header.build(m.StreamHeader(schema.profile.stream_version))),
            bytes(schema.configuration.build(m.Configuration("pc-i440fx-10.0"))),
            cmd(m.OpenReturnPath()),
            cmd(m.PostcopyAdvise(PAGE, PAGE)),
            schema.build_section(m.SectionStart(2, "ram", 0, version)),
            schema.build_mem_size(m.MemSize(BLOCK.used_length, (BLOCK,))),
            flush + eos,
            schema.build_footer(2),
            schema.build_section(m.SectionPart(2)),
            flush + eos,  # the pages of the round on the channels, synced
            schema.build_footer(2),
            cmd(m.PostcopyRamDiscard("pc.ram", (m.DiscardRange(PAGE, PAGE),))),
            schema.build_packaged(cmd(m.PostcopyListen()) + cmd(m.PostcopyRun())),
            schema.build_section(m.SectionPart(2)),
            postcopy + eos,
            schema.build_footer(2),
            bytes(schema.section_end.build(m.SectionEnd(2))) + eos + schema.build_footer(2),
            bytes(schema.eof.build(m.Eof())),
        ]
    )


def channels_before_postcopy() -> list[bytes]:
    """Channel 0 carries pages 0-127 ("A"), channel 1 pages 128-255 ("B"), both synced."""
    out = []
    for channel in (0, 1):
        first = 128 * channel
        data = A if channel == 0 else B
        pages = {page * PAGE: data for page in range(first, first + 128)}
        out.append(
            handshake(channel, version=V10)
            + packet({}, SYNC, version=V10)
            + packet(pages, SYNC, 1, version=V10)
        )
    return out


@pytest.mark.uffd
def test_multifd_then_postcopy(tmp_path: Path) -> None:
    main = postcopy_stream({PAGE: C})
    with receive(tmp_path, "--multifd", "2", version=V10) as (process, port):
        migrate(port, main, channels_before_postcopy())
        code, stdout, stderr = outcome(process)
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert summary["mode"] == "postcopy"
    assert summary["multifd_pages"] == {"main": 1, "multifd-0": 128, "multifd-1": 128}
    assert summary["multifd_syncs"] == 2 and summary["discarded_pages"] == 1
    ram = (tmp_path / "dump" / "pc.ram.bin").read_bytes()
    assert ram[:PAGE] == A and ram[PAGE : 2 * PAGE] == C  # discarded, then sent again
    assert ram[2 * PAGE : 128 * PAGE] == A * 126 and ram[128 * PAGE :] == B * 128


@pytest.mark.uffd
def test_a_multifd_page_after_the_switch_is_refused(tmp_path: Path) -> None:
    # The source syncs its channels before postcopy: a packet after that is out of place.
    # Whether the channel reads it before or after the switch, it is refused (the main
    # stream's end is held back meanwhile, so that the run cannot complete first).
    main = postcopy_stream({PAGE: C})
    switch = main.index(bytes(schema_for(V10).eof.build(m.Eof()))) - 200
    late = packet({2 * PAGE: C}, 0, 2, version=V10)
    channels = channels_before_postcopy()
    with receive(tmp_path, "--multifd", "2", version=V10) as (process, port):
        sockets = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        for sock, data in zip(sockets, [channels[0] + late, channels[1]], strict=False):
            sock.sendall(data)
        sockets[2].sendall(main[:switch])
        time.sleep(2.0)
        with contextlib.suppress(OSError):  # qmig has given up on it by now
            sockets[2].sendall(main[switch:])
        line = one_line_error(process)
        for sock in sockets:
            sock.close()
    at = 64 + 1344 + 1344 + 128 * PAGE
    assert line.startswith("qmig: error: multifd channel 0 MULTIFD_PACKET: "), line
    assert "(multifd carries the precopy phase only)" in line and line.endswith(f" {at}"), line


@pytest.mark.uffd
def test_a_silent_main_channel_is_not_idle_while_channels_carry_pages(tmp_path: Path) -> None:
    # The main channel says nothing for 3 s (as while the pages of a whole pass go on the
    # channels) with --idle-timeout 1 and a minimum rate: the channels' bytes keep it alive.
    schema = schema_for(VERSION)
    zeros = b"".join(
        schema.build_ram_page(m.RamPage("pc.ram", page * PAGE, True, b"\0"))
        for page in [0, *range(16, 256)]
    )
    main = main_stream([zeros])
    tail = schema.build_ram_flag("EOS") + schema.build_footer(2) + bytes(schema.eof.build(m.Eof()))
    held = len(main) - len(tail)  # the round's EOS on: held back while the pages come
    channel0 = handshake(0) + packet({}, SYNC)
    channel1 = handshake(1) + packet({}, SYNC) + packet({}, SYNC, 1)
    pages = [packet({page * PAGE: A}, 0, page) for page in range(1, 16)]
    args = ["--multifd", "2", "--idle-timeout", "1", "--min-rate", "4096", "--rate-window", "1"]
    with receive(tmp_path, *args) as (process, port):
        sockets = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        sockets[0].sendall(main[:held])
        sockets[1].sendall(channel0)
        sockets[2].sendall(channel1)
        for data in pages:  # 3 s of pages on channel 0 alone
            time.sleep(0.2)
            sockets[1].sendall(data)
        sockets[1].sendall(packet({}, SYNC, 16))
        sockets[0].sendall(main[held:])
        for sock in sockets:
            sock.shutdown(socket.SHUT_WR)
        code, stdout, stderr = outcome(process)
        for sock in sockets:
            sock.close()
    assert code == 0, stderr
    assert json.loads(stdout)["multifd_pages"]["multifd-0"] == 15
