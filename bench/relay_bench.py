#!/usr/bin/env python3
"""What ``qmig capture`` costs a real QEMU → QEMU postcopy migration.

Run as root from the repository::

    .venv/bin/python bench/relay_bench.py              # 3 rounds of each, ~1 minute
    .venv/bin/python bench/relay_bench.py --json

Each round migrates the same dirtying test guest twice, once over direct TCP and once
through the recording relay, alternating which goes first so that drift in the host's load
falls on both. Per migration it reports QEMU's own figures: the source's ``total-time`` and
the destination's ``postcopy-blocktime`` (how long its vCPUs waited for pages), plus the
postcopy requests. The baseline is the direct migration measured in the same run. Nothing
is asserted: on a shared host the spread between rounds is the noise floor.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from qmig.qemu.guest import MIB, GuestSpec
from qmig.qemu.scenario import PostcopyPlan, run_postcopy


def one(plan: PostcopyPlan, relay: bool, workdir: Path) -> dict[str, Any]:
    workdir.mkdir(parents=True)
    capture = workdir / "capture" if relay else None
    result = run_postcopy(replace(plan, capture_dir=capture), workdir)
    source_ram = result.source_info["ram"]
    return {
        "relay": relay,
        "total_ms": result.source_info["total-time"],
        "blocktime_ms": result.destination_info.get("postcopy-blocktime", 0),
        "postcopy_requests": source_ram["postcopy-requests"],
        "captured_bytes": result.capture.stream.bytes if result.capture else 0,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--memory-mib", type=int, default=128)
    parser.add_argument("--bandwidth-mib", type=int, default=32, help="precopy cap, MiB/s")
    parser.add_argument("--postcopy-bandwidth-mib", type=int, default=16)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    plan = PostcopyPlan(
        memory_mib=args.memory_mib,
        guest=GuestSpec(end=min(100, args.memory_mib - 24) * MIB),
        max_bandwidth=args.bandwidth_mib * MIB,
        max_postcopy_bandwidth=args.postcopy_bandwidth_mib * MIB,
        precopy_seconds=1.0,
    )
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="qmig-relay-bench-") as temp:
        for round_number in range(args.rounds):
            order = (False, True) if round_number % 2 == 0 else (True, False)
            for relay in order:
                name = f"{round_number}-{'relay' if relay else 'direct'}"
                run = one(plan, relay, Path(temp) / name)
                runs.append(run)
                if not args.json:
                    print(
                        f"round {round_number} {'relay ' if relay else 'direct'}: "
                        f"total {run['total_ms']} ms, blocktime {run['blocktime_ms']} ms, "
                        f"{run['postcopy_requests']} requests",
                        file=sys.stderr,
                    )

    def summary(relay: bool) -> dict[str, float]:
        mine = [run for run in runs if run["relay"] is relay]
        return {
            key: statistics.median(run[key] for run in mine)
            for key in ("total_ms", "blocktime_ms", "postcopy_requests")
        }

    direct, relayed = summary(False), summary(True)
    report = {
        "rounds": args.rounds,
        "memory_mib": args.memory_mib,
        "direct_median": direct,
        "relay_median": relayed,
        "total_ratio": round(relayed["total_ms"] / direct["total_ms"], 3),
        "runs": runs,
    }
    if args.json:
        json.dump(report, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print(f"{'':8} {'total ms':>10} {'blocktime ms':>13} {'requests':>9}")
        for label, figures in (("direct", direct), ("relay", relayed)):
            print(
                f"{label:8} {figures['total_ms']:>10.0f} {figures['blocktime_ms']:>13.0f} "
                f"{figures['postcopy_requests']:>9.0f}"
            )
        print(f"relay / direct total time: {report['total_ratio']:.3f} (median of each)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
