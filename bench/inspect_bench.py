#!/usr/bin/env python3
"""``qmig inspect`` throughput on big streams, next to ``cat`` and a minimal record walk.

Run from the repository::

    .venv/bin/python bench/inspect_bench.py                    # ~1 GiB + 1200 MiB guest
    .venv/bin/python bench/inspect_bench.py --random-mib 64 --zero-guest-mib 256   # quick
    .venv/bin/python bench/inspect_bench.py --profile          # where inspect's time goes

Two streams are built once with qmig's own schema builders and cached under ``--workdir``
(default ``/tmp/qmig-bench``):

* ``random``: a precopy ``ram`` section carrying ``--random-mib`` MiB of pseudo-random pages
  (PAGE records: the bytes dominate);
* ``zero``: a ``--zero-guest-mib`` MiB guest sent once, mostly ZERO records (1 in 64 pages
  carries data): the record count dominates.

Each stream is read once to warm the page cache, then each reader runs ``--repeat`` times
and the best time counts:

* ``cat FILE > /dev/null``: the floor;
* ``walk``: a minimal pure-Python walk over an mmap of the file that only skips records,
  the baseline of what a Python reader without a fast path costs;
* ``qmig inspect --json`` and ``qmig inspect --json --extract DIR`` as subprocesses.

Targets: inspect ≤ 3× cat on the random stream; ≥ 2 million page records/s on the zero
stream. ``--profile`` runs ``inspect --json`` under cProfile in this process and prints
the functions that take the time.
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import cProfile
import io
import mmap
import pstats
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from qmig.wire import messages as m
from qmig.wire.schema import Schema, schema_for

VERSION = "7.2"
MIB = 1 << 20
RAM_SECTION_ID = 2
BLOCK = "pc.ram"
PAGES_PER_PART = 8192  # pages per SECTION_PART, as QEMU's iterations send them in bursts
DATA_PAGE_EVERY = 64  # in the zero stream, one page in this many carries data
INSPECT_TARGET_RATIO = 3.0
ZERO_TARGET_RECORDS_PER_S = 2_000_000


# --- building the streams -----------------------------------------------------------------


def _head(schema: Schema, used_length: int) -> bytes:
    """Header, CONFIGURATION and the ram SECTION_START with its MEM_SIZE list."""
    block = m.RamBlockInfo(BLOCK, used_length)
    opening = schema.build_opening(m.Configuration("pc-i440fx-7.2"))
    return opening + schema.build_ram_setup(RAM_SECTION_ID, (block,))


def _write_stream(path: Path, pages: int, page_for: Callable[[int], m.RamPage]) -> int:
    """Write a precopy stream of ``pages`` page records; return the number of records."""
    schema = schema_for(VERSION)
    page_size = schema.target_page_size
    partial = path.with_suffix(".partial")
    with partial.open("wb", buffering=16 * MIB) as out:
        out.write(_head(schema, pages * page_size))
        for first in range(0, pages, PAGES_PER_PART):
            last_part = first + PAGES_PER_PART >= pages
            header = m.SectionEnd if last_part else m.SectionPart
            out.write(schema.build_section(header(RAM_SECTION_ID)))
            for index in range(first, min(first + PAGES_PER_PART, pages)):
                out.write(schema.build_ram_page(page_for(index)))
            out.write(schema.build_ram_flag("EOS") + schema.build_footer(RAM_SECTION_ID))
        out.write(bytes(schema.eof.build(m.Eof())))
    partial.rename(path)
    return pages


def build_random(path: Path, mib: int) -> None:
    page_size = schema_for(VERSION).target_page_size
    generator = random.Random(1)

    def page(index: int) -> m.RamPage:
        block = BLOCK if index == 0 else None
        return m.RamPage(block, index * page_size, False, generator.randbytes(page_size))

    _write_stream(path, mib * MIB // page_size, page)


def build_zero(path: Path, guest_mib: int) -> None:
    page_size = schema_for(VERSION).target_page_size
    generator = random.Random(2)

    def page(index: int) -> m.RamPage:
        block = BLOCK if index == 0 else None
        if index % DATA_PAGE_EVERY == DATA_PAGE_EVERY - 1:
            return m.RamPage(block, index * page_size, False, generator.randbytes(page_size))
        return m.RamPage(block, index * page_size, True, b"\x00")

    _write_stream(path, guest_mib * MIB // page_size, page)


def cached(workdir: Path, name: str, build: Callable[[Path], None]) -> Path:
    path = workdir / name
    if not path.exists():
        started = time.perf_counter()
        print(f"building {path} ...", file=sys.stderr, flush=True)
        build(path)
        took = time.perf_counter() - started
        size = path.stat().st_size / MIB
        print(f"  {size:.0f} MiB in {took:.1f} s", file=sys.stderr, flush=True)
    return path


# --- the readers --------------------------------------------------------------------------


@dataclass
class WalkCount:
    records: int = 0
    page_records: int = 0


def walk(path: Path) -> WalkCount:
    """Skip every record of a stream shaped like the ones built here; count them.

    Knows only what these streams hold: the header, a CONFIGURATION without subsections,
    section headers and footers, the MEM_SIZE list, ZERO/PAGE records (named or CONTINUE),
    EOS and EOF. It checks nothing: it is the floor for a Python reader.
    """
    schema = schema_for(VERSION)
    flags = schema.profile.ram_flags
    mask = schema.flag_mask
    page_size = schema.target_page_size
    zero, page, cont, eos = flags["ZERO"], flags["PAGE"], flags["CONTINUE"], flags["EOS"]
    mem_size = flags["MEM_SIZE"]
    count = WalkCount()
    with path.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
        end = len(data)
        at = 8  # header
        at += 5 + int.from_bytes(data[at + 1 : at + 5], "big")  # CONFIGURATION
        count.records += 2
        from_bytes = int.from_bytes
        while at < end:
            kind = data[at]
            count.records += 1
            if kind == 0x00:  # EOF
                at += 1
                continue
            if kind in (0x01, 0x04):  # START / FULL
                at += 1 + 4 + 1 + data[at + 5] + 8
            elif kind in (0x02, 0x03):  # PART / END
                at += 5
            # The ram section's records, up to its EOS, then the footer.
            while True:
                header = from_bytes(data[at : at + 8], "big")
                record_flags = header & mask
                at += 8
                count.records += 1
                if record_flags == eos:
                    break
                if record_flags == mem_size:
                    remaining = header & ~mask
                    while remaining:
                        at += 1 + data[at]
                        remaining -= from_bytes(data[at : at + 8], "big")
                        at += 8
                    continue
                if not record_flags & cont:
                    at += 1 + data[at]
                kind_flags = record_flags & ~cont
                at += 1 if kind_flags == zero else page_size if kind_flags == page else 0
                count.page_records += 1
            at += 5  # footer
            count.records += 1
    return count


def cache_bytecode() -> None:
    """Write qmig's bytecode, as an installed qmig has it.

    Sessions and CI may set PYTHONDONTWRITEBYTECODE; then every ``qmig`` subprocess would
    compile qmig's sources again (about 40 ms, a fifth of a zero-stream run), which is not
    what a user's command costs. py_compile writes regardless of that setting.
    """
    import qmig

    compileall.compile_dir(Path(qmig.__file__).parent, quiet=1)


def run_command(command: list[str]) -> None:
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)


def best_of(repeat: int, action: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        action()
        best = min(best, time.perf_counter() - started)
    return best


@contextlib.contextmanager
def extract_dir(workdir: Path) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="extract-", dir=workdir))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# --- the report -----------------------------------------------------------------------------


@dataclass
class Row:
    name: str
    seconds: float


def measure(path: Path, workdir: Path, repeat: int) -> tuple[list[Row], WalkCount]:
    qmig = [sys.executable, "-m", "qmig", "inspect", "--qemu-version", VERSION, "--json"]
    run_command(["cat", str(path)])  # warm the page cache
    counted = walk(path)
    rows = [
        Row("cat", best_of(repeat, lambda: run_command(["cat", str(path)]))),
        # What any qmig command costs before it reads a byte: Python and imports.
        Row(
            "qmig startup (--version)",
            best_of(repeat, lambda: run_command([*qmig[:3], "--version"])),
        ),
        Row("walk (Python, mmap)", best_of(repeat, lambda: walk(path))),
        Row("qmig inspect --json", best_of(repeat, lambda: run_command([*qmig, str(path)]))),
    ]

    def with_extract() -> None:
        with extract_dir(workdir) as target:
            run_command([*qmig, "--dump-ram", str(target), str(path)])

    rows.append(Row("qmig inspect --json --extract", best_of(repeat, with_extract)))
    rows.append(Row("inspect --json, in this process", best_of(repeat, lambda: inspect_here(path))))
    return rows, counted


def inspect_here(path: Path) -> None:
    """The same command without the interpreter's start: what reading the stream costs."""
    from qmig.cli import main

    with contextlib.redirect_stdout(io.StringIO()):
        main(["inspect", "--qemu-version", VERSION, "--json", str(path)])


