#!/usr/bin/env python3
"""Reading page records that name their block: the reader's own path against the schema's.

Run from the repository::

    .venv/bin/python bench/named_pages_bench.py            # 20,000 records per stream
    .venv/bin/python bench/named_pages_bench.py --records 2000 --json

In postcopy most requested pages arrive as a record that names its block (the source names
it again after its background pages), and a destination's machine reads every one of them.
Three streams are built with qmig's schema builders, each one ram section: ``named``, every
record a PAGE or ZERO record naming ``pc.ram`` or ``vga.vram``; ``postcopy``, one named
record then seven CONTINUE records, the two blocks in turn; ``one-block``, the same with every
named record naming ``pc.ram``, as a postcopy of one big block sends them. Each is read by a
:class:`StreamReader` fed 32 KiB at a time (postcopy's pieces): with the named-record path
taking a record that names the run's block into the run (the default), with it beginning a
run of its own (``join_named_records`` off, the previous path), and with the schema reading
those records (the path before that), best of ``--repeat``, with the page runs each gives;
``cat`` of the same bytes from a file is the floor. Nothing is asserted: the figures are
printed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qmig.wire import messages as m
from qmig.wire.reader import StreamReader
from qmig.wire.schema import Schema, schema_for

PIECE = 32 << 10  # bytes fed at a time, as postcopy's pieces come
BLOCKS = (("pc.ram", 1 << 16), ("vga.vram", 1 << 11))  # (name, target pages)


def stream(schema: Schema, records: int, named_every: int, *, in_turn: bool = True) -> bytes:
    """One ram section of ``records`` page records; every ``named_every``-th names its block,
    the two blocks in turn (``in_turn``) or always the first."""
    page = schema.target_page_size
    blocks = tuple(m.RamBlockInfo(name, pages * page) for name, pages in BLOCKS)
    out = bytearray(schema.build_opening(m.Configuration("pc")))
    out += schema.build_section(m.SectionStart(2, "ram", 0, 4))
    out += schema.build_mem_size(m.MemSize(sum(b.used_length for b in blocks), blocks))
    data = bytes(range(256)) * (page // 256)
    sizes = dict(BLOCKS)
    name = BLOCKS[0][0]
    for index in range(records):
        if index % named_every == 0 and in_turn:
            name = BLOCKS[(index // named_every) % 2][0]
        offset = (index * 7919 % sizes[name]) * page
        block = name if index % named_every == 0 else None
        out += schema.build_ram_page(
            m.RamPage(block, offset, index % 4 == 0, data[:1] if index % 4 == 0 else data)
        )
    out += schema.build_ram_flag("EOS")
    return bytes(out)


def read_time(
    data: bytes, version: str, *, named_path: bool, join: bool, repeat: int
) -> tuple[float, int, int]:
    """Best time to read ``data`` through, fed PIECE bytes at a time; the pages and the page
    runs read."""
    best, pages, runs = float("inf"), 0, 0
    for _ in range(repeat):
        reader = StreamReader(version)
        reader.named_fast_path = named_path
        reader.join_named_records = join
        count = run_count = 0
        began = time.perf_counter()
        for at in range(0, len(data), PIECE):
            reader.feed(data[at : at + PIECE])
            for record in reader:
                if isinstance(record.message, m.RamPageRun):
                    count += record.message.count
                    run_count += 1
        best = min(best, time.perf_counter() - began)
        pages, runs = count, run_count
    return best, pages, runs


def cat_time(data: bytes, repeat: int) -> float:
    with tempfile.NamedTemporaryFile() as file:
        Path(file.name).write_bytes(data)
        best = float("inf")
        for _ in range(repeat):
            began = time.perf_counter()
            subprocess.run(["cat", file.name], stdout=subprocess.DEVNULL, check=True)
            best = min(best, time.perf_counter() - began)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--records", type=int, default=20000, help="page records per stream")
    parser.add_argument("--version", default="7.2", help="wire profile (default 7.2)")
    parser.add_argument("--repeat", type=int, default=3, help="best of N (default 3)")
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout")
    args = parser.parse_args()
    if args.records < 1 or args.repeat < 1:
        print(
            "named_pages_bench: error: --records and --repeat must be at least 1", file=sys.stderr
        )
        return 1
    schema = schema_for(args.version)
    result: dict[str, dict[str, float | int]] = {}
    for name, every, in_turn in (
        ("named", 1, True),
        ("postcopy", 8, True),
        ("one-block", 8, False),
    ):
        data = stream(schema, args.records, every, in_turn=in_turn)
        timed = {
            path: read_time(
                data, args.version, named_path=path != "schema", join=path == "joined",
                repeat=args.repeat,
            )
            for path in ("joined", "unjoined", "schema")
        }  # fmt: skip
        if any(pages != args.records for _t, pages, _r in timed.values()):
            read = ", ".join(str(pages) for _t, pages, _r in timed.values())
            print(f"named_pages_bench: error: {name}: {read} pages read", file=sys.stderr)
            return 1
        row: dict[str, float | int] = {"records": args.records, "bytes": len(data)}
        for path, (seconds, pages, runs) in timed.items():
            row[f"{path}_records_per_s"] = round(pages / seconds)
            row[f"{path}_runs"] = runs
            row[f"{path}_s"] = round(seconds, 4)
        row["cat_s"] = round(cat_time(data, args.repeat), 4)
        result[name] = row
    if args.json:
        json.dump(result, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    print("records read per second (page runs given), by path")
    print(f"{'stream':11}{'joined':>19}{'unjoined':>19}{'schema':>19}{'cat (s)':>10}")
    for name, row in result.items():
        cells = "".join(
            f"{row[path + '_records_per_s']:>11,} ({row[path + '_runs']:>4})"
            for path in ("joined", "unjoined", "schema")
        )
        print(f"{name:11}{cells}{row['cat_s']:>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
