#!/usr/bin/env python3
"""Fault latency with and without postcopy-preempt: qmig → qmig, QEMU 10.0 → QEMU 10.0, and
a real QEMU 10.0 source into ``qmig receive``.

Run as root (userfaultfd) from the repository::

    .venv/bin/python bench/preempt_bench.py             # 128 MiB guests, about a minute
    .venv/bin/python bench/preempt_bench.py --json      # one JSON document

Each pair migrates with the same guest size, the same postcopy cap (``--bandwidth``
MiB/s) and the same capabilities, once without and once with ``postcopy-preempt`` (QEMU:
``postcopy-blocktime`` on as well), the 8.0 variant (QEMU 10.0 on its current machine type,
qmig on ``pc-q35-10.0``). Socket buffers are left to the kernel's autotuning on every side,
as QEMU has them, so that background pages can queue ahead of a requested one.

The cap is where preempt matters: QEMU (and qmig's source, which caps the same way) sends
each 100 ms window's quota as one burst and then nothing on the main channel until the
next window, requested pages included, so without preempt a requested page waits for the
next window (tens of ms); with the 8.0 variant it goes out on the preempt channel as soon
as the request is read.

Figures:

* qmig → qmig: ``qmig simulate``'s fault latency (fault → page placed) p50/p99, from the
  destination's userfaultfd thread; pages on each channel; the faults split by what their
  request found on the source (``page_already_sent``: on its way; ``page_sent_for_request``),
  which is what sets the p50 without preempt.
* QEMU → QEMU: QEMU 10.0 reports no per-fault latency (10.1 adds it), so the destination
  logs its faults and placements through QEMU's trace events (:mod:`qmig.qemu.trace`), and
  ``fault_latency_us`` is QEMU's own fault → placed, the span qmig's figure measures. The
  pair is relayed through ``qmig capture`` as well, for the relay's request → answer:
  REQ_PAGES seen → the page that answered it seen (on either channel), p50/p99/max, from
  ``qmig inspect``; the requests answered on the preempt channel, on the main one after they
  were made, and in flight (the page had reached the relay before the request: sent before
  the source could know); plus the destination's ``postcopy-blocktime``. ``--no-qemu-trace``
  leaves the trace out (it costs QEMU a log line per page placed: within noise, measured).
* QEMU → qmig: ``qmig receive``'s fault → placed p50/p99.
* qmig → QEMU: the QEMU pair's capture replayed by ``qmig replay`` (same cap, same
  preempt setting) into a fresh QEMU 10.0 destination, through the same relay: the relay's
  request → answer and the destination's traced fault → placed, the measures of the
  QEMU → QEMU row with qmig's source in QEMU's place.

Nothing is asserted: the figures are printed. On a shared host they are noisy; run twice.
"""

from __future__ import annotations

import argparse
import json
import mmap
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _qemu_pair import QEMU, inspect_json, machine, qemu_destination, qmig_receive

from qmig.latency import percentiles_us
from qmig.qemu.guest import MIB, GuestSpec
from qmig.qemu.machine import Machine
from qmig.qemu.trace import fault_trace_args, traced_fault_file
from qmig.simulate import SimulationConfig, run_simulation

TIMEOUT = 180.0


def qmig_pair(ram_mib: int, bandwidth: int, preempt: bool) -> dict[str, Any]:
    config = SimulationConfig(
        blocks=[("pc.ram", ram_mib * MIB)],
        bandwidth=bandwidth * MIB,
        version=QEMU,
        machine_type="pc-q35-10.0",
        preempt=preempt,
        send_buffer=None,
        receive_buffer=None,
        vcpus=1,
    )
    summary = run_simulation(config)
    return {
        "verified": summary["verified"],
        "faults": summary["faults"],
        "fault_latency_us": summary["fault_latency_us"],
        # What the mix of faults was: pages on their way already, or sent for the request.
        "page_already_sent": summary["page_already_sent"],
        "page_sent_for_request": summary["page_sent_for_request"],
        "preempt_pages": summary["preempt_pages"]["sent"],
        "total_s": summary["total_s"],
    }


def _postcopy(source: Machine, uri: str, bandwidth: int, preempt: bool) -> dict[str, Any]:
    source.wait_serial(1)
    source.set_capabilities(postcopy_ram=True, postcopy_preempt=preempt, postcopy_blocktime=True)
    source.set_parameters(
        max_bandwidth=bandwidth * MIB, max_postcopy_bandwidth=bandwidth * MIB, downtime_limit=1
    )
    source.migrate(uri)
    time.sleep(1.0)
    source.start_postcopy()
    return source.wait_migration(timeout=TIMEOUT)


def _traced(log: Path, trace: bool) -> dict[str, Any]:
    """With ``trace``, the destination QEMU's own fault → placed, from its trace events (see
    :mod:`qmig.qemu.trace`): the span qmig's ``fault_latency_us`` measures."""
    if not trace:
        return {}
    return {"fault_latency_us": percentiles_us(traced_fault_file(log, mmap.PAGESIZE).latencies_ns)}


