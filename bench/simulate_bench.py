#!/usr/bin/env python3
"""``qmig simulate`` at 1 GiB next to a real QEMU 7.2 → QEMU 7.2 postcopy migration.

(``--qemu-version 10.0``: QEMU 10.0 → 10.0, the private install ``scripts/fetch-qemu-10.0``
unpacks, and qmig speaking 10.0's wire.)

Run as root (userfaultfd) from the repository::

    .venv/bin/python bench/simulate_bench.py                  # 1 GiB each side, about 20 s
    .venv/bin/python bench/simulate_bench.py --ram 64M --json # a quick run, one JSON document
    .venv/bin/python bench/simulate_bench.py --paths c        # qmig's C paths only

Both sides migrate a guest of ``--ram`` bytes over TCP on 127.0.0.1 under the same cap,
``--bandwidth`` MiB/s for precopy and for postcopy (QEMU 7.2's default max-bandwidth is
128 MiB/s; 0: no cap on either side, as default ``qmig simulate`` runs, QEMU's 0 meaning no
limit for both parameters), and switch to postcopy after one complete precopy pass.

* QEMU: qmig's test guest (:mod:`qmig.qemu.guest`) runs in the source and keeps adding one to
  the first byte of every page of ``[1 MiB, 1 MiB + --guest-mib)``, in address order
  (``--qemu-order scattered``: each page once a pass, about 0.618 of the range apart, so that
  its postcopy faults land all over RAM as qmig's ``--workload random`` does); the rest of RAM
  stays zero.
  The benchmark polls ``query-migrate`` and issues ``migrate-start-postcopy`` once
  ``dirty-sync-count`` says the first pass is over. The destination's guest runs on in
  postcopy, faulting on the pages it had not received. Its counters are checked afterwards.
* qmig: ``qmig simulate`` with one ``pc.ram`` block of the same size, holding as many non-zero
  pages as the QEMU guest writes (scattered; the rest zero), a source dirtying
  ``--dirty-rate`` pages/s within the first ``--guest-mib`` MiB (its working set, like the
  QEMU guest's range), one page after another as the QEMU guest does (``--dirty-pattern
  random`` picks them at random instead), and on the destination one read-only vCPU reading
  RAM in address order (``--workload``, ``--vcpus``), as the QEMU guest's loop does; every
  page is verified.

The workloads are alike, not identical: the QEMU guest rewrites its whole range as fast as
TCG runs it, qmig's dirtier at a set rate. Figures per side:

* total time: migrate command → completion (QEMU: the source's ``total-time``);
* downtime: source stop → destination RUN on both sides. qmig measures it across its two
  processes; for QEMU it comes from trace events (source ``postcopy_start_set_run``, right
  before the stop; destination ``loadvm_postcopy_handle_run_bh return``, after vm_start, or in
  QEMU 10.0 ``vmstate_downtime_checkpoint dst-postcopy-bh-vm-started``).
  QEMU's own ``downtime`` (stop → switchover sent, on the source) is in the JSON too;
* pages/s: pages sent (zero pages included) over total time;
* postcopy requests, and fault latency (fault → page placed) p50/p99/max. For QEMU these come
  from the destination's trace events ``postcopy_ram_fault_thread_request``,
  ``postcopy_place_page`` and ``postcopy_place_page_zero`` (``-msg timestamp=on``,
  microsecond wall clock), matched by host address (:mod:`qmig.qemu.trace`); tracing costs
  QEMU a little. On both sides a fault read after its page was placed (the placement woke
  the vCPU; "late") is left out of the latency and counted on its own row. QEMU 7.2's
  ``postcopy-blocktime`` is shown too.
* requests by what they found on the source: the page sent already (on the stream or
  queued, so its fault waits for less than a round trip), or sent for the request. For QEMU
  from the source's trace events ``get_queued_page_not_dirty`` and ``get_queued_page`` (block
  and offset, matched to the destination's ``postcopy_ram_fault_thread_request``), with each
  group's fault latency p50/p99. For qmig from ``qmig simulate --json``'s ``page_already_sent``
  and ``page_sent_for_request``: its source's verdict on each request it read (every page
  clean when read, or answered by the C thread with nothing to write), paired with the
  destination's requests by block and offset, the fault latency being fault → REQ_PAGES
  sent → placed as the destination measured it; and the requests whose page was placed
  before the source's answer was written;
* qmig's fault latency split, p50/p99, as ``qmig simulate --json`` reports it: fault →
  REQ_PAGES on the wire (``request_sent_us``), → read by the source (``request_read_us``),
  read → the page on the wire (``request_served_us``), on the wire → placed
  (``page_delivered_us``).

qmig runs twice by default (``--paths both``), for a before/after in the same run: with the C
paths of a fault's round trip (the destination's receive thread and page requests, the
source's answer thread and its background sweep; the default) and with all of them in
Python (``--no-fast-path --no-fast-answer``). The table's columns: QEMU 7.2 | qmig (C paths)
| qmig (Python paths), then each qmig's ratio to QEMU.

``--python-sweep`` adds a qmig run with the C paths but postcopy's background pages built by
the source's Python loop (``--no-fast-sweep``), the state before the C sweep: a before/after
of it in the same run.

Every qmig run leaves both sockets' buffers to the kernel, as QEMU leaves its own (and as
``qmig receive`` and ``replay`` do): like for like. ``--simulate-buffers`` adds a qmig run with
``qmig simulate``'s own defaults (``--send-buffer``, ``--receive-buffer``), small so that a
page asked for on the main channel waits behind less in an uncapped run, which in this capped
one slows the stream's bursts (about three times longer), so that the vCPU catches up with
the stream more often and waits at its front.

``--runs N`` runs everything N times in turn and sums up each side's fault latency p50, total
time, downtime and pages/s: every run's figure and the median, and the median's ratio to
QEMU's; and for each qmig run, in how many runs its p50 was at most QEMU's of the same run.
``--qemu-again`` runs QEMU a second time each run and counts the same for it: how often one
QEMU run's p50 is at most another's, the yardstick for that count (a single run's p50 swings
with how often the guest catches up with the stream, on either side).

Nothing is asserted: the figures are printed. On a shared host they are noisy: use --runs.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from qmig.errors import QmigError
from qmig.latency import count_p50_p99, percentiles_us
from qmig.qemu.guest import GuestSpec, highest_safe_end, scattered_walk
from qmig.qemu.machine import Machine, MachineConfig
from qmig.qemu.oracle import verify_counters
from qmig.qemu.qmp import QemuError
from qmig.qemu.trace import (
    FAULT_EVENT,
    PLACE_EVENTS,
    TracedFaults,
    TraceLine,
    trace_args,
    trace_lines,
    traced_faults,
)
from qmig.simulate import SimulationConfig, environment_check, run_simulation
from qmig.sizes import parse_size

MiB = 1 << 20
PAGE = 4096
LOOPBACK = "127.0.0.1"
QEMU_DEFAULT_BANDWIDTH_MIB = 128  # QEMU 7.2's max-bandwidth default
PRECOPY_ATTEMPTS = 5  # QEMU migrations tried for one that goes into postcopy (see run_qemu)
# On the destination: faults and placements (latency), and the end of the RUN handler.
TRACE_EVENTS = (FAULT_EVENT, *PLACE_EVENTS)
# The end of the destination's RUN handler, after vm_start, by QEMU version: 7.2 traces it as
# loadvm_postcopy_handle_run_bh "return", 8.2 on as the downtime checkpoint below.
RUN_DONE = {
    "7.2": ("loadvm_postcopy_handle_run_bh", "return"),
    "10.0": ("vmstate_downtime_checkpoint", "dst-postcopy-bh-vm-started"),
}
# On the source: postcopy_start, right before it stops the guest; and what the migration
# thread found when it took each queued page request off the queue: the page still dirty
# (get_queued_page, sent for the request) or not (get_queued_page_not_dirty, sent already).
SOURCE_TRACE_EVENTS = ("postcopy_start_set_run", "get_queued_page", "get_queued_page_not_dirty")
# "pc.ram/0x1000 page_abs=0x..." (the block, the byte offset in it)
QUEUED_PAGE = re.compile(r"^(\S+)/0x([0-9a-f]+) ")
QUEUED_VERDICTS = {"get_queued_page": False, "get_queued_page_not_dirty": True}
# Each side's faults by what their request found on the source: its page sent already (on
# the stream or queued, so the fault waits for less than a round trip), or sent for it.
GROUPS = ("page_already_sent", "page_sent_for_request")


@dataclass(frozen=True)
class Plan:
    ram: int
    bandwidth: int  # bytes per second, precopy and postcopy; 0: no cap
    guest_bytes: int  # how much of RAM the guest writes (QEMU) / holds non-zero (qmig)
    dirty_rate: float
    timeout: float
    workload: str = "sequential"  # qmig's destination vCPUs: like the QEMU guest's loop
    dirty_pattern: str = "sequential"  # qmig's source guest: like the QEMU guest's loop
    vcpus: int = 1  # the QEMU guest has one vCPU
    qemu_order: str = "address"  # the QEMU guest's pass: in address order, or scattered
    qemu_version: str = "7.2"  # both QEMUs, and the wire qmig speaks


# --- qmig ------------------------------------------------------------------------------------


def run_qmig(
    plan: Plan,
    *,
    c_paths: bool = True,
    preempt: bool = False,
    kernel_buffers: bool = True,
    python_sweep: bool = False,
) -> dict[str, Any]:
    """``c_paths``: the C paths of a postcopy fault's round trip, the destination's receive
    threads and page requests and the source's answer thread (False: all of them in Python,
    ``--no-fast-path --no-fast-answer``, the state before them, for a before/after in the
    same run); ``preempt``: with postcopy-preempt (7.2's variant), requested pages on a
    channel of their own; ``kernel_buffers``: both sockets' buffers left to the kernel, as
    QEMU leaves its own (``--send-buffer auto --receive-buffer auto``; False: simulate's);
    ``python_sweep``: the C paths, but postcopy's background pages built by the source's
    Python loop (``--no-fast-sweep``), as before the C sweep."""
    environment_check()
    pages = plan.ram // PAGE
    config = SimulationConfig(
        blocks=[("pc.ram", plan.ram)],
        postcopy_after=1,
        bandwidth=float(plan.bandwidth) if plan.bandwidth else None,
        dirty_rate=plan.dirty_rate,
        version=plan.qemu_version,
        zero_fraction=max(0.0, 1.0 - plan.guest_bytes / plan.ram),
        working_set=plan.guest_bytes,
        dirty_pattern=plan.dirty_pattern,
        pattern=plan.workload,
        vcpus=plan.vcpus,
        fast_path=c_paths,
        fast_answer=c_paths,
        fast_sweep=not python_sweep,
        preempt=preempt,
    )
    if kernel_buffers:
        config.send_buffer = config.receive_buffer = None
    phases: dict[str, list[float]] = {}
    started = time.monotonic()

    def progress(phase: str, _size: int) -> None:
        now = time.monotonic() - started
        phases.setdefault(phase, [now, now])[1] = now

    s = run_simulation(config, progress)
    sent = s["precopy"]["pages"] + s["postcopy"]["pages"]
    requested_pages = s["postcopy"]["requested_pages"]
    return {
        "verified": s["verified"],
        "total_s": s["total_s"],
        "downtime_ms": s["downtime_ms"],
        "pages_sent": sent,
        "pages_per_s": round(sent / s["total_s"]) if s["total_s"] else None,
        "precopy_pages": s["precopy"]["pages"],
        "postcopy_pages": s["postcopy"]["pages"],
        "postcopy_requests": s["postcopy_requests"],
        "faults": s["faults"] - s["late_faults"],
        "late_faults": s["late_faults"],
        "fault_latency_us": s["fault_latency_us"],
        "source_requests": s["source_requests"],
        "requested_pages": requested_pages,
        # Per request its source read, paired with the destination's: its fault latency by
        # what the request found there, its page sent already or sent for it.
        **{name: s[name] for name in GROUPS},
        # Requests read by the source whose page was placed before the answer was written
        # (on its way already): page_delivered_us leaves them out.
        "placed_before_answer": s["request_read_us"]["count"] - s["page_delivered_us"]["count"],
        "blocktime_ms": s["blocktime_ms"],
        "ram_pages": pages,
        "discarded_pages": s["discarded_pages"],
        "request_sent_us": s["request_sent_us"],
        "request_read_us": s["request_read_us"],
        "request_served_us": s["request_served_us"],
        "page_delivered_us": s["page_delivered_us"],
        # The last part of a request's round trip: the page's last bytes read off the
        # socket → placed (the destination's C receive thread), and that thread's counts.
        "page_placed_us": s.get("page_placed_us") if s.get("fast_path") else None,
        "fast_path": s.get("fast_path"),
        "fast_answer": s.get("fast_answer"),
        "preempt_pages": s.get("preempt_pages"),
        # When the source sent each phase's first and last bytes, from just before the
        # guest RAM is generated (seconds).
        "phases_s": {name: [round(a, 3), round(b, 3)] for name, (a, b) in phases.items()},
    }


# --- QEMU ------------------------------------------------------------------------------------


class CompletedInPrecopy(QemuError):
    """QEMU's migration converged before ``migrate-start-postcopy`` took effect."""


def run_qemu(plan: Plan) -> dict[str, Any]:
    """One QEMU → QEMU migration that went into postcopy. Without a cap the first passes
    can leave so few dirty pages that QEMU completes in precopy before the switch it was
    asked for; such a run says nothing of postcopy, so it is run again (and said so)."""
    for attempt in range(1, PRECOPY_ATTEMPTS + 1):
        with tempfile.TemporaryDirectory(prefix="qmig-simbench-") as workdir:
            try:
                result = _migrate_qemu(plan, Path(workdir))
            except CompletedInPrecopy as error:
                if attempt == PRECOPY_ATTEMPTS:
                    raise
                print(f"simulate_bench: {error.one_line()}; again", file=sys.stderr)
                continue
        result["attempts"] = attempt
        return result
    raise AssertionError("unreachable")


def _migrate_qemu(plan: Plan, workdir: Path) -> dict[str, Any]:
    memory_mib = plan.ram // MiB
    end = min(MiB + plan.guest_bytes, highest_safe_end(memory_mib))
    spec = GuestSpec(end=end // PAGE * PAGE)
    if plan.qemu_order == "scattered":
        spec = replace(spec, walk=scattered_walk(spec.pages))
    trace_path = workdir / "destination.trace"
    source_trace_path = workdir / "source.trace"
    destination = Machine(
        MachineConfig(
            "destination",
            memory_mib,
            spec,
            incoming="defer",
            extra_args=trace_args(trace_path, (*TRACE_EVENTS, RUN_DONE[plan.qemu_version][0])),
            qemu_version=plan.qemu_version,
        ),
        workdir,
    )
    source = Machine(
        MachineConfig(
            "source",
            memory_mib,
            spec,
            extra_args=trace_args(source_trace_path, SOURCE_TRACE_EVENTS),
            qemu_version=plan.qemu_version,
        ),
        workdir,
    )
    capabilities = {"postcopy_ram": True, "postcopy_blocktime": True}
    with destination.start(), source.start():
        destination.set_capabilities(**capabilities)
        destination.migrate_incoming(f"tcp:{LOOPBACK}:0")
        target = f"tcp:{LOOPBACK}:{destination.incoming_port()}"
        source.wait_serial(1)  # the guest is up and dirtying
        source.set_capabilities(**capabilities)
        source.set_parameters(
            max_bandwidth=plan.bandwidth,
            max_postcopy_bandwidth=plan.bandwidth,
            downtime_limit=1,  # keep precopy from completing on its own
        )
        source.migrate(target)
        _switch_after_first_pass(source, plan.timeout)
        source_info = source.wait_migration(timeout=plan.timeout)
        destination_info = destination.wait_migration(timeout=plan.timeout)
        destination.wait_runstate("running")
        destination.stop()
        dump = destination.pmemsave(spec.start, spec.end - spec.start, workdir / "dest.ram")
        verify_counters(dump, spec.start, spec)  # raises VerificationError
    ram = source_info.get("ram", {})
    total_s = source_info.get("total-time", 0) / 1000
    sent = ram.get("normal", 0) + ram.get("duplicate", 0)
    trace = _read_trace(trace_path)
    source_trace = _read_trace(source_trace_path)
    if not any(line.event == "postcopy_start_set_run" for line in source_trace):
        raise CompletedInPrecopy("QEMU", "the migration completed in precopy, before postcopy")
    faults = traced(trace)
    groups = fault_groups_ns(source_trace, faults)
    return {
        "verified": True,
        "total_s": round(total_s, 3),
        "downtime_ms": stop_to_run_ms(source_trace, trace, RUN_DONE[plan.qemu_version]),
        "qemu_downtime_ms": source_info.get("downtime"),  # its own: stop → package sent
        "pages_sent": sent,
        "pages_per_s": round(sent / total_s) if total_s else None,
        "precopy_bytes": ram.get("precopy-bytes"),
        "postcopy_bytes": ram.get("postcopy-bytes"),
        "postcopy_requests": ram.get("postcopy-requests"),
        "faults": len(faults.faults),
        "late_faults": faults.late,
        "fault_latency_us": summary_us(faults.latencies_ns),
        **{name: count_p50_p99(samples) for name, samples in zip(GROUPS, groups, strict=True)},
        "blocktime_ms": destination_info.get("postcopy-blocktime"),
        "vcpu_blocktime_ms": destination_info.get("postcopy-vcpu-blocktime"),
        "dirty_sync_count": ram.get("dirty-sync-count"),
        "guest_range": [spec.start, spec.end],
    }


def _switch_after_first_pass(source: Machine, timeout: float) -> None:
    """QEMU syncs the dirty bitmap once at setup and once after every pass: switch at 2."""
    deadline = time.monotonic() + timeout
    while True:
        info = source.query_migrate()
        status = info.get("status")
        if status not in ("setup", "active"):
            raise QemuError("source: migration", f"{status} before postcopy could start")
        if info.get("ram", {}).get("dirty-sync-count", 0) >= 2:
            source.start_postcopy()
            return
        if time.monotonic() > deadline:
            raise QemuError("source: migration", "the first precopy pass did not end")
        time.sleep(0.01)


def _read_trace(path: Path) -> list[TraceLine]:
    """A QEMU trace log's stamped lines (none if QEMU wrote no log)."""
    if not path.exists():
        return []
    with path.open(encoding="utf-8", errors="replace") as lines:
        return list(trace_lines(lines))


def stop_to_run_ms(
    source_trace: list[TraceLine],
    destination_trace: list[TraceLine],
    run_done: tuple[str, str],
) -> float | None:
    """Source stop → destination RUN, as qmig measures it: from the source's
    postcopy_start_set_run (right before vm_stop) to the end of the destination's RUN
    handler (after vm_start; ``run_done``: its trace event and argument, see RUN_DONE).
    Both traces use the same host's wall clock."""
    stops = [line.at_ns for line in source_trace if line.event == "postcopy_start_set_run"]
    runs = [
        line.at_ns for line in destination_trace if (line.event, line.arguments.strip()) == run_done
    ]
    if not stops or not runs:
        return None
    return round((runs[0] - stops[0]) / 1e6, 2)


def traced(trace: list[TraceLine]) -> TracedFaults:
    """The destination's faults, each timed fault → placed (qmig.qemu.trace: a fault on a
    page placed before the fault thread read it is left out, as qmig leaves it out)."""
    return traced_faults(trace, PAGE)


def fault_groups_ns(source_trace: list[TraceLine], faults: TracedFaults) -> tuple[list[int], ...]:
    """The destination's fault latencies split by what the source's migration thread found
    when it took the fault's request off its queue: (page sent already, page sent for the
    request). A request the source's trace does not name (not taken off the queue before
    the end) is in neither."""
    verdicts: dict[tuple[str, int], bool] = {}
    for line in source_trace:
        already = QUEUED_VERDICTS.get(line.event)
        match = QUEUED_PAGE.match(line.arguments)
        if already is not None and match:
            # The first verdict is the first request's: a repeat finds the page sent for it.
            page = (match.group(1), int(match.group(2), 16))
            verdicts.setdefault(page, already)
    groups: tuple[list[int], ...] = ([], [])
    for fault in faults.faults:
        already = None if fault.page is None else verdicts.get(fault.page)
        if already is not None:
            groups[0 if already else 1].append(fault.latency_ns)
    return groups


def summary_us(samples_ns: list[int]) -> dict[str, float]:
    """p50, p99 and max of ``samples_ns``, in µs (0.0 each when there are none)."""
    figures = percentiles_us(samples_ns)
    del figures["count"]
    return figures


# --- report ----------------------------------------------------------------------------------


Key = str | tuple[str, str]  # a field, or a field of a sub-dict
ROWS: list[tuple[str, Key]] = [
    ("total time (s)", "total_s"),
    ("downtime (ms)", "downtime_ms"),
    ("pages sent", "pages_sent"),
    ("pages/s", "pages_per_s"),
    ("postcopy requests", "postcopy_requests"),
    ("faults measured", "faults"),
    ("faults left out: page placed before read", "late_faults"),
    ("fault latency p50 (µs)", ("fault_latency_us", "p50")),
    ("fault latency p99 (µs)", ("fault_latency_us", "p99")),
    ("fault latency max (µs)", ("fault_latency_us", "max")),
    # By what the request found on the source (QEMU: its get_queued_page[_not_dirty] trace;
    # qmig: its source's verdict per request, see run_qmig).
    ("requests: page sent already", ("page_already_sent", "count")),
    ("  fault latency p50 (µs)", ("page_already_sent", "p50")),
    ("  fault latency p99 (µs)", ("page_already_sent", "p99")),
    ("requests: page sent for the request", ("page_sent_for_request", "count")),
    ("  fault latency p50 (µs)", ("page_sent_for_request", "p50")),
    ("  fault latency p99 (µs)", ("page_sent_for_request", "p99")),
    ("requests: placed before the answer (qmig)", "placed_before_answer"),
    ("blocktime (ms)", "blocktime_ms"),
]
# A request's round trip, by its parts (µs), as ``qmig simulate --json`` has them: the
# destination's fault → its REQ_PAGES on the wire; → read by the source (on the wire, and until
# the source looks); the source's read → the page on the wire; the page on the wire → placed
# (queued behind the bytes sent before it, then read and placed), of which the last part is the
# page read off the wire → placed (by the destination's C receive thread; none without it).
# What is left of the fault latency is waking the faulting thread. QEMU's trace has no such
# split: its cells stay empty.
LEGS: list[tuple[str, str]] = [
    ("fault → request on the wire", "request_sent_us"),
    ("request on the wire → read", "request_read_us"),
    ("request read → page on the wire", "request_served_us"),
    ("page on the wire → placed", "page_delivered_us"),
    ("  of which off the wire → placed", "page_placed_us"),
]
SPLIT_ROWS: list[tuple[str, Key]] = [
    (f"{label} {figure} (µs)", (key, figure)) for label, key in LEGS for figure in ("p50", "p99")
]
# The qmig runs, by --paths: the C paths of a fault's round trip, and all of them in Python.
PATHS = {"c": ("qmig", True), "python": ("qmig_python", False)}
# Runs asked for on top, each printed in a column of its own after the table.
EXTRA_RUNS = {
    "qmig_preempt": "qmig with postcopy-preempt (--preempt, C paths)",
    "qmig_simulate_buffers": "qmig with simulate's socket buffers (C paths)",
    "qmig_python_sweep": "qmig with the background sweep in Python (--no-fast-sweep, C paths)",
    "qemu_again": "QEMU again, the same migration a second time (--qemu-again)",
}


def _name(key: Key) -> str:
    return key if isinstance(key, str) else f"{key[0]}.{key[1]}"


def _value(side: dict[str, Any], key: Key) -> Any:
    if isinstance(key, tuple):
        figures = side.get(key[0]) or {}
        if key[1] == "count":
            return figures.get("count")
        return None if figures.get("count") == 0 else figures.get(key[1])  # nothing measured
    return side.get(key)


def ratios(qmig: dict[str, Any], qemu: dict[str, Any]) -> dict[str, float | None]:
    """qmig / QEMU for every figure both have (above 1: qmig more; for pages/s, better)."""
    out: dict[str, float | None] = {}
    for _label, key in ROWS:
        ours, theirs = _value(qmig, key), _value(qemu, key)
        if isinstance(ours, int | float) and isinstance(theirs, int | float) and theirs:
            out[_name(key)] = round(ours / theirs, 3)
        else:
            out[_name(key)] = None
    return out


def _cap(bandwidth: int) -> str:
    return f"{bandwidth // MiB} MiB/s" if bandwidth else "no cap"


def print_table(result: dict[str, Any]) -> None:
    plan = result["plan"]
    qemu, c_paths, python_paths = result["qemu"], result["qmig"], result.get("qmig_python")
    print(
        f"{plan['ram'] // MiB} MiB guest, {plan['guest_bytes'] // MiB} MiB of it written, "
        f"{_cap(plan['bandwidth'])} precopy and postcopy, postcopy after one pass"
    )
    width = 46
    heads = (
        f"QEMU {plan['qemu_version']}",
        "qmig (C paths)",
        "qmig (Python paths)",
        "C/QEMU",
        "Python/QEMU",
    )
    print(f"{'':{width}}{heads[0]:>12}{heads[1]:>16}{heads[2]:>21}{heads[3]:>9}{heads[4]:>13}")
    python_ratio = result.get("ratio_python") or {}
    for label, key in ROWS + SPLIT_ROWS:
        cells = [_cell(side and _value(side, key)) for side in (qemu, c_paths, python_paths)]
        ratio = (_cell(result["ratio"].get(_name(key))), _cell(python_ratio.get(_name(key))))
        print(
            f"{label:{width}}{cells[0]:>12}{cells[1]:>16}{cells[2]:>21}{ratio[0]:>9}{ratio[1]:>13}"
        )
    for name, title in EXTRA_RUNS.items():
        if result.get(name):
            print(f"{title}, same run (and its ratio to QEMU):")
            extra_ratio = ratios(result[name], qemu or {})
            for label, key in ROWS + SPLIT_ROWS:
                value, extra = _value(result[name], key), extra_ratio.get(_name(key))
                print(f"{label:{width}}{_cell(value):>12}{_cell(extra):>9}")
    sides = [(qemu, "QEMU"), (c_paths, "qmig (C paths)"), (python_paths, "qmig (Python paths)")]
    sides += [(result.get(name), title) for name, title in EXTRA_RUNS.items()]
    for side, name in sides:
        if side and not side.get("verified"):
            print(f"{name}: NOT verified")


# The figures --runs sums up over its runs: each side's median.
MEDIAN_ROWS: list[tuple[str, Key]] = [
    ("fault latency p50 (µs)", ("fault_latency_us", "p50")),
    ("total time (s)", "total_s"),
    ("downtime (ms)", "downtime_ms"),
    ("pages/s", "pages_per_s"),
]


LATENCY = ("fault_latency_us", "p50")


def medians(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per side that ran (QEMU, each qmig run), per MEDIAN_ROWS figure: every run's value
    and their median; for the fault latency p50 also in how many runs it was at most QEMU's
    in the same run (``at_most_qemu``, of ``paired`` runs where both have one)."""
    out: dict[str, dict[str, Any]] = {}
    for side in ("qemu", *(name for name, _ in PATHS.values()), *EXTRA_RUNS):
        runs = [result[side] for result in results if result.get(side)]
        if not runs:
            continue
        out[side] = {}
        for _label, key in MEDIAN_ROWS:
            values = [value for run in runs if (value := _value(run, key)) is not None]
            out[side][_name(key)] = {
                "runs": values,
                "median": statistics.median(values) if values else None,
            }
        if side != "qemu":
            out[side][_name(LATENCY)].update(_paired_with_qemu(results, side))
    return out


def _paired_with_qemu(results: list[dict[str, Any]], side: str) -> dict[str, int]:
    """In how many runs ``side``'s fault latency p50 was at most QEMU's of the same run.
    The same count for a second QEMU run (--qemu-again) shows how often the criterion holds
    between two runs of one and the same system: the noise of a single run's p50."""
    pairs = [
        (_value(result[side], LATENCY), _value(result["qemu"], LATENCY))
        for result in results
        if result.get(side) and result.get("qemu")
    ]
    pairs = [(ours, theirs) for ours, theirs in pairs if ours is not None and theirs is not None]
    return {"paired": len(pairs), "at_most_qemu": sum(ours <= theirs for ours, theirs in pairs)}


def print_medians(summary: dict[str, dict[str, Any]]) -> None:
    """--runs: each side's runs and median per figure, and the median's ratio to QEMU's."""
    qemu = summary.get("qemu", {})
    for label, key in MEDIAN_ROWS:
        print(f"{label}, every run, median, median / QEMU's:")
        for side, figures in summary.items():
            entry = figures[_name(key)]
            theirs = qemu.get(_name(key), {}).get("median")
            ratio = entry["median"] / theirs if entry["median"] is not None and theirs else None
            runs = " ".join(_cell(value) for value in entry["runs"])
            paired = (
                f"   at most QEMU's in {entry['at_most_qemu']} of {entry['paired']} runs"
                if entry.get("paired")
                else ""
            )
            print(f"  {side:20} {runs}   median {_cell(entry['median'])}   {_cell(ratio)}{paired}")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--ram", type=parse_size, default=1 << 30, help="guest RAM (default 1G)")
    parser.add_argument(
        "--bandwidth",
        type=int,
        default=QEMU_DEFAULT_BANDWIDTH_MIB,
        metavar="MIB/S",
        help="cap for precopy and postcopy, both sides; 0: none "
        f"(default {QEMU_DEFAULT_BANDWIDTH_MIB})",
    )
    parser.add_argument(
        "--guest-mib",
        type=int,
        default=99,
        help="MiB the QEMU guest writes, and qmig's non-zero share (default 99)",
    )
    parser.add_argument(
        "--dirty-rate",
        type=float,
        default=50000.0,
        help="qmig source: pages/s dirtied within the working set (default 50000)",
    )
    parser.add_argument(
        "--workload",
        choices=["sequential", "random", "hotset"],
        default="sequential",
        help="qmig destination vCPUs' pattern (default sequential, like the QEMU guest)",
    )
    parser.add_argument(
        "--dirty-pattern",
        choices=["sequential", "random"],
        default="sequential",
        help="how qmig's source guest picks the pages it dirties (default sequential, like "
        "the QEMU guest)",
    )
    parser.add_argument("--vcpus", type=int, default=1, help="qmig destination vCPUs (1)")
    parser.add_argument(
        "--qemu-version",
        choices=["7.2", "10.0"],
        default="7.2",
        help="the QEMU on both sides, and the wire qmig speaks: the system's 7.2, or the "
        "private 10.0 (scripts/fetch-qemu-10.0) (default 7.2)",
    )
    parser.add_argument(
        "--qemu-order",
        choices=["address", "scattered"],
        default="address",
        help="the order of the QEMU guest's pass over its pages: address order, or "
        "scattered over its range (each page once a pass; pair with --workload random and "
        "--dirty-pattern random) (default address)",
    )
    parser.add_argument("--only", choices=["qmig", "qemu"], help="run one side only")
    parser.add_argument(
        "--paths",
        choices=["both", "c", "python"],
        default="both",
        help="qmig's fault round trip in C (the default paths), in Python (--no-fast-path "
        "--no-fast-answer, as before the C paths), or both for a before/after (default both)",
    )
    parser.add_argument(
        "--preempt",
        action="store_true",
        help="also run qmig with postcopy-preempt (requested pages on their own channel)",
    )
    parser.add_argument(
        "--simulate-buffers",
        action="store_true",
        help="also run qmig with simulate's own socket buffers (its --send-buffer and "
        "--receive-buffer defaults) instead of the kernel's, which QEMU and every other qmig "
        "run here use",
    )
    parser.add_argument(
        "--python-sweep",
        action="store_true",
        help="also run qmig with postcopy's background pages built in Python "
        "(--no-fast-sweep), as before the C sweep",
    )
    parser.add_argument(
        "--qemu-again",
        action="store_true",
        help="also run QEMU a second time each run: with --runs, how often one QEMU run's "
        "fault latency p50 is at most another's, the yardstick for qmig's",
    )
    parser.add_argument(
        "--runs",
        type=int,
        default=1,
        help="run everything this many times, in turn, and sum up each side's figures "
        "(every run's and the median); the table is the last run's (default 1)",
    )
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout")
    args = parser.parse_args()
    if args.ram % MiB or args.ram < 64 * MiB:
        print("simulate_bench: error: --ram must be whole MiB, at least 64M", file=sys.stderr)
        return 1
    if args.bandwidth < 0:
        print("simulate_bench: error: --bandwidth must be 0 (no cap) or more", file=sys.stderr)
        return 1
    plan = Plan(
        ram=args.ram,
        bandwidth=args.bandwidth * MiB,
        guest_bytes=min(args.guest_mib * MiB, highest_safe_end(args.ram // MiB) - MiB),
        dirty_rate=args.dirty_rate,
        timeout=args.timeout,
        workload=args.workload,
        dirty_pattern=args.dirty_pattern,
        vcpus=args.vcpus,
        qemu_order=args.qemu_order,
        qemu_version=args.qemu_version,
    )
    if args.runs < 1:
        print("simulate_bench: error: --runs must be at least 1", file=sys.stderr)
        return 1
    results = []
    for run in range(args.runs):
        if args.runs > 1:
            print(f"run {run + 1} of {args.runs}", file=sys.stderr)
        result = run_once(plan, args)
        if result is None:
            return 1
        results.append(result)
    result = results[-1]
    if args.runs > 1:
        result["runs"] = args.runs
        result["medians"] = medians(results)
    if args.json:
        json.dump(result, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print_table(result)
        if args.runs > 1:
            print_medians(result["medians"])
    return 0


def run_once(plan: Plan, args: argparse.Namespace) -> dict[str, Any] | None:
    """Every run asked for, once: the result (None: one failed, said on stderr)."""
    result: dict[str, Any] = {"plan": vars(plan), "qmig": None, "qmig_python": None, "qemu": None}
    try:
        if args.only != "qemu":
            for paths, (name, c_paths) in PATHS.items():
                if args.paths in ("both", paths):
                    result[name] = run_qmig(plan, c_paths=c_paths)
            if args.preempt:
                result["qmig_preempt"] = run_qmig(plan, preempt=True)
            if args.simulate_buffers:
                result["qmig_simulate_buffers"] = run_qmig(plan, kernel_buffers=False)
            if args.python_sweep:
                result["qmig_python_sweep"] = run_qmig(plan, python_sweep=True)
        if args.only != "qmig":
            result["qemu"] = run_qemu(plan)
            if args.qemu_again:
                result["qemu_again"] = run_qemu(plan)
    except QmigError as error:
        print(f"simulate_bench: error: {error.one_line()}", file=sys.stderr)
        return None
    result["ratio"] = ratios(result["qmig"] or {}, result["qemu"] or {})
    result["ratio_python"] = ratios(result["qmig_python"] or {}, result["qemu"] or {})
    return result


if __name__ == "__main__":
    sys.exit(main())
