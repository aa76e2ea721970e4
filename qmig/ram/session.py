"""The destination's RAM for one postcopy run, set up and torn down in the one safe order.

Set-up: unlock memory if the process is mlocked (a locked mapping is populated at once, so its
pages would never fault and postcopy pages would bounce off as EEXIST), map the blocks, open
and handshake the userfaultfd, register every block. A destination registers later, at
LISTEN, as QEMU does (``register=False``, then :meth:`RamSession.register`): until then
precopy pages are written straight into memory, which is much cheaper than UFFDIO_COPY.

Tear-down (:meth:`RamSession.close`), which must not leave a thread hanging nor hand one a
zero page as if it were data: raise the vCPUs' abort flag, stop the fault thread, unregister
the blocks (which wakes any thread still waiting on a page — onto a fresh zero page, which the
abort flag marks as not guest data), join the vCPUs, close the descriptor, turn THP back on,
unmap, and lock memory again if it was locked.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from qmig.errors import QmigError
from qmig.ram.blocks import BlockSpec, RamBlock, RamBlocks
from qmig.ram.fault_requests import FaultRequests
from qmig.ram.faults import FaultThread, PageRequest, StrayFault
from qmig.ram.support import lock_memory_again, unlock_memory
from qmig.ram.uffd import FEATURE_MISSING_HUGETLBFS, FEATURE_THREAD_ID, Userfaultfd
from qmig.ram.workload import Vcpus, Workload, WorkloadResult


class RamSession:
    """Blocks, userfaultfd, fault thread and vCPUs of one destination."""

    def __init__(
        self, specs: Iterable[BlockSpec], *, register: bool = True, events: int = 0
    ) -> None:
        """``events``: userfaultfd event features the descriptor must have as well (none:
        qmig serves page faults only; with one, its fault thread meets what it reports)."""
        # Unlock before mapping: with MCL_FUTURE in force, new mappings are populated at once.
        self._relock_flags = unlock_memory()
        self.uffd: Userfaultfd | None = None
        try:
            self.blocks = RamBlocks(specs)
        except BaseException:
            self._relock()
            raise
        self._thp_off = False
        try:
            need = events | (FEATURE_MISSING_HUGETLBFS if self.blocks.needs_huge_pages else 0)
            self.uffd = Userfaultfd(want_features=FEATURE_THREAD_ID, need_features=need)
            if register:
                self.blocks.attach(self.uffd)
        except BaseException:
            self._release()
            raise
        self.registered = register
        self.vcpus = Vcpus()
        self.faults: FaultThread | None = None
        self.results: list[WorkloadResult] = []

    def __enter__(self) -> RamSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def block(self, idstr: str) -> RamBlock:
        return self.blocks[idstr]

    def start_faults(
        self,
        on_request: Callable[[PageRequest], None] | None = None,
        on_stray: Callable[[StrayFault], None] | None = None,
        *,
        sources: Mapping[str, Any] | None = None,
        requests: FaultRequests | None = None,
    ) -> FaultThread:
        """Start the fault thread: requests go to ``on_request``, or, with ``sources`` (per
        block, a buffer laid out like it), faults are served from them in C; with
        ``requests``, faults become page requests in C (:mod:`qmig.ram.fault_requests`)."""
        assert self.uffd is not None
        self.faults = FaultThread(
            self.uffd, self.blocks, on_request, on_stray, sources=sources, requests=requests
        ).start()
        return self.faults

    def start_vcpu(
        self, idstr: str, workload: Workload, offset: int = 0, length: int | None = None
    ) -> None:
        self.vcpus.start(self.blocks[idstr], workload, offset, length)

    def register(self) -> None:
        """Register every block (at LISTEN). THP goes off first, as around discards: a page
        that is not in place must stay missing, and a huge page collapsed around it would fill
        it with zeros. Pages already written stay; see :meth:`RamBlock.attach`."""
        assert self.uffd is not None
        if self.registered:
            return
        if not self._thp_off:
            self.prepare_discard()
        try:
            self.blocks.attach(self.uffd)
        except BaseException:
            self.blocks.detach()
            raise
        self.registered = True

    def prepare_discard(self) -> None:
        """Before the discards: THP off on every block (done by the first discard anyway)."""
        self.blocks.set_thp(False)
        self._thp_off = True

    def discard(self, idstr: str, start: int, length: int) -> None:
        """Discard ``[start, start+length)`` of block ``idstr`` (bytes, host-page aligned)."""
        if not self._thp_off:
            self.prepare_discard()
        self.blocks[idstr].discard(start, length)

    def discard_ranges(self, idstr: str, ranges: bytes) -> int:
        """Discard many ranges of block ``idstr`` at once; ``ranges``: (start, length) byte
        pairs as big-endian u64s (see :meth:`RamBlock.discard_ranges`). Returns target pages."""
        if not self._thp_off:
            self.prepare_discard()
        return self.blocks[idstr].discard_ranges(ranges)

    def stop_serving(self) -> None:
        """Stop the fault thread and unregister the blocks, keeping them mapped: from here a
        missing page reads as zero instead of faulting, so that anyone may read the RAM (even
        another process). The vCPUs must be done. :meth:`close` still ends the session."""
        if self.faults is not None:
            self.faults.stop()
        self.blocks.detach()

    def close(self, join_timeout: float = 30.0) -> list[WorkloadResult]:
        """Tear down in the safe order; returns the vCPUs' results."""
        if self.uffd is None:
            return self.results
        self.vcpus.abort()
        stuck_faults: BaseException | None = None
        if self.faults is not None:
            try:
                self.faults.stop()
            except QmigError as error:  # stuck in a callback; release the vCPUs regardless
                stuck_faults = error
        try:
            self.blocks.detach()
            self.results = self.vcpus.join(join_timeout)
        except BaseException:
            # A vCPU may still be running: leak the mappings rather than pull them from
            # under it.
            self._release(unmap=False)
            raise
        # A fault thread still inside a callback must not find its blocks unmapped.
        self._release(unmap=stuck_faults is None)
        if stuck_faults is not None:
            raise stuck_faults
        return self.results

    def _release(self, *, unmap: bool = True) -> None:
        if self.uffd is not None:
            self.uffd.close()
            self.uffd = None
        if unmap:
            self.blocks.set_thp(True)
            self.blocks.close()
        self._relock()

    def _relock(self) -> None:
        if self._relock_flags:
            lock_memory_again(self._relock_flags)
            self._relock_flags = 0
