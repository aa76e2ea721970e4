"""``qmig capture --preempt --pcap FILE`` of a real postcopy-preempt migration between two QEMU
7.2 processes, and two QEMU 10.0 ones (the 8.0 variant: the channel opens at the switchover
and ends without EOS): the pcapng is written once the relay is done, each channel its own TCP
stream, and tshark with the dissector decodes the main stream, the return path and the
preempt channel with the counts `qmig inspect --json` gives for the capture folder."""

from __future__ import annotations

import os
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from dissecting import FIXTURE_QEMU, column, inspect_json, run_tshark
from qemu_helpers import capture_preempt, need
from test_pcapng import read_pcapng

from qmig.pcap import SOURCE_PORT
from qmig.qemu.machine import QEMU_BINARY, Machine

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(
        shutil.which(QEMU_BINARY) is None and not os.environ.get("CI"),
        reason=f"{QEMU_BINARY} is not installed",
    ),
]

FIELDS = ["qmig.channel", "qmig.record", "qmig.ram.kind", "qmig.cmd", "qmig.rp.message",
          "qmig.undecoded"]  # fmt: skip
UNCOUNTED = {"EOS", "HOOK", "MULTIFD_FLUSH"}


@pytest.mark.parametrize("version", [None, "10.0"], ids=["qemu-7.2", "qemu-10.0"])
def test_capture_pcap_of_a_preempt_migration_decodes_every_channel(
    version: str | None,
    machines: Callable[..., Machine],
    tshark: str,
    lua_for: Callable[[str], Path],
    tmp_path: Path,
) -> None:
    need(version)
    pcapng = tmp_path / "capture.pcapng"
    out, summary = capture_preempt(
        machines, tmp_path, version=version, capture_args=("--pcap", str(pcapng))
    )
    written = summary["pcapng"]
    assert written["path"] == str(pcapng)
    assert written["stream_bytes"] == summary["stream"]["bytes"]
    assert written["return_path_bytes"] == summary["return_path"]["bytes"]
    assert written["channel_bytes"] == {"preempt": summary["preempt"]["bytes"]} != {"preempt": 0}
    packets = read_pcapng(pcapng)
    assert len(packets) == written["packets"]
    preempt_payload = b"".join(p.payload for p in packets if p.src_port == SOURCE_PORT + 1)
    assert preempt_payload == (out / "preempt.bin").read_bytes()

    rows = run_tshark(tshark, lua_for(version or FIXTURE_QEMU), pcapng, FIELDS)
    by_channel: dict[str, list[list[list[str]]]] = {}
    for row in rows:
        if row and row[0]:
            by_channel.setdefault(row[0][0], []).append(row)
    assert set(by_channel) == {"main", "preempt"}
    expected = inspect_json(out, version or FIXTURE_QEMU)
    main, preempt = by_channel["main"], by_channel["preempt"]
    assert column(main, 5) == [] and column(preempt, 5) == []
    stream = Counter(name for name in column(main, 1) if name not in UNCOUNTED)
    stream["COMMAND"] = len(column(main, 3))
    assert dict(stream) == expected["counts"]
    assert dict(Counter(column(main, 4))) == expected["return_path"]["counts"]
    # The preempt channel: one RAM record per target page, its zero pages, and an EOS at its
    # end in QEMU 7.2's variant only.
    records = Counter(column(preempt, 1))
    kinds = Counter(column(preempt, 2))
    assert records["RAM"] == expected["preempt"]["pages"] > 0
    assert kinds["ZERO"] == expected["preempt"]["zero_pages"]
    assert records["EOS"] == int(expected["preempt"]["ended_with_eos"])
    assert expected["preempt"]["ended_with_eos"] == (version is None)
    assert set(records) <= {"RAM", "EOS"}
