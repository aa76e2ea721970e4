#!/usr/bin/env python3
"""userfaultfd benchmark: faults served per second, fault latency, UFFDIO_COPY throughput.

Run as root (or with userfaultfd access) from the repository::

    .venv/bin/python bench/uffd_bench.py            # full run, about 40 s
    .venv/bin/python bench/uffd_bench.py --quick    # smaller sizes

Fault service: C vCPU threads touch every page of a fresh block once, served three ways:

* qmig, C-served: the fault thread with an in-process page source (``sources=``), which reads,
  places and logs faults in C (``qmig_serve_blocks``) — qmig's in-process figure, the headline;
* qmig, Python requests: the fault thread turns each fault into a request and a Python page
  source answers it with ``receive_target_pages`` — a destination runner's path, minus the
  network;
* bare C loop (``qmig_serve_from``): no bitmap, no statistics — the ceiling of this host.

Each runs twice: with threads spread by the scheduler, and with every thread on one CPU.
On hosts where waking an idle CPU is expensive (VMs with halt polling), the second can be
several times faster, which says more about the host than about qmig.

Copy throughput: UFFDIO_COPY of 4 KiB pages one ioctl each, and of larger batches (one ioctl,
many pages), next to memcpy of the same bytes into memory already faulted in, and into fresh
memory (where memcpy, too, pays for page allocation).

Stream placement: page records laid out as on the wire (8-byte header, 4 KiB body) placed
into a fresh block by ``RamBlock.place_records`` — registered (UFFDIO_COPY runs, postcopy) and
not yet registered (direct writes, precopy before LISTEN) — and page by page with
``receive_target_pages`` as the runner used to, beside memcpy into fresh memory.

Each figure is the best of ``--repeat`` runs. The last line is the headline: qmig's C-served
faults/s with one vCPU, the better of the two CPU placements.
"""

from __future__ import annotations

import argparse
import os
import struct
import sys
import threading
import time
from array import array
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from qmig.ram._uffd import ffi, lib

from qmig.errors import QmigError
from qmig.ram.blocks import TARGET_PAGE_SIZE, BlockSpec, RamBlock
from qmig.ram.faults import SPIN_US, FaultThread, LatencySummary, PageRequest
from qmig.ram.session import RamSession
from qmig.ram.uffd import Userfaultfd
from qmig.ram.workload import Workload, tagged_pages
from qmig.wire.profiles import load_profile

MiB = 1 << 20
GiB = 1 << 30
TAG = 0xB0B0CAFE
RECORD_HEADER = struct.calcsize(">Q")  # a RAM record starts with be64 offset | flags
PAGE_FLAG = load_profile().ram_flags["PAGE"]


@dataclass
class FaultRun:
    label: str
    vcpus: int
    faults: int
    seconds: float
    latency: LatencySummary
    mismatches: int

    @property
    def rate(self) -> float:
        return self.faults / self.seconds


