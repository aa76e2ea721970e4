#!/usr/bin/env python3
"""Multifd as the sending end: ``qmig replay --multifd N`` into a real QEMU 10.0, against the
same replay on one channel and against QEMU 10.0 → QEMU 10.0 with the same channels and caps.

Run from the repository (a few minutes; QEMU 10.0 from its private install)::

    .venv/bin/python bench/multifd_send_bench.py              # 256 MiB guest, 4 channels
    .venv/bin/python bench/multifd_send_bench.py --json       # one JSON document

A QEMU 10.0 guest (machine type ``pc``, so pc-i440fx-10.0: syncs per round, zero pages in
the packets) runs qmig's test guest, which writes a byte into every page of its first
``--dirty`` MiB; it is stopped and migrated by QEMU; the destination that received it saves
it to a stream file (``migrate file:``), which every qmig run replays. Each run goes into a
fresh destination started with ``-incoming defer``:

* ``qemu_to_qemu``: the stopped guest migrated by QEMU itself, multifd with N channels;
* ``qmig_multifd``: ``qmig replay FILE --multifd N`` (the destination with the same caps);
* ``qmig_single``: ``qmig replay FILE`` on the main channel alone (no multifd on either side).

And qmig to qmig, without QEMU (``--simulate-only`` runs only these):

* ``simulate_multifd``: ``qmig simulate --multifd N --precopy-only`` of a guest of the same
  size (qmig's generated RAM, half of it zero pages; a quiet guest, one pass);
* ``simulate_single``: the same ``qmig simulate`` on the main channel alone.

Both verify the destination's RAM page by page; their figure is the source's ``total_s``.

No side is capped (QEMU's ``max-bandwidth`` is raised). Each figure is the sender's own
account (QEMU's ``total-time``, the replay's ``total_s``), the RAM bytes it moved, and MiB/s
over the guest's size. Every destination's RAM is compared with the source's. Nothing is
asserted beyond that; on a shared 2-core host the figures are noisy (the destination's N
receive threads compete with the sender): run twice.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from _qemu_pair import QEMU, Incoming, machine, qemu_destination

from qmig.qemu.guest import MIB, GuestSpec
from qmig.qemu.machine import Machine

TIMEOUT = 600.0
UNCAPPED = 1 << 40  # bytes per second
SENDERS = ("qemu_to_qemu", "qmig_multifd", "qmig_single", "simulate_multifd", "simulate_single")


def _destination(
    ram_mib: int, spec: GuestSpec, workdir: Path, name: str, channels: int | None
) -> AbstractContextManager[Incoming]:
    multifd = channels is not None
    return qemu_destination(
        ram_mib, workdir, TIMEOUT, name=name, spec=spec,
        capabilities={"multifd": True} if multifd else {},
        parameters={"multifd_channels": channels} if multifd else None,
    )  # fmt: skip


def _same_ram(machine: Machine, ram_mib: int, expected: bytes, workdir: Path) -> bool:
    machine.wait_migration(timeout=TIMEOUT)
    return machine.pmemsave(0, ram_mib * MIB, workdir / f"{machine.name}.ram") == expected


def qemu_pair(
    ram_mib: int, spec: GuestSpec, channels: int, workdir: Path, saved: Path
) -> tuple[dict[str, Any], bytes]:
    """QEMU → QEMU with multifd; also saves the stopped guest to ``saved`` for the replays."""
    with machine("source", ram_mib, spec, workdir) as source:
        source.wait_serial(2, timeout=TIMEOUT)
        source.stop()
        ram = source.pmemsave(0, ram_mib * MIB, workdir / "source.ram")
        with _destination(ram_mib, spec, workdir, "qemu-destination", channels) as incoming:
            destination = incoming.destination
            source.set_capabilities(multifd=True)
            # Uncapped, as the replays are (QEMU's default max-bandwidth is 128 MiB/s).
            source.set_parameters(multifd_channels=channels, max_bandwidth=UNCAPPED)
            source.migrate(incoming.uri)
            info = source.wait_migration(timeout=TIMEOUT)
            same = _same_ram(destination, ram_mib, ram, workdir)
            # The paused destination now holds the same guest: it saves the stream file the
            # replays send (QEMU migrates a guest out only once).
            destination.set_capabilities(multifd=False)
            destination.migrate(f"file:{saved}")
            destination.wait_migration(timeout=TIMEOUT)
    ram_info = info.get("ram", {})
    seconds = info["total-time"] / 1000
    return {
        "channels": channels,
        "total_s": round(seconds, 3),
        "mib_per_s": round(ram_mib / seconds, 1),
        "ram_bytes": ram_info.get("transferred"),
        "multifd_bytes": ram_info.get("multifd-bytes"),
        "same_ram": same,
    }, ram


def qmig_replay(
    ram_mib: int, spec: GuestSpec, channels: int | None, workdir: Path, saved: Path, ram: bytes
) -> dict[str, Any]:
    name = "multifd-destination" if channels else "single-destination"
    with _destination(ram_mib, spec, workdir, name, channels) as incoming:
        uri = incoming.uri
        args = ["--multifd", str(channels)] if channels else []
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", "qmig", "replay", str(saved), "--to", uri, "--json",
             "--qemu-version", QEMU, *args],
            capture_output=True, text=True, timeout=TIMEOUT,
        )  # fmt: skip
        wall = time.monotonic() - started
        if result.returncode:
            raise SystemExit(f"qmig replay failed: {result.stderr.strip()}")
        summary = json.loads(result.stdout)
        same = _same_ram(incoming.destination, ram_mib, ram, workdir)
    seconds = summary["total_s"]
    multifd = summary.get("multifd") or {}
    return {
        "channels": channels or 0,
        "total_s": seconds,
        "mib_per_s": round(ram_mib / seconds, 1),
        "ram_bytes": summary["precopy_bytes"],
        "multifd_bytes": sum(multifd.get("channel_bytes", [])) or None,
        "process_s": round(wall, 3),  # the CLI as a user runs it: start-up and loading too
        "same_ram": same,
    }


def qmig_simulate(ram_mib: int, channels: int | None) -> dict[str, Any]:
    args = ["--multifd", str(channels)] if channels else []
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "qmig", "simulate", "--ram", f"{ram_mib}M", "--precopy-only",
         "--dirty-rate", "0", "--qemu-version", QEMU, "--json", *args],
        capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    wall = time.monotonic() - started
    if result.returncode:
        raise SystemExit(f"qmig simulate failed: {result.stderr.strip()}")
    summary = json.loads(result.stdout)
    seconds = summary["total_s"]
    sent = (summary.get("multifd") or {}).get("sent") or {}
    return {
        "channels": channels or 0,
        "total_s": seconds,
        "mib_per_s": round(ram_mib / seconds, 1),
        "ram_bytes": summary["precopy"]["bytes"],
        "multifd_bytes": sum(sent.get("channel_bytes", [])) or None,
        "process_s": round(wall, 3),
        "same_ram": summary["verified"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ram", type=int, default=256, metavar="MIB")
    parser.add_argument("--dirty", type=int, default=192, metavar="MIB")
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--simulate-only", action="store_true", help="only the qmig simulate rows (no QEMU)"
    )
    args = parser.parse_args()
    spec = GuestSpec(end=args.dirty * MIB)
    results: dict[str, Any] = {"ram_mib": args.ram, "dirty_mib": args.dirty - 1}
    with tempfile.TemporaryDirectory() as work:
        workdir = Path(work)
        saved = workdir / "saved.stream"
        if not args.simulate_only:
            results["qemu_to_qemu"], ram = qemu_pair(args.ram, spec, args.channels, workdir, saved)
            results["qmig_multifd"] = qmig_replay(
                args.ram, spec, args.channels, workdir, saved, ram
            )
            results["qmig_single"] = qmig_replay(args.ram, spec, None, workdir, saved, ram)
    results["simulate_multifd"] = qmig_simulate(args.ram, args.channels)
    results["simulate_single"] = qmig_simulate(args.ram, None)
    if args.json:
        json.dump(results, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    if args.simulate_only:
        print(f"guest {args.ram} MiB, qmig simulate (QEMU {QEMU} wire), {args.channels} channels")
    else:
        print(f"guest {args.ram} MiB ({args.dirty - 1} MiB written), QEMU {QEMU} destinations")
    columns = ("channels", "total_s", "mib_per_s", "ram_bytes", "multifd_bytes", "same_ram")
    print(f"{'sender':<14}" + "".join(f"{c:>15}" for c in columns))
    for key in SENDERS:
        if key not in results:
            continue
        row = results[key]
        print(f"{key:<14}" + "".join(f"{row.get(c)!s:>15}" for c in columns))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
