"""``qmig receive --preempt`` given a hostile preempt channel: a source that reaches postcopy
on the main channel, then sends a header, a non-page record, a page outside its block or a
page of a block the main channel never announced on its second connection. Each fails in
one line naming the channel and the byte, with no traceback."""

from __future__ import annotations

import socket
import time

import pytest
from processes import started

from qmig.protocol.preempt import PreemptVariant
from qmig.protocol.source import Source, SourceBlock
from qmig.wire import messages as m
from qmig.wire.schema import schema_for

pytestmark = pytest.mark.uffd
VERSION = "10.0"
PAGE = 4096
S = schema_for(VERSION)
GOOD = S.build_ram_page(m.RamPage("pc.ram", 0, False, bytes(range(256)) * 16))


def _receive_with(preempt_bytes: bytes) -> str:
    with started(
        "receive", "--listen", "tcp:127.0.0.1:0", "--preempt", "--qemu-version", VERSION,
        "--workload", "none", "--accept-timeout", "20", "--idle-timeout", "20",
    ) as (process, first):  # fmt: skip
        port = int(first.rsplit(":", 1)[1])
        ram = bytearray(64 * PAGE)
        source = Source(
            [SourceBlock("pc.ram", len(ram), ram)],
            version=VERSION,
            machine_type="pc-q35-10.0",
            preempt=PreemptVariant.V8_0,
        )
        with socket.create_connection(("127.0.0.1", port)) as main:
            source.start()
            main.sendall(source.data_to_send(8 * PAGE))
            source.start_postcopy()
            main.sendall(source.data_to_send(0))
            with socket.create_connection(("127.0.0.1", port)) as preempt:
                time.sleep(0.3)  # the destination listens by now
                preempt.sendall(preempt_bytes)
                _, stderr = process.communicate(timeout=30)
    assert process.returncode != 0
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.mark.parametrize(
    ("preempt_bytes", "expected"),
    [
        (
            S.header.build(m.StreamHeader(3)) + bytes(8),
            "qmig: error: preempt channel: a migration stream header: this channel carries "
            "bare RAM records, no header at byte 0",
        ),
        (
            GOOD + S.build_ram_flag("MEM_SIZE", 0),
            f"qmig: error: preempt channel: unknown combination of migration flags 0x4 "
            f"(postcopy mode): only RAM page records and EOS belong on this channel at byte "
            f"{len(GOOD)}",
        ),
        (
            S.build_ram_page(m.RamPage("pc.ram", 64 * PAGE, False, bytes(PAGE))),
            "qmig: error: preempt channel RAM: illegal RAM offset 0x40000 in block 'pc.ram' "
            "(used length 0x40000) at byte 0",
        ),
        (
            S.build_ram_page(m.RamPage("pc.rom", 0, False, bytes(PAGE))),
            f"qmig: error: preempt channel: block 'pc.rom' is not one the main channel "
            f"announced at byte {S.ram_header_size}",
        ),
    ],
    ids=["header", "not-a-page", "outside-block", "unknown-block"],
)
def test_hostile_preempt_channel_fails_in_one_line(preempt_bytes: bytes, expected: str) -> None:
    assert _receive_with(preempt_bytes) == expected
