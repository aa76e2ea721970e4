#!/usr/bin/env python3
"""Capture real QEMU migrations of qmig's test guest into fixtures/ (not run in CI).

Needs qemu-system-x86_64 (Debian's 7.2 made the stored fixtures) and a few hundred MB of
temporary space; takes about a minute. Every fixture is checked before it is stored: the
destination guest passes the memory oracle, and the postcopy captures really contain discards
and page requests. Re-run it as ``.venv/bin/python scripts/make_fixtures.py [NAME ...]``.

Each fixture folder gets its data files compressed with xz and a meta.json saying how it was
made (QEMU version, full command lines, capabilities, parameters, guest, sizes and sha256 of
the uncompressed files, what was seen in it). fixtures/README.md is rewritten from those.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import lzma
import platform
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from qmig.capture import INDEX_NAME, RETURN_PATH_NAME, STREAM_NAME, read_capture
from qmig.inspect import count_return_path, find_discard_commands
from qmig.qemu.guest import MIB, GuestSpec, boot_sector, known_data, loader_args
from qmig.qemu.machine import Machine, MachineConfig, qemu_version
from qmig.qemu.scenario import FilePlan, PostcopyPlan, run_postcopy, run_precopy_to_file

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def store(data: bytes, target: Path) -> dict[str, Any]:
    """Write ``target``.xz; describe the uncompressed bytes."""
    compressed = lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)
    target.with_name(target.name + ".xz").write_bytes(compressed)
    return {"bytes": len(data), "sha256": sha256(data), "xz_bytes": len(compressed)}


def guest_meta(spec: GuestSpec, memory_mib: int) -> dict[str, Any]:
    return {
        "memory_mib": memory_mib,
        **asdict(spec),
        "pages_written_per_pass": spec.pages,
        "boot_sector_sha256": sha256(boot_sector(spec)),
        "built_by": "qmig.qemu.guest.boot_sector(GuestSpec(...))",
    }


def stream_observations(stream: bytes) -> dict[str, Any]:
    discards = find_discard_commands(stream)
    per_block: Counter[str] = Counter()
    ranges: Counter[str] = Counter()
    for command in discards:
        per_block[command.block] += 1
        ranges[command.block] += len(command.ranges)
    return {
        "starts_with": stream[:8].hex(),
        "postcopy_ram_discard_commands": len(discards),
        "discard_commands_per_block": dict(per_block),
        "discard_ranges_per_block": dict(ranges),
        "max_ranges_in_one_discard": max((len(c.ranges) for c in discards), default=0),
        "first_discards": [
            {"offset": c.offset, "block": c.block, "ranges": c.ranges[:3]} for c in discards[:8]
        ],
        "last_byte": stream[-1:].hex(),
    }


def make_precopy_file(out: Path, work: Path) -> dict[str, Any]:
    plan = FilePlan()
    stream_path = work / STREAM_NAME
    result = run_precopy_to_file(plan, stream_path, work)
    stream = stream_path.read_bytes()
    return {
        "description": (
            "Precopy of the running, dirtying guest into a file with migrate "
            "'exec:cat > FILE' (no return path, no commands), then loaded back into a fresh "
            "destination with migrate-incoming 'exec:cat FILE'; the oracle passed there."
        ),
        "source_command": result.source_command,
        "destination_command": result.destination_command,
        "qmp": [
            {"execute": "migrate-set-parameters",
             "arguments": {"downtime-limit": plan.downtime_limit_ms}},
            {"execute": "migrate", "arguments": {"uri": result.migrate_uri}},
            {"execute": "migrate-incoming (destination)",
             "arguments": {"uri": result.incoming_uri}},
        ],
        "capabilities": {},
        "guest": guest_meta(plan.guest, plan.memory_mib),
        "files": {STREAM_NAME: store(stream, out / STREAM_NAME)},
        "source_query_migrate": result.source_info,
        "oracle_on_destination": asdict(result.picture),
        "observed": stream_observations(stream),
    }  # fmt: skip


KNOWN_ADDRESS = 1 * MIB
KNOWN_SIZE = 64 * 1024
KNOWN_SEED = 2026


def make_precopy_known(out: Path, work: Path) -> dict[str, Any]:
    data = known_data(KNOWN_SIZE, seed=KNOWN_SEED)
    data_path = work / "known.bin"
    data_path.write_bytes(data)
    stream_path = work / STREAM_NAME
    config = MachineConfig(
        "source", 16, None, paused=True, extra_args=loader_args(data_path, KNOWN_ADDRESS)
    )
    with Machine(config, work).start() as source:
        source.migrate(f"exec:cat > {stream_path}")
        source_info = source.wait_migration()
        source_command = source.command_line()
    destination = Machine(MachineConfig("destination", 16, None, incoming="defer"), work)
    with destination.start():
        destination.migrate_incoming(f"exec:cat {stream_path}")
        destination.wait_migration()
        loaded = destination.pmemsave(KNOWN_ADDRESS, KNOWN_SIZE, work / "loaded.bin")
        if loaded != data:
            raise SystemExit("the destination does not hold the known data")
        destination_command = destination.command_line()
    stream = stream_path.read_bytes()
    return {
        "description": (
            "Precopy of a never-started guest (-S, no disk) whose RAM holds known bytes, put "
            "there by '-device loader', into a file with migrate 'exec:cat > FILE'. The "
            "destination loaded it back and held the same bytes. The known bytes are "
            "qmig.qemu.guest.known_data(size, seed) at guest-physical 'address' (offset in "
            "pc.ram), so a parser's reassembled pc.ram can be compared with them."
        ),
        "source_command": source_command,
        "destination_command": destination_command,
        "qmp": [
            {"execute": "migrate", "arguments": {"uri": "exec:cat > FILE"}},
            {"execute": "migrate-incoming (destination)", "arguments": {"uri": "exec:cat FILE"}},
        ],
        "capabilities": {},
        "guest": {"memory_mib": 16, "start": 0, "end": 0, "stride": 0, "note": "no guest code"},
        "known_data": {
            "address": KNOWN_ADDRESS,
            "size": KNOWN_SIZE,
            "seed": KNOWN_SEED,
            "sha256": sha256(data),
            "made_by": f"qmig.qemu.guest.known_data({KNOWN_SIZE}, seed={KNOWN_SEED})",
        },
        "files": {STREAM_NAME: store(stream, out / STREAM_NAME)},
        "source_query_migrate": source_info,
        "observed": stream_observations(stream),
    }


def make_postcopy(plan: PostcopyPlan, description: str) -> Callable[[Path, Path], dict[str, Any]]:
    def make(out: Path, work: Path) -> dict[str, Any]:
        capture_dir = work / "capture"
        result = run_postcopy(replace(plan, capture_dir=capture_dir), work)
        capture = read_capture(capture_dir)  # also checks the index covers both files
        rp_counts = count_return_path(capture.return_path)
        observed = stream_observations(capture.stream)
        if not rp_counts["REQ_PAGES"] or not observed["postcopy_ram_discard_commands"]:
            raise SystemExit(f"no page requests or discards: {rp_counts}, {observed}")
        index_text = (capture_dir / INDEX_NAME).read_bytes()
        return {
            "description": description,
            "source_command": result.source_command,
            "destination_command": result.destination_command,
            "relay": "qmig.capture.start_relay (same code as 'qmig capture')",
            "qmp": [
                {"execute": "migrate-set-capabilities (both)",
                 "arguments": {"capabilities": [
                     {"capability": name.replace("_", "-"), "state": state}
                     for name, state in plan.capabilities.items()]}},
                {"execute": "migrate-set-parameters (source)",
                 "arguments": {k.replace("_", "-"): v
                               for k, v in plan.source_parameters.items()}},
                {"execute": "migrate-incoming (destination)",
                 "arguments": {"uri": "tcp:127.0.0.1:0"}},
                {"execute": "migrate (source)", "arguments": {"uri": "tcp:127.0.0.1:RELAY"}},
                {"wait_seconds": plan.precopy_seconds},
                {"execute": "migrate-start-postcopy (source)"},
            ],
            "capabilities": plan.capabilities,
            "parameters": plan.source_parameters,
            "guest": guest_meta(plan.guest, plan.memory_mib),
            "files": {
                STREAM_NAME: store(capture.stream, out / STREAM_NAME),
                RETURN_PATH_NAME: store(capture.return_path, out / RETURN_PATH_NAME),
                INDEX_NAME: store(index_text, out / INDEX_NAME),
            },
            "capture_meta": capture.meta,
            "source_query_migrate": result.source_info,
            "destination_query_migrate": result.destination_info,
            "oracle_on_destination": asdict(result.picture),
            "destination_markers_after_migration": result.destination_serial_after,
            "observed": {**observed, "return_path_messages": dict(rp_counts)},
        }  # fmt: skip

    return make


FIXTURE_MAKERS: dict[str, Callable[[Path, Path], dict[str, Any]]] = {
    "precopy-file": make_precopy_file,
    "precopy-known": make_precopy_known,
    "postcopy-tcp": make_postcopy(
        PostcopyPlan(
            memory_mib=64,
            guest=GuestSpec(end=40 * MIB),
            max_bandwidth=8 * MIB,
            max_postcopy_bandwidth=8 * MIB,
            precopy_seconds=2.0,
        ),
        "Postcopy over TCP through the recording relay, both directions captured. The guest "
        "writes every page of 1..40 MiB once per pass; precopy is capped so it cannot finish, "
        "postcopy starts after 2 s (first precopy pass still running), postcopy bandwidth is "
        "capped so the destination guest faults and requests pages.",
    ),
    "postcopy-sparse": make_postcopy(
        PostcopyPlan(
            memory_mib=64,
            guest=GuestSpec(end=40 * MIB, stride=32 * 1024),
            max_bandwidth=8 * MIB,
            max_postcopy_bandwidth=4 * MIB,
            precopy_seconds=4.0,
        ),
        "Like postcopy-tcp, but the guest writes one page in every 32 KiB and precopy runs "
        "long enough to finish its first pass, so the dirty pages at the switch are scattered: "
        "pc.ram's discard list has many single-page ranges split into commands of 12.",
    ),
}


def write_readme(metas: dict[str, dict[str, Any]]) -> None:
    lines = [
        "# Fixtures: real QEMU migrations of qmig's test guest",
        "",
        "Made by `scripts/make_fixtures.py` (re-run it to regenerate; it needs QEMU, not CI).",
        "Data files are xz-compressed (`xz -dk FILE.xz`, or Python's `lzma`). The capture",
        "layout (`stream.bin`, `return-path.bin`, `index.tsv`) is described in",
        "`formats/capture.md`. Each folder's `meta.json` has everything below and more: full",
        "QEMU command lines, QMP commands, the source's final `query-migrate`, guest details.",
        "Folders without a `meta.json` (e.g. `vmstate/`) come from other scripts; see their",
        "own READMEs.",
        "",
    ]
    for name, meta in metas.items():
        lines += [f"## {name}", "", meta["description"], ""]
        lines += [f"- QEMU: {meta['qemu_version']}; made {meta['made_utc']}"]
        guest = meta["guest"]
        if guest["end"]:
            lines += [
                f"- guest: {guest['memory_mib']} MiB RAM, counters at {guest['start']:#x}.."
                f"{guest['end']:#x} every {guest['stride']} bytes"
            ]
        else:
            lines += [f"- guest: {guest['memory_mib']} MiB RAM, never started"]
        if "known_data" in meta:
            known = meta["known_data"]
            lines += [
                f"- known data: {known['size']} bytes at {known['address']:#x}, "
                f"`{known['made_by']}`, sha256 `{known['sha256']}`"
            ]
        if meta["capabilities"]:
            lines += [f"- capabilities: {meta['capabilities']}"]
        if meta.get("parameters"):
            lines += [f"- parameters: {meta['parameters']}"]
        for file, info in meta["files"].items():
            lines += [
                f"- `{file}.xz`: {info['bytes']:,} bytes uncompressed "
                f"({info['xz_bytes']:,} compressed), sha256 `{info['sha256']}`"
            ]
        observed = meta["observed"]
        lines += [
            f"- POSTCOPY_RAM_DISCARD commands: {observed['postcopy_ram_discard_commands']} "
            f"(ranges per block: {observed['discard_ranges_per_block']})"
        ]
        if "return_path_messages" in observed:
            lines += [f"- return-path messages: {observed['return_path_messages']}"]
        info = meta["source_query_migrate"]
        ram = info.get("ram", {})
        lines += [
            f"- source query-migrate: {info.get('status')}, total-time {info.get('total-time')}"
            f" ms, transferred {ram.get('transferred')}, postcopy-requests "
            f"{ram.get('postcopy-requests')}"
        ]
        lines += [""]
    (FIXTURES / "README.md").write_text("\n".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", choices=[*FIXTURE_MAKERS, []], metavar="NAME")
    args = parser.parse_args()
    names = args.names or list(FIXTURE_MAKERS)
    version = qemu_version()
    for name in names:
        out = FIXTURES / name
        with tempfile.TemporaryDirectory(prefix=f"qmig-fixture-{name}-") as temp:
            print(f"making {name} ...", file=sys.stderr, flush=True)
            staging = Path(temp) / "out"
            staging.mkdir()
            meta = FIXTURE_MAKERS[name](staging, Path(temp))
            meta = {
                "name": name,
                "qemu_version": version,
                "host": f"{platform.system()} {platform.release()} {platform.machine()}",
                "made_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                **meta,
            }
            (staging / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
            shutil.rmtree(out, ignore_errors=True)
            shutil.copytree(staging, out)
    metas = {
        path.parent.name: json.loads(path.read_text())
        for path in sorted(FIXTURES.glob("*/meta.json"))
    }
    write_readme(metas)
    return 0


if __name__ == "__main__":
    sys.exit(main())
