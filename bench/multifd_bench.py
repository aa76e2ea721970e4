#!/usr/bin/env python3
"""Multifd throughput: a real QEMU 10.0 source into ``qmig receive --multifd 4``, into a
single-channel ``qmig receive``, and into a QEMU 10.0 destination with the same channels and
capabilities; and ``qmig inspect`` of a multifd capture against ``cat`` of its files.

Run as root (userfaultfd) from the repository::

    .venv/bin/python bench/multifd_bench.py              # 512 MiB guests, a minute or two
    .venv/bin/python bench/multifd_bench.py --json       # one JSON document

The source's guest first writes every page of its RAM (one pass of the test guest's counters
over all of it), then is stopped: each migration is a single pass of data pages, so the
figures compare the receiving sides and not the convergence of a busy guest; its bandwidth is
not capped (QEMU's default max-bandwidth is 128 MiB/s). The rate is the
RAM size over the source's ``total-time`` (its migration, setup to completion), with QEMU's
own ``mbps`` beside it; ``qmig receive``'s figure is its ``total_s`` (first byte to end).
The inspect figure times ``qmig inspect DIR --json`` of a capture of the QEMU → QEMU multifd
migration, and ``cat`` of the folder's files to /dev/null (the disk-cache floor).

Nothing is asserted: the figures are printed. On a shared host they are noisy; run twice.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _qemu_pair import QEMU, inspect_json, machine, qemu_destination, qmig_receive

from qmig.qemu.guest import MIB, GuestSpec, highest_safe_end
from qmig.qemu.machine import Machine

TIMEOUT = 300.0
UNLIMITED = 1 << 40  # bytes/s


def _source(ram_mib: int, workdir: Path, channels: int) -> Machine:
    """A source whose guest has written all its RAM once, stopped, multifd set up."""
    spec = GuestSpec(end=highest_safe_end(ram_mib))
    source = machine("source", ram_mib, spec, workdir).start()
    source.wait_serial(1)  # one pass of the counters: every page holds data
    source.stop()
    source.set_parameters(max_bandwidth=UNLIMITED)  # QEMU's default caps it at 128 MiB/s
    if channels:
        source.set_capabilities(multifd=True)
        source.set_parameters(multifd_channels=channels)
    return source


def _figures(info: dict[str, Any], ram_mib: int) -> dict[str, Any]:
    total_ms = info.get("total-time", 0)
    return {
        "total_ms": total_ms,
        "mib_s": round(ram_mib / (total_ms / 1000), 1) if total_ms else None,
        "qemu_mbps": round(info.get("ram", {}).get("mbps", 0.0), 1),
    }


def into_qmig(ram_mib: int, channels: int, workdir: Path) -> dict[str, Any]:
    args = ["--workload", "none", "--accept-timeout", "120", "--qemu-version", QEMU]
    if channels:
        args += ["--multifd", str(channels)]

    def migrate(uri: str) -> dict[str, Any]:
        with _source(ram_mib, workdir, channels) as source:
            source.migrate(uri)
            return source.wait_migration(timeout=TIMEOUT)

    info, summary = qmig_receive(args, migrate, TIMEOUT)
    return {
        **_figures(info, ram_mib),
        "qmig_total_s": summary["total_s"],
        "pages": summary["multifd_pages"] or summary["preempt_pages"]["main"],
    }


def into_qemu(ram_mib: int, channels: int, workdir: Path, capture: Path | None) -> dict[str, Any]:
    capabilities = {"multifd": True} if channels else {}
    parameters = {"multifd_channels": channels} if channels else {}
    with (
        qemu_destination(
            ram_mib, workdir, TIMEOUT, capabilities=capabilities, parameters=parameters,
            capture=capture, relay={"multifd": channels},
        ) as incoming,
        _source(ram_mib, workdir, channels) as source,
    ):  # fmt: skip
        source.migrate(incoming.uri)
        info = source.wait_migration(timeout=TIMEOUT)
        incoming.destination.wait_migration(timeout=TIMEOUT)
    return _figures(info, ram_mib)


def inspect_vs_cat(folder: Path) -> dict[str, Any]:
    files = sorted(str(path) for path in folder.glob("*.bin"))
    size = sum(Path(path).stat().st_size for path in files)
    began = time.perf_counter()
    subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)
    cat_s = time.perf_counter() - began
    began = time.perf_counter()
    report = inspect_json(folder, TIMEOUT)
    inspect_s = time.perf_counter() - began
    return {
        "bytes": size,
        "cat_s": round(cat_s, 3),
        "cat_mib_s": round(size / MIB / cat_s, 1),
        "inspect_s": round(inspect_s, 3),
        "inspect_mib_s": round(size / MIB / inspect_s, 1),
        "pages": report["multifd"]["pages"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ram", type=int, default=512, metavar="MIB")
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results: dict[str, Any] = {"ram_mib": args.ram, "channels": args.channels}
    with tempfile.TemporaryDirectory() as work:
        results["qemu_to_qmig_multifd"] = into_qmig(args.ram, args.channels, Path(work))
    with tempfile.TemporaryDirectory() as work:
        results["qemu_to_qmig_single"] = into_qmig(args.ram, 0, Path(work))
    with tempfile.TemporaryDirectory() as work:
        results["qemu_to_qemu_multifd"] = into_qemu(args.ram, args.channels, Path(work), None)
    with tempfile.TemporaryDirectory() as work:
        results["qemu_to_qemu_single"] = into_qemu(args.ram, 0, Path(work), None)
    with tempfile.TemporaryDirectory() as work:
        folder = Path(work) / "capture"
        results["qemu_to_qemu_multifd_captured"] = into_qemu(
            args.ram, args.channels, Path(work), folder
        )
        results["inspect_capture"] = inspect_vs_cat(folder)
    if args.json:
        json.dump(results, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    print(f"{args.ram} MiB guest (every page data), QEMU {QEMU} source, stopped")
    for key in (
        "qemu_to_qmig_multifd",
        "qemu_to_qmig_single",
        "qemu_to_qemu_multifd",
        "qemu_to_qemu_single",
        "qemu_to_qemu_multifd_captured",
    ):
        figures = results[key]
        extra = f"  (qmig total {figures['qmig_total_s']} s)" if "qmig_total_s" in figures else ""
        print(
            f"{key:<30} {figures['total_ms']:>7} ms  {figures['mib_s']!s:>8} MiB/s  "
            f"QEMU mbps {figures['qemu_mbps']}{extra}"
        )
    inspect = results["inspect_capture"]
    print(
        f"{'inspect of the capture':<30} {inspect['inspect_s']:>7} s  "
        f"{inspect['inspect_mib_s']:>8} MiB/s  (cat {inspect['cat_s']} s, "
        f"{inspect['cat_mib_s']} MiB/s, {inspect['bytes']:,} bytes)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
