"""QEMU's own fault latency from its trace events (qmig.qemu.trace): a real postcopy
migration between two QEMUs, the destination's trace read back and held to the blocktime
QEMU itself reports."""

from __future__ import annotations

import json
import mmap
import re
import shlex
import subprocess
from pathlib import Path

import pytest
from processes import qmig
from qemu_helpers import PREEMPT_MEMORY_MIB, PREEMPT_SPEC, MachineFactory, need, postcopy_migration

from qmig.cli.text import latency_form
from qmig.qemu.trace import FAULT_EVENT, trace_lines, traced_fault_file, traced_faults


@pytest.mark.qemu
@pytest.mark.parametrize("version", [None, "10.0"], ids=["qemu-7.2", "qemu-10.0"])
def test_every_fault_the_destination_logged_is_timed_to_its_placement(
    machines: MachineFactory, tmp_path: Path, version: str | None
) -> None:
    config = {
        "memory_mib": PREEMPT_MEMORY_MIB,
        "guest": PREEMPT_SPEC,
        "qemu_version": need(version),
    }
    log = tmp_path / "faults.log"
    options = subprocess.run(
        qmig("qemu-faults", "--qemu-args", str(log)), capture_output=True, text=True, check=True
    )
    destination = machines(
        "destination", incoming="defer", extra_args=shlex.split(options.stdout), **config
    )
    destination.set_capabilities(postcopy_ram=True, postcopy_preempt=True, postcopy_blocktime=True)
    destination.migrate_incoming("tcp:127.0.0.1:0")
    source = machines("source", **config)
    postcopy_migration(
        source,
        f"tcp:127.0.0.1:{destination.incoming_port()}",
        postcopy_mib=8,
        postcopy_preempt=True,
    )
    info = destination.wait_migration(timeout=120)
    destination.stop()  # the log is complete: no vCPU faults or page arrives any more
    faults = traced_fault_file(log, mmap.PAGESIZE)
    logged = sum(FAULT_EVENT in line for line in log.read_text(errors="replace").splitlines())
    assert faults.latencies_ns and all(latency >= 0 for latency in faults.latencies_ns)
    assert len(faults.latencies_ns) + faults.late + faults.unplaced == logged
    assert faults.unplaced == 0  # a completed migration placed every page a fault waited on
    printed = subprocess.run(
        qmig("qemu-faults", str(log), "--json"), capture_output=True, text=True, check=True
    )
    figures = json.loads(printed.stdout)
    assert (figures["faults"], figures["late_faults"]) == (logged, faults.late)
    assert sum(figures["postcopy_latency_dist"]) == len(faults.faults)
    assert figures["fault_latency_us"]["p50"] <= figures["fault_latency_us"]["p99"]
    # The human summary gives the same buckets and average, in QEMU's form.
    human = subprocess.run(
        qmig("qemu-faults", str(log)), capture_output=True, text=True, check=True
    )
    (form,) = [line for line in human.stdout.splitlines() if line.startswith("in QEMU's form: ")]
    assert form == "in QEMU's form: " + latency_form(
        figures["postcopy_latency_ns"], figures["postcopy_latency_dist"]
    )
    counted = re.findall(r"\[([\d,]+), [^)]+\) ([\d,]+)", form)
    dist = figures["postcopy_latency_dist"]
    assert [(int(low.replace(",", "")), int(n.replace(",", ""))) for low, n in counted] == [
        (0 if k == 0 else 1 << k, count) for k, count in enumerate(dist) if count
    ]
    (thread,) = figures["blocktime_ms_by_thread"]  # the guest's one vCPU
    assert figures["blocktime_ms_by_thread"][thread] == pytest.approx(
        sum(faults.latencies_ns) / 1e6, abs=0.01
    )
    if version is None:
        # QEMU 7.2's own blocktime came out at 0.54-0.66 of these sums in every run (its
        # pre-7.2 variant holds urgent pages to the cap's next window: about 35 faults of
        # ~98 ms each per run, which the trace shows); not the cross-check below.
        return
    # One vCPU: QEMU's own blocktime (ms, all vCPUs blocked) is about the sum of its waits.
    total_ms = sum(faults.latencies_ns) / 1e6
    blocktime_ms = info["postcopy-blocktime"]
    assert 0.5 * blocktime_ms - 20 <= total_ms <= 1.5 * blocktime_ms + 20, (total_ms, info)


def test_a_fault_is_matched_with_the_first_placement_of_its_host_page_after_it() -> None:
    lines = [
        "7@100.000010:postcopy_place_page host=0x2000",  # before any fault on it
        "9@100.000020:postcopy_ram_fault_thread_request Request for HVA=0x2010 rb=pc.ram "
        "offset=0x2000 pid=5",  # its page is there already: late
        "9@100.000030:postcopy_ram_fault_thread_request Request for HVA=0x1008 rb=pc.ram "
        "offset=0x1000 pid=5",
        "9@100.000045:postcopy_ram_fault_thread_request Request for HVA=0x1ff0 rb=pc.ram "
        "offset=0x1000 pid=6",  # a second vCPU on the same page
        "7@100.000090:postcopy_place_page_zero host=0x1000",
        "7@100.000095:postcopy_place_page host=0x1000",  # a second copy: placed once
        "7@100.000060:qemu_other_event x=1",
        "9@100.000099:postcopy_ram_fault_thread_request Request for HVA=0x3000 rb=pc.ram "
        "offset=0x3000 pid=5",  # never placed
        "not a trace line",
    ]
    faults = traced_faults(trace_lines(lines), 0x1000)
    assert faults.latencies_ns == [60_000, 45_000]
    assert [fault.page for fault in faults.faults] == [("pc.ram", 0x1000)] * 2
    assert (faults.late, faults.unplaced) == (1, 1)


def test_lines_are_taken_in_time_order_whatever_thread_wrote_them_first() -> None:
    lines = [
        "7@100.000090:postcopy_place_page host=0x1000",
        "9@100.000030:postcopy_ram_fault_thread_request Request for HVA=0x1000 rb=pc.ram "
        "offset=0x0 pid=5",
    ]
    assert traced_faults(trace_lines(lines), 0x1000).latencies_ns == [60_000]


def test_a_file_that_is_no_trace_log_is_one_line_and_a_failure(tmp_path: Path) -> None:
    stream = tmp_path / "stream.bin"
    stream.write_bytes(b"QEVM\x00\x00\x00\x03")
    for path, detail in ((stream, "not a QEMU trace log"), (tmp_path / "gone", "no such")):
        done = subprocess.run(
            qmig("qemu-faults", str(path)), capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 1
        assert done.stderr.count("\n") == 1 and detail in done.stderr, done.stderr