@contextmanager
def pinned(one_cpu: bool) -> Iterator[None]:
    """Threads started inside inherit the affinity: all on one CPU, or on any."""
    before = os.sched_getaffinity(0)
    if one_cpu:
        os.sched_setaffinity(0, {min(before)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def python_fault_thread(size: int, vcpus: int, spin_us: float) -> FaultRun:
    warm_up(2 * size)  # the source and the block
    source = tagged_pages(0, size, TAG)
    view = memoryview(source)
    with RamSession([BlockSpec("pc.ram", size)]) as session:
        block = session.block("pc.ram")

        def serve(request: PageRequest) -> None:
            end = request.offset + request.length
            block.receive_target_pages(request.offset, view[request.offset : end])

        assert session.uffd is not None
        faults = FaultThread(session.uffd, session.blocks, serve, spin_us=spin_us).start()
        return run_vcpus(session, faults, size, vcpus, "qmig, Python requests")


def fault_all_pages(session: RamSession, size: int, vcpus: int) -> tuple[Any, float]:
    """``vcpus`` C threads touch every page of pc.ram once, each its own share; their
    results and the seconds it took."""
    share = size // vcpus
    started = time.perf_counter()
    for index in range(vcpus):
        session.start_vcpu("pc.ram", Workload(tag_xor=TAG), index * share, share)
    results = session.vcpus.join(120)
    return results, time.perf_counter() - started


def run_vcpus(
    session: RamSession, faults: FaultThread, size: int, vcpus: int, label: str
) -> FaultRun:
    """Fault every page of pc.ram once from ``vcpus`` C threads, each on its own share."""
    results, seconds = fault_all_pages(session, size, vcpus)
    faults.stop()
    stats = faults.stats()
    session.close()
    return FaultRun(
        label,
        vcpus,
        stats.faults,
        seconds,
        stats.latency,
        sum(result.mismatches for result in results),
    )


def c_served(size: int, vcpus: int, spin_us: float) -> FaultRun:
    warm_up(2 * size)
    source = tagged_pages(0, size, TAG)
    with RamSession([BlockSpec("pc.ram", size)]) as session:
        faults = session.start_faults(sources={"pc.ram": source})
        faults.spin_ns = int(spin_us * 1000)
        return run_vcpus(session, faults, size, vcpus, "qmig, C-served")


def c_fault_loop(size: int, vcpus: int, spin_us: float) -> FaultRun:
    warm_up(2 * size)
    source = tagged_pages(0, size, TAG)
    pages = size // TARGET_PAGE_SIZE
    latencies = ffi.new("uint64_t[]", pages)
    with RamSession([BlockSpec("pc.ram", size)]) as session:
        block = session.block("pc.ram")
        assert session.uffd is not None
        quit_fd = os.eventfd(0, os.EFD_CLOEXEC)
        served: list[int] = []
        source_address = int(ffi.cast("uintptr_t", ffi.from_buffer(source)))
        fd = session.uffd.fd

        def loop() -> None:
            served.append(
                lib.qmig_serve_from(
                    fd,
                    quit_fd,
                    block.host_address,
                    size,
                    source_address,
                    block.page_size,
                    int(spin_us * 1000),
                    latencies,
                    pages,
                )
            )

        server = threading.Thread(target=loop)
        server.start()
        results, seconds = fault_all_pages(session, size, vcpus)
        os.eventfd_write(quit_fd, 1)
        server.join()
        os.close(quit_fd)
        session.close()
    count = max(0, min(served[0], pages))
    return FaultRun(
        "bare C loop",
        vcpus,
        served[0],
        seconds,
        LatencySummary.of(list(latencies[0:count])),
        sum(result.mismatches for result in results),
    )


def timed(action: Callable[[], Any]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def fresh_area(size: int) -> int:
    error = ffi.new("int *")
    address = int(lib.qmig_map_anon(size, 0, error))
    if not address:
        raise MemoryError(os.strerror(error[0]))
    lib.qmig_madvise(address, size, lib.MADV_NOHUGEPAGE)  # compare 4 KiB pages with 4 KiB
    return address


def copy_throughput(size: int, batch_pages: int) -> dict[str, float]:
    """GiB/s of UFFDIO_COPY in batches of ``batch_pages`` pages, and of memcpy."""
    warm_up(3 * size)  # the source, the destination, the fresh memcpy destination
    source = tagged_pages(0, size, TAG)
    src = int(ffi.cast("uintptr_t", ffi.from_buffer(source)))
    pages = size // TARGET_PAGE_SIZE
    figures: dict[str, float] = {}
    with Userfaultfd() as uffd:
        destination = fresh_area(size)
        uffd.register(destination, size)

        def place_all() -> None:  # one C loop, batch_pages pages per ioctl
            uffd.place(destination, src, TARGET_PAGE_SIZE, pages, max_run=batch_pages)

        figures["UFFDIO_COPY"] = size / timed(place_all) / GiB
        uffd.unregister(destination, size)
        figures["memcpy, warm"] = (
            size / timed(lambda: lib.qmig_memcpy(destination, src, size)) / GiB
        )
        lib.qmig_unmap(destination, size)
    fresh = fresh_area(size)
    figures["memcpy, fresh"] = size / timed(lambda: lib.qmig_memcpy(fresh, src, size)) / GiB
    lib.qmig_unmap(fresh, size)
    return figures


def stream_placement(size: int) -> dict[str, float]:
    """GiB/s placing wire-like page records into a fresh block, three ways, and memcpy."""
    record = RECORD_HEADER + TARGET_PAGE_SIZE
    run = 256  # records per call, about what one 1 MiB receive buffer holds
    stream = bytearray(run * record)
    for index in range(run):
        body = index * record + RECORD_HEADER
        stream[body : body + TARGET_PAGE_SIZE] = tagged_pages(0, TARGET_PAGE_SIZE, index)
    data = memoryview(stream)
    bodies = array("Q", range(RECORD_HEADER, run * record, record))
    figures: dict[str, float] = {}
    for label, register, batched in (
        ("records, registered", True, True),
        ("records, before LISTEN", False, True),
        ("page by page", True, False),
    ):
        warm_up(size)
        with RamSession([BlockSpec("pc.ram", size)], register=register) as session:
            block = session.block("pc.ram")
            block.set_thp(False)  # as the destination runner does

            def place(block: RamBlock = block, batched: bool = batched) -> None:
                for first in range(0, size, run * TARGET_PAGE_SIZE):
                    if batched:
                        end = first + run * TARGET_PAGE_SIZE
                        headers = array("Q", range(first | PAGE_FLAG, end, TARGET_PAGE_SIZE))
                        block.place_records(headers, bodies, data, 0, PAGE_FLAG)
                    else:
                        for index in range(run):
                            at = index * record + RECORD_HEADER
                            block.receive_target_pages(
                                first + index * TARGET_PAGE_SIZE, data[at : at + TARGET_PAGE_SIZE]
                            )

            figures[label] = size / timed(place) / GiB
            session.close()
    warm_up(size)
    fresh = fresh_area(size)
    source = tagged_pages(0, size, TAG)
    src = int(ffi.cast("uintptr_t", ffi.from_buffer(source)))
    figures["memcpy, fresh"] = size / timed(lambda: lib.qmig_memcpy(fresh, src, size)) / GiB
    lib.qmig_unmap(fresh, size)
    return figures


def warm_up(size: int) -> None:
    """Touch ``size`` bytes and free them, right before a measurement. On a VM with free page
    reporting (virtio-balloon), memory freed a few seconds ago has been handed back to the host
    and costs a host page fault per page on its next use; memory freed just now does not. Each
    run starts from the same, warm, state."""
    area = fresh_area(size)
    lib.qmig_fill_tags(area, size, TARGET_PAGE_SIZE, 0, 0)
    lib.qmig_unmap(area, size)


def micro(ns: int) -> str:
    return f"{ns / 1000:.1f} µs"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        metavar="N",
        help="run each measurement N times and keep the best (default 3): shared hosts are noisy",
    )
    parser.add_argument(
        "--spin-us",
        type=float,
        default=SPIN_US,
        help=f"fault-thread spin before sleeping, both loops (default {SPIN_US:g}; 0: never)",
    )
    args = parser.parse_args()
    fault_size = 32 * MiB if args.quick else 128 * MiB
    copy_size = 64 * MiB if args.quick else 256 * MiB

    kib = TARGET_PAGE_SIZE // 1024
    print(f"fault service: {fault_size // MiB} MiB, every {kib} KiB page faulted once")
    print(f"{'':24}{'CPUs':>8}{'vCPUs':>7}{'faults/s':>12}{'p50':>10}{'p99':>10}{'max':>11}")
    headline = requests = 0.0
    for one_cpu in (False, True):
        for vcpus in (1, 2):
            for measure in (c_served, python_fault_thread, c_fault_loop):
                with pinned(one_cpu):
                    runs = [measure(fault_size, vcpus, args.spin_us) for _ in range(args.repeat)]
                run = max(runs, key=lambda each: each.rate)
                if any(each.mismatches for each in runs):
                    print(f"{run.label}: {run.mismatches} pages held wrong bytes", file=sys.stderr)
                    return 1
                placement = "one" if one_cpu else "spread"
                print(
                    f"{run.label:24}{placement:>8}{vcpus:>7}{run.rate:>12,.0f}"
                    f"{micro(run.latency.p50_ns):>10}{micro(run.latency.p99_ns):>10}"
                    f"{micro(run.latency.max_ns):>11}"
                )
                if measure is c_served and vcpus == 1:
                    headline = max(headline, run.rate)
                if measure is python_fault_thread and vcpus == 1:
                    requests = max(requests, run.rate)

    print(f"\ncopy throughput: {copy_size // MiB} MiB into fresh anonymous {kib} KiB pages, GiB/s")
    for batch in (1, 16, 512):
        repeats = [copy_throughput(copy_size, batch) for _ in range(args.repeat)]
        figures = {name: max(each[name] for each in repeats) for name in repeats[0]}
        row = "  ".join(f"{name} {value:6.2f}" for name, value in figures.items())
        print(f"  {batch * kib:>5} KiB per ioctl:  {row}")
    print(f"\nstream placement: {copy_size // MiB} MiB of wire-like page records, GiB/s")
    repeats = [stream_placement(copy_size) for _ in range(args.repeat)]
    figures = {name: max(each[name] for each in repeats) for name in repeats[0]}
    print("  " + "  ".join(f"{name} {value:5.2f}" for name, value in figures.items()))
    print("reference (bare metal, C): CRIU lazy-pages ~3.2 GiB/s; KVM demand paging ~150k faults/s")
    print(f"request path (Python page source): {requests:.0f} faults/s (1 vCPU)")
    print(f"{headline:.0f} faults/s")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except QmigError as error:
        print(f"uffd_bench: error: {error}", file=sys.stderr)
        sys.exit(1)
