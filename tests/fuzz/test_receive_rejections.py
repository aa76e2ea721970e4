"""``qmig receive`` refuses hostile streams with one line, through the real CLI over TCP.

Each case starts ``qmig receive --listen tcp:127.0.0.1:0`` as a process, reads the port from
its first stderr line, sends the bytes, closes, and checks the exit status and the last
stderr line: ``qmig: error: WHAT: detail at byte N``, WHAT named as QEMU names it without
``MIG_CMD_``, N where the rejected record starts. The same line grammar is what the
differential fuzzer compares with QEMU's verdicts.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess

import pytest
from processes import started

from qmig.wire import messages as m
from qmig.wire.schema import schema_for

pytestmark = [pytest.mark.uffd, pytest.mark.timeout(120)]

VERSION = "7.2"
S = schema_for(VERSION)
PAGE = 4096
BLOCK = m.RamBlockInfo("pc.ram", 16 * PAGE)
# The error line, and the hint that follows it when another profile reads further.
LINE = re.compile(
    r"^qmig: error: (?P<what>[^:]+): (?P<detail>.*?) at byte (?P<offset>\d+)(?P<hint>; .*)?$"
)


def opening() -> bytes:
    opening = S.build_opening(m.Configuration("pc-i440fx-7.2"), return_path=True)
    return opening + S.build_ram_setup(2, (BLOCK,))


ADVISE = S.build_command(m.PostcopyAdvise(PAGE, PAGE))
LISTEN = S.build_command(m.PostcopyListen())


def receive(data: bytes, listen: str = "tcp:127.0.0.1:0") -> tuple[int, str, str]:
    """Run ``qmig receive``, send ``data`` and close; (exit status, first, last stderr line)."""
    with started(
        "receive", "--listen", listen, "--workload", "none", "--qemu-version", VERSION,
        "--accept-timeout", "30", "--idle-timeout", "20",
        stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    ) as (process, line):  # fmt: skip
        first = line.strip()
        match = re.search(r"listening on tcp:([\d.]+):(\d+)", first)
        assert match, first
        with socket.create_connection((match[1], int(match[2])), timeout=10) as sock:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            # Read the return path until qmig closes: it must not wait for more.
            sock.settimeout(30)
            while sock.recv(65536):
                pass
        _, rest = process.communicate(timeout=60)
    lines = [line for line in rest.splitlines() if line.strip()]
    assert "Traceback" not in rest, rest
    return process.returncode, first, lines[-1] if lines else ""


def rejection(data: bytes) -> re.Match[str]:
    status, _, last = receive(data)
    assert status == 1, last
    match = LINE.match(last)
    assert match, last
    return match


def test_a_command_in_the_wrong_state_is_named_as_qemu_names_it() -> None:
    data = opening() + ADVISE + LISTEN + LISTEN
    found = rejection(data)
    assert found["what"] == "POSTCOPY_LISTEN"
    assert found["detail"] == "wrong postcopy state LISTENING"
    assert int(found["offset"]) == len(data) - len(LISTEN)
    assert found["hint"] is None  # a state error: no other profile would read it differently


def test_an_unknown_command_number_is_an_unknown_command() -> None:
    # 11 is SWITCHOVER_START in 10.x, unknown to 7.2.
    bad = bytes([0x08, 0x00, 0x0B, 0x00, 0x00])
    found = rejection(opening() + bad)
    assert found["what"] == "unknown command"
    assert int(found["offset"]) == len(opening())
    assert found["hint"] == f"; --qemu-version 10.0 reads this stream past byte {len(opening())}"


def test_a_page_outside_its_block_is_a_bad_ram_record() -> None:
    head = opening() + S.build_section(m.SectionPart(2))
    page = S.build_ram_page(m.RamPage("pc.ram", 16 * PAGE, False, b"\x5a" * PAGE))
    found = rejection(head + page + S.build_ram_flag("EOS") + S.build_footer(2))
    assert found["what"] == "RAM"
    assert int(found["offset"]) == len(head)


def test_a_discard_outside_its_block_is_refused_before_anything_is_dropped() -> None:
    bad = S.build_command(m.PostcopyRamDiscard("pc.ram", (m.DiscardRange(15 * PAGE, 2 * PAGE),)))
    found = rejection(opening() + ADVISE + bad)
    assert found["what"] == "POSTCOPY_RAM_DISCARD"
    assert "outside block" in found["detail"]


def test_a_discard_wrapping_64_bits_is_refused() -> None:
    span = m.DiscardRange((1 << 64) - PAGE, 2 * PAGE)
    bad = S.build_command(m.PostcopyRamDiscard("pc.ram", (span,)))
    found = rejection(opening() + ADVISE + bad)
    assert found["what"] == "POSTCOPY_RAM_DISCARD"


def test_a_discard_name_longer_than_the_command_is_refused() -> None:
    # The name-length byte claims 200 bytes in a 20-byte command: QEMU would read on.
    payload = bytes([0, 200]) + b"pc.ram" + bytes(12)
    bad = bytes([0x08, 0x00, 0x06, 0x00, len(payload)]) + payload
    found = rejection(opening() + ADVISE + bad + bytes(64))
    assert found["what"] == "POSTCOPY_RAM_DISCARD"
    assert int(found["offset"]) >= len(opening() + ADVISE)


def test_a_stream_that_just_ends_is_an_unexpected_end_of_stream() -> None:
    data = opening() + ADVISE
    found = rejection(data + LISTEN[:3])
    assert "unexpected end of stream" in found["detail"]
    assert int(found["offset"]) == len(data)
    found = rejection(data)  # ends between records
    assert "unexpected end of stream" in found["detail"]


def test_an_empty_host_listens_on_loopback_only() -> None:
    status, first, _ = receive(opening() + ADVISE, listen="tcp::0")
    assert re.search(r"listening on tcp:127\.0\.0\.1:\d+", first), first
    assert status == 1


def test_receive_uses_the_loopback_address_for_an_empty_host() -> None:
    from qmig.transport.uri import TcpAddress, parse_uri

    assert parse_uri("tcp::4444") == TcpAddress("127.0.0.1", 4444)
    assert parse_uri("tcp:0.0.0.0:4444") == TcpAddress("0.0.0.0", 4444)  # only when named
