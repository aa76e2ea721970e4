"""Guest-like workload threads ("vCPUs") that touch RAM from C.

A Python thread that touches a missing page blocks inside the kernel while holding the GIL;
the fault thread, being Python too, could then never run to serve the page, and the process
would hang. So every touch happens in ``qmig_workload_run``, a C loop that cffi calls with the
GIL released: a blocked vCPU holds nothing but its own stack.

Workloads: sequential, random, or a hot set; read-only or read-then-write; optionally rate
limited (a dirtier). With ``tag_xor`` set, every touched page must start with the tag that
:func:`tagged_pages` writes, so a page that arrived with the wrong bytes — or a zero page left
behind by a torn-down area — is counted as a mismatch rather than missed.

The abort flag is checked after every touch. Tearing a block down releases blocked vCPUs onto
fresh zero pages; the flag, set *before* the teardown, makes them report ``aborted`` instead of
treating those zeros as guest data.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from qmig.ram._uffd import ffi, lib
from qmig.ram.blocks import TARGET_PAGE_SIZE, RamBlock
from qmig.ram.errors import RamError
from qmig.ram.uffd import name_this_thread


class Pattern(IntEnum):
    SEQUENTIAL = 0
    RANDOM = 1
    HOTSET = 2


@dataclass(frozen=True)
class Workload:
    pattern: Pattern = Pattern.SEQUENTIAL
    write: bool = False
    touches: int | None = None  # None: one touch per page of the range
    seed: int = 1
    hot_fraction: float = 0.1  # HOTSET: share of the range that is hot
    hot_share: float = 0.9  # HOTSET: share of touches that go to the hot part
    rate: float | None = None  # touches per second; None: unlimited
    tag_xor: int | None = None  # check each page's tag (see tagged_pages)

    @classmethod
    def dirtier(cls, rate: float, touches: int, seed: int = 1) -> Workload:
        """A rate-limited writer over random pages, like a guest dirtying memory."""
        return cls(Pattern.RANDOM, write=True, touches=touches, seed=seed, rate=rate)


@dataclass(frozen=True)
class WorkloadResult:
    touches: int
    mismatches: int
    first_mismatch: int | None  # block offset of the first page with a wrong tag
    checksum: int
    thread_id: int
    elapsed_ns: int
    aborted: bool


def tagged_pages(block_offset: int, length: int, tag_xor: int) -> bytearray:
    """Page source for tests and benchmarks: each 4 KiB page starts with its own tag."""
    data = bytearray(length)
    lib.qmig_fill_tags(
        int(ffi.cast("uintptr_t", ffi.from_buffer(data))),
        length,
        TARGET_PAGE_SIZE,
        block_offset,
        tag_xor,
    )
    return data


class Vcpu:
    """One workload thread over ``[offset, offset+length)`` of a block."""

    def __init__(
        self, block: RamBlock, workload: Workload, offset: int, length: int, abort: Any
    ) -> None:
        if offset < 0 or length <= 0 or offset + length > block.used_length:
            raise RamError(
                f"block '{block.idstr}': workload range 0x{offset:x}+0x{length:x} is outside "
                f"its used length 0x{block.used_length:x}"
            )
        pages = length // TARGET_PAGE_SIZE
        config = ffi.new("struct qmig_workload *")
        config.base = block.host_address + offset
        config.length = length
        config.stride = TARGET_PAGE_SIZE
        config.touches = pages if workload.touches is None else workload.touches
        config.seed = workload.seed
        config.hot_pages = max(1, int(pages * workload.hot_fraction))
        config.hot_percent = int(workload.hot_share * 100)
        config.pattern = int(workload.pattern)
        config.write = 1 if workload.write else 0
        config.check = 0 if workload.tag_xor is None else 1
        config.tag_xor = workload.tag_xor or 0
        config.tag_base = offset
        config.rate = int(workload.rate or 0)
        config.abort = abort
        self.block_offset = offset
        self._config = config
        self._abort = abort  # the flag must outlive the thread
        self._thread = threading.Thread(target=self._run, name="qmig-vcpu", daemon=True)

    def _run(self) -> None:
        name_this_thread()
        lib.qmig_workload_run(self._config)

    def start(self) -> Vcpu:
        self._thread.start()
        return self

    def join(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def result(self) -> WorkloadResult:
        if self._thread.is_alive():
            raise RamError("workload result asked for while the vCPU is still running")
        config = self._config
        return WorkloadResult(
            touches=int(config.done),
            mismatches=int(config.mismatches),
            first_mismatch=(
                None if not config.mismatches else self.block_offset + int(config.first_mismatch)
            ),
            checksum=int(config.checksum),
            thread_id=int(config.tid),
            elapsed_ns=int(config.t_end_ns - config.t_start_ns),
            aborted=bool(config.aborted),
        )


class Vcpus:
    """A group of workload threads sharing one abort flag."""

    def __init__(self) -> None:
        self._abort = ffi.new("int32_t *")
        self.threads: list[Vcpu] = []

    def start(
        self,
        block: RamBlock,
        workload: Workload,
        offset: int = 0,
        length: int | None = None,
    ) -> Vcpu:
        length = block.used_length - offset if length is None else length
        vcpu = Vcpu(block, workload, offset, length, self._abort).start()
        self.threads.append(vcpu)
        return vcpu

    @property
    def aborted(self) -> bool:
        return bool(self._abort[0])

    def abort(self) -> None:
        """Tell every vCPU that whatever it reads from now on is not guest data."""
        self._abort[0] = 1

    def join(self, timeout: float = 30.0) -> list[WorkloadResult]:
        deadline = time.monotonic() + timeout
        for vcpu in self.threads:
            vcpu.join(max(0.0, deadline - time.monotonic()))
        stuck = sum(vcpu.alive for vcpu in self.threads)
        if stuck:
            raise RamError(f"{stuck} vCPU threads are still blocked after {timeout} s")
        return [vcpu.result() for vcpu in self.threads]
