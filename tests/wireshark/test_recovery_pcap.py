"""A recovered migration in the pcapng and the dissector: a replay of ``fixtures/postcopy-tcp``
into ``qmig receive``, through ``qmig capture --recover-connect --pcap``, with the replay
cutting its channel mid-postcopy and resuming. Each connection of the main channel is its
own TCP stream; the resumed one carries on the migration (its sections, its blocks), and
tshark decodes both with the counts `qmig inspect --json` gives for the folder."""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from dissecting import FIXTURE_QEMU, FIXTURES, UNCOUNTED, column, inspect_json, run_tshark
from processes import ended, qmig, started
from test_pcapng import SYN, read_pcapng

from qmig.pcap import GENERATION_STEP, SOURCE_PORT

pytestmark = [pytest.mark.uffd, pytest.mark.timeout(300)]
TIMEOUT = 120


def test_a_recovered_capture_is_dissected_across_its_connections(
    tshark: str, lua_for: Callable[[str], Path], tmp_path: Path
) -> None:
    out, pcapng = tmp_path / "capture", tmp_path / "capture.pcapng"
    with started(
        "receive", "--listen", "tcp:127.0.0.1:0", "--qemu-version", FIXTURE_QEMU,
        "--recover-timeout", "60", "--json",
    ) as (receive, first):  # fmt: skip
        destination = first.split()[-1]
        with started(
            "capture", "--listen", "tcp:127.0.0.1:0", "--connect", destination,
            "--recover-connect", destination, "--recover-timeout", "60", "--out", str(out),
            "--pcap", str(pcapng), "--json",
        ) as (relay, first):  # fmt: skip
            listening = first.split()[-1]
            replayed = subprocess.run(
                qmig("replay", str(FIXTURES / "postcopy-tcp"), "--connect", listening,
                     "--qemu-version", FIXTURE_QEMU, "--bandwidth", "64", "--pause-after",
                     "300", "--resume-to", listening, "--json"),
                capture_output=True, text=True, timeout=TIMEOUT,
            )  # fmt: skip
            assert replayed.returncode == 0, replayed.stderr
            received, _ = ended(receive, TIMEOUT)
            captured, _ = ended(relay, TIMEOUT)
    assert json.loads(received)["recoveries"] == 1
    assert len(json.loads(replayed.stdout)["pauses"]) == 1
    summary = json.loads(captured)
    assert len(summary["connections"]) == 2
    # Two TCP streams for the main channel, the second from the next source port.
    opened = [p.src_port for p in read_pcapng(pcapng) if p.flags == SYN]
    assert opened == [SOURCE_PORT, SOURCE_PORT + GENERATION_STEP]

    rows = run_tshark(
        tshark, lua_for(FIXTURE_QEMU), pcapng,
        ["qmig.record", "qmig.cmd", "qmig.rp.message", "qmig.undecoded"],
    )  # fmt: skip
    expected = inspect_json(out)
    assert column(rows, 3) == []
    stream = Counter(name for name in column(rows, 0) if name not in UNCOUNTED)
    stream["COMMAND"] = len(column(rows, 1))
    assert dict(stream) == expected["counts"]
    assert expected["counts"]["RECV_BITMAP"] > 0 and expected["counts"]["POSTCOPY_RESUME"] == 1
    assert dict(Counter(column(rows, 2))) == expected["return_path"]["counts"]