def report(title: str, path: Path, rows: list[Row], counted: WalkCount) -> dict[str, float]:
    size = path.stat().st_size
    cat = rows[0].seconds
    print(
        f"\n{title}: {path} ({size / MIB:.0f} MiB, {counted.records} records, "
        f"{counted.page_records} page records)"
    )
    print(f"  {'reader':<32}{'seconds':>9}{'MiB/s':>10}{'page rec/s':>14}{'× cat':>8}")
    for row in rows:
        print(
            f"  {row.name:<32}{row.seconds:>9.3f}{size / MIB / row.seconds:>10.0f}"
            f"{counted.page_records / row.seconds:>14,.0f}{row.seconds / cat:>8.2f}"
        )
    return {row.name: row.seconds for row in rows}


def profile_inspect(path: Path, top: int) -> None:
    from qmig.cli import main

    profiler = cProfile.Profile()
    with contextlib.redirect_stdout(io.StringIO()):
        profiler.runcall(main, ["inspect", "--qemu-version", VERSION, "--json", str(path)])
    print(f"\nprofile of qmig inspect --json {path.name} (cumulative):")
    stats = pstats.Stats(profiler, stream=sys.stdout)
    stats.sort_stats("cumulative").print_stats(top)
    print("(by own time):")
    stats.sort_stats("tottime").print_stats(top)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/qmig-bench"))
    parser.add_argument("--random-mib", type=int, default=1024, help="random-page stream size")
    parser.add_argument("--zero-guest-mib", type=int, default=1200, help="zero-stream guest")
    parser.add_argument("--repeat", type=int, default=3, help="best of N runs")
    parser.add_argument("--profile", action="store_true", help="profile inspect on both")
    parser.add_argument("--top", type=int, default=25, help="profile lines to print")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    cache_bytecode()

    random_path = cached(
        args.workdir,
        f"random-{args.random_mib}mib.bin",
        lambda path: build_random(path, args.random_mib),
    )
    zero_path = cached(
        args.workdir,
        f"zero-{args.zero_guest_mib}mib-guest.bin",
        lambda path: build_zero(path, args.zero_guest_mib),
    )

    rows, counted = measure(random_path, args.workdir, args.repeat)
    random_times = report("random pages", random_path, rows, counted)
    rows, zero_counted = measure(zero_path, args.workdir, args.repeat)
    zero_times = report("mostly zero pages", zero_path, rows, zero_counted)

    ratio = random_times["qmig inspect --json"] / random_times["cat"]
    print()
    verdict = "met" if ratio <= INSPECT_TARGET_RATIO else "MISSED"
    print(f"target inspect <= {INSPECT_TARGET_RATIO:g}x cat (random): {ratio:.2f}x, {verdict}")
    for how in ("qmig inspect --json", "inspect --json, in this process"):
        rate = zero_counted.page_records / zero_times[how]
        verdict = "met" if rate >= ZERO_TARGET_RECORDS_PER_S else "MISSED"
        print(
            f"target >= {ZERO_TARGET_RECORDS_PER_S:,} page records/s (zero), {how}: "
            f"{rate:,.0f}, {verdict}"
        )
    if args.profile:
        profile_inspect(random_path, args.top)
        profile_inspect(zero_path, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
