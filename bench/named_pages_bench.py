#!/usr/bin/env python3
"""Reading page records that name their block: the reader's own path against the schema's.

Run from the repository::

    .venv/bin/python bench/named_pages_bench.py            # 20,000 records per stream
    .venv/bin/python bench/named_pages_bench.py --records 2000 --json

In postcopy most requested pages arrive as a record that names its block (the source names
it again after its background pages), and a destination's machine reads every one of them.
Two streams are built with qmig's schema builders, each one ram section: ``named``, every
record a PAGE or ZERO record naming ``pc.ram`` or ``vga.vram``; ``postcopy``, one named
record then seven CONTINUE records, in turn. Each is read by a :class:`StreamReader` fed 32
KiB at a time (postcopy's pieces), with the named-record path
(``RamSectionReader._read_named_page``, the default) and with the schema reading those records
(the previous path), best of ``--repeat``; ``cat`` of the same bytes from a file is the
floor. Nothing is asserted: the figures are printed.
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


def stream(schema: Schema, records: int, named_every: int) -> bytes:
    """One ram section of ``records`` page records; every ``named_every``-th names its block."""
    page = schema.target_page_size
    blocks = tuple(m.RamBlockInfo(name, pages * page) for name, pages in BLOCKS)
    out = bytearray(schema.build_opening(m.Configuration("pc")))
    out += schema.build_section(m.SectionStart(2, "ram", 0, 4))
    out += schema.build_mem_size(m.MemSize(sum(b.used_length for b in blocks), blocks))
    data = bytes(range(256)) * (page // 256)
    sizes = dict(BLOCKS)
    name = BLOCKS[0][0]
    for index in range(records):
        if index % named_every == 0:
            name = BLOCKS[(index // named_every) % 2][0]
        offset = (index * 7919 % sizes[name]) * page
        block = name if index % named_every == 0 else None
        out += schema.build_ram_page(
            m.RamPage(block, offset, index % 4 == 0, data[:1] if index % 4 == 0 else data)
        )
    out += schema.build_ram_flag("EOS")
    return bytes(out)


def read_time(data: bytes, version: str, *, named_path: bool, repeat: int) -> tuple[float, int]:
    """Best time to read ``data`` through, fed PIECE bytes at a time; the pages read."""
    best, pages = float("inf"), 0
    for _ in range(repeat):
        reader = StreamReader(version)
        reader.named_fast_path = named_path
        count = 0
        began = time.perf_counter()
        for at in range(0, len(data), PIECE):
            reader.feed(data[at : at + PIECE])
            for record in reader:
                if isinstance(record.message, m.RamPageRun):
                    count += record.message.count
        best = min(best, time.perf_counter() - began)
        pages = count
    return best, pages


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
    for name, every in (("named", 1), ("postcopy", 8)):
        data = stream(schema, args.records, every)
        new, pages = read_time(data, args.version, named_path=True, repeat=args.repeat)
        old, old_pages = read_time(data, args.version, named_path=False, repeat=args.repeat)
        if pages != old_pages or pages != args.records:
            print(
                f"named_pages_bench: error: {name}: {pages} and {old_pages} pages read",
                file=sys.stderr,
            )
            return 1
        result[name] = {
            "records": args.records,
            "bytes": len(data),
            "named_path_records_per_s": round(pages / new),
            "schema_path_records_per_s": round(pages / old),
            "speedup": round(old / new, 2),
            "cat_s": round(cat_time(data, args.repeat), 4),
            "named_path_s": round(new, 4),
            "schema_path_s": round(old, 4),
        }
    if args.json:
        json.dump(result, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    heads = ("records/s, named path", "schema path", "speedup", "cat (s)", "named (s)")
    print(f"{'stream':10}{heads[0]:>24}{heads[1]:>14}{heads[2]:>9}{heads[3]:>9}{heads[4]:>11}")
    for name, row in result.items():
        print(
            f"{name:10}{row['named_path_records_per_s']:>24,}{row['schema_path_records_per_s']:>14,}"
            f"{row['speedup']:>9}{row['cat_s']:>9}{row['named_path_s']:>11}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
