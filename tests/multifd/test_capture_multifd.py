"""A multifd migration through ``qmig capture``'s relay (a source written here, ``qmig receive
--multifd 2`` as the destination), and ``qmig inspect`` of the folder: each channel in
``multifd-<K>.bin``, every byte of it accounted for, the sync points matched; a damaged
folder is one error line. (Real QEMUs: tests/qemu/test_multifd_capture.py.)"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from test_receive_multifd import (
    PAGE,
    SYNC,
    A,
    B,
    C,
    handshake,
    main_stream,
    outcome,
    packet,
    receive,
)

from qmig.capture import Relay
from qmig.capture.recording import Direction, read_index
from qmig.wire import messages as m
from qmig.wire.schema import schema_for

pytestmark = pytest.mark.uffd  # qmig receive is the destination


def inspect(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qmig", "inspect", str(folder), *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def send_in_order(port: int, connections: list[bytes]) -> None:
    """Each connection opened in turn (the main one first, as QEMU does), then all sent."""
    sockets = [socket.create_connection(("127.0.0.1", port)) for _ in connections]
    for sock, data in zip(sockets, connections, strict=True):
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
    for sock in sockets:
        sock.recv(1)  # until the relay passes the destination's end on
        sock.close()


@pytest.fixture
def captured(tmp_path: Path) -> tuple[Path, list[bytes]]:
    """A 7.2 migration of two channels, captured: page 1 on channel 0 then on channel 1,
    page 2 on channel 0, every other page a ZERO record on the main channel."""
    schema = schema_for("7.2")
    zeros = b"".join(
        schema.build_ram_page(m.RamPage("pc.ram", page * PAGE, True, b"\0"))
        for page in [0, *range(3, 256)]
    )
    main = main_stream([zeros, b""])
    channel0 = handshake(0) + packet({}, SYNC) + packet({PAGE: A, 2 * PAGE: B}, SYNC, 1)
    channel0 += packet({}, SYNC, 2)
    channel1 = handshake(1) + packet({}, SYNC) + packet({}, SYNC, 1)
    channel1 += packet({PAGE: C}, SYNC, 2)
    folder = tmp_path / "capture"
    with receive(tmp_path, "--multifd", "2") as (process, port):
        relay = Relay(f"tcp:127.0.0.1:{port}", folder, multifd=2).start()
        send_in_order(relay.port, [main, channel0, channel1])
        code, _stdout, stderr = outcome(process)
        summary = relay.join(30)
    assert code == 0, stderr
    assert summary.clean and [r.end for r in summary.multifd] == ["eof", "eof"]
    ram = (tmp_path / "dump" / "pc.ram.bin").read_bytes()
    assert ram[PAGE : 3 * PAGE] == C + B
    return folder, [main, channel0, channel1]


def test_the_folder_keeps_each_channel(captured: tuple[Path, list[bytes]]) -> None:
    folder, (main, channel0, channel1) = captured
    assert (folder / "stream.bin").read_bytes() == main
    assert (folder / "multifd-0.bin").read_bytes() == channel0
    assert (folder / "multifd-1.bin").read_bytes() == channel1
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["multifd"] == {
        "channels": 2,
        "directions": ["multifd-0", "multifd-1"],
        "files": ["multifd-0.bin", "multifd-1.bin"],
    }
    assert meta["directions"]["multifd-1"]["bytes"] == len(channel1)
    chunks = read_index(folder / "index.tsv")
    assert sum(c.length for c in chunks if c.direction is Direction("multifd-0")) == len(channel0)


def test_inspect_puts_the_channels_on_one_timeline(captured: tuple[Path, list[bytes]]) -> None:
    folder, (_main, channel0, channel1) = captured
    result = inspect(folder, "--json")
    assert result.returncode == 0, result.stderr
    multifd = json.loads(result.stdout)["multifd"]
    assert [c["bytes"] for c in multifd["channels"]] == [len(channel0), len(channel1)]
    assert [(c["id"], c["packets"], c["pages"], c["syncs"]) for c in multifd["channels"]] == [
        (0, 3, 2, 3),
        (1, 3, 1, 3),
    ]
    assert multifd["pages"] == {"main": 254, "multifd-0": 2, "multifd-1": 1}
    assert multifd["flush_after_each_section"] is True  # 7.2: each section's EOS
    assert [p["name"] for p in multifd["sync_points"]] == ["EOS"] * 3
    assert multifd["syncs_match"] is True
    text = inspect(folder)
    assert text.returncode == 0, text.stderr
    timeline = text.stdout.split("multifd channels and the stream's sync points")[1]
    assert timeline.count("MULTIFD_PACKET SYNC") == 6 and timeline.count("  EOS  ") == 3


def test_a_damaged_channel_file_is_one_error_line(captured: tuple[Path, list[bytes]]) -> None:
    folder, (_main, _channel0, channel1) = captured
    damaged = bytearray(channel1)
    offsets = 64 + 2 * 1344 + 320  # the third packet's first offset: page 1
    damaged[offsets : offsets + 8] = (1 << 20).to_bytes(8, "big")
    (folder / "multifd-1.bin").write_bytes(damaged)
    result = inspect(folder, "--json")
    assert result.returncode == 1
    assert result.stderr == (
        "qmig: error: multifd-1.bin MULTIFD_PACKET: offset[0] (normal page) 0x100000 is "
        f"outside block 'pc.ram' of 0x100000 bytes or not page aligned at byte {offsets}\n"
    )
    (folder / "multifd-1.bin").write_bytes(channel1 + b"\0")
    result = inspect(folder, "--json")
    assert result.returncode == 1
    assert result.stderr.startswith("qmig: error: multifd-1.bin MULTIFD_PACKET: "), result.stderr
    assert result.stderr.count("\n") == 1