def _spec(ram_mib: int) -> GuestSpec:
    return GuestSpec(end=min(ram_mib // 2, 64) * MIB)


def _relayed(report: dict[str, Any]) -> dict[str, Any]:
    """The relay's figures. A request the main channel answered is either ``in_flight`` (its
    page had reached the relay before the request did: sent before the source could know)
    or ``answered_on_main`` after it (the page was on its way, or held back)."""
    latency = report["request_latency_us"]
    requests = report.get("requests", [])
    return {
        "requests": latency["count"],
        "request_to_answer_us": {
            "p50": latency["p50"],
            "p99": latency["p99"],
            "max": latency["max"],
        },
        "answered_on_preempt": (report.get("preempt") or {}).get("answered_requests", 0),
        "answered_on_main": sum(
            r["answered_on"] != "preempt" and not r["in_flight"] and r["latency_us"] is not None
            for r in requests
        ),
        "in_flight": latency["in_flight"],
    }


def _trace_args(log: Path, trace: bool) -> list[str]:
    return fault_trace_args(log) if trace else []


def qemu_pair(
    ram_mib: int, bandwidth: int, preempt: bool, workdir: Path, trace: bool = True
) -> dict[str, Any]:
    spec = _spec(ram_mib)
    out = workdir / "capture"
    capabilities = {"postcopy_ram": True, "postcopy_preempt": preempt, "postcopy_blocktime": True}
    with (
        qemu_destination(
            ram_mib, workdir, TIMEOUT, spec=spec, capabilities=capabilities, capture=out,
            relay={"preempt": preempt}, extra_args=_trace_args(workdir / "faults.log", trace),
        ) as incoming,
        machine("source", ram_mib, spec, workdir) as source,
    ):  # fmt: skip
        _postcopy(source, incoming.uri, bandwidth, preempt)
        info = incoming.destination.wait_migration(timeout=TIMEOUT)
    return {
        **_relayed(inspect_json(out, TIMEOUT)),
        **_traced(workdir / "faults.log", trace),
        "postcopy_blocktime_ms": info.get("postcopy-blocktime"),
    }


def qmig_replay_into_qemu(
    ram_mib: int, bandwidth: int, preempt: bool, workdir: Path, trace: bool = True
) -> dict[str, Any]:
    """The QEMU pair's capture (``workdir/capture``) replayed into a fresh QEMU 10.0."""
    out = workdir / "replayed"
    capabilities = {"postcopy_ram": True, "postcopy_preempt": preempt, "postcopy_blocktime": True}
    with qemu_destination(
        ram_mib, workdir, TIMEOUT, name="replayed", spec=_spec(ram_mib),
        capabilities=capabilities, capture=out, relay={"preempt": preempt},
        extra_args=_trace_args(workdir / "replayed-faults.log", trace),
    ) as incoming:  # fmt: skip
        replay = subprocess.run(
            [
                sys.executable, "-m", "qmig", "replay", str(workdir / "capture"),
                "--connect", incoming.uri, "--bandwidth", str(bandwidth), "--json",
                *(["--preempt"] if preempt else []),
            ],
            capture_output=True, text=True, timeout=TIMEOUT,
        )  # fmt: skip
        if replay.returncode:
            raise SystemExit(f"qmig replay failed: {replay.stderr.strip()}")
        incoming.destination.wait_migration(timeout=TIMEOUT)
    traced = _traced(workdir / "replayed-faults.log", trace)
    return {**_relayed(inspect_json(out, TIMEOUT)), **traced}


def qemu_into_qmig(ram_mib: int, bandwidth: int, preempt: bool, workdir: Path) -> dict[str, Any]:
    spec = _spec(ram_mib)

    def migrate(uri: str) -> None:
        with machine("source", ram_mib, spec, workdir) as source:
            _postcopy(source, uri, bandwidth, preempt)

    args = ["--accept-timeout", "60", *(["--preempt"] if preempt else [])]
    _, summary = qmig_receive(args, migrate, TIMEOUT)
    return {
        "requests": summary["requests"],
        "fault_latency_us": summary["fault_to_placed_us"],
        "preempt_pages": summary["preempt_pages"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ram", type=int, default=128, metavar="MIB")
    parser.add_argument("--bandwidth", type=int, default=16, metavar="MIB_S")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--skip-qemu", action="store_true")
    parser.add_argument(
        "--no-qemu-trace",
        action="store_true",
        help="no trace events on the QEMU destinations (no QEMU fault → placed figures)",
    )
    args = parser.parse_args()
    results: dict[str, Any] = {"ram_mib": args.ram, "bandwidth_mib_s": args.bandwidth}
    for preempt in (False, True):
        key = "preempt" if preempt else "no_preempt"
        results.setdefault("qmig_to_qmig", {})[key] = qmig_pair(args.ram, args.bandwidth, preempt)
        if not args.skip_qemu:
            with tempfile.TemporaryDirectory() as work:
                trace = not args.no_qemu_trace
                results.setdefault("qemu_to_qemu", {})[key] = qemu_pair(
                    args.ram, args.bandwidth, preempt, Path(work), trace
                )
                results.setdefault("qmig_replay_to_qemu", {})[key] = qmig_replay_into_qemu(
                    args.ram, args.bandwidth, preempt, Path(work), trace
                )
            with tempfile.TemporaryDirectory() as work:
                results.setdefault("qemu_to_qmig_receive", {})[key] = qemu_into_qmig(
                    args.ram, args.bandwidth, preempt, Path(work)
                )
    if args.json:
        json.dump(results, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        for pair in ("qmig_to_qmig", "qemu_to_qemu", "qmig_replay_to_qemu", "qemu_to_qmig_receive"):
            for key, figures in results.get(pair, {}).items():
                print(f"{pair:<22} {key:<11} {json.dumps(figures)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
