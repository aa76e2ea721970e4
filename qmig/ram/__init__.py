"""Destination RAM for postcopy: RAM blocks, userfaultfd, the fault thread and C vCPUs.

This layer knows nothing of the wire format or the protocol. A runner uses it like this::

    specs = [BlockSpec("pc.ram", 512 << 20), BlockSpec("big", 64 << 20, 2 << 20)]
    with RamSession(specs, register=False) as ram:     # registered later, at LISTEN
        faults = ram.start_faults(on_request=send_req_pages)   # or read faults.requests
        ...  # precopy runs of records: ram.block(idstr).place_records(headers, bodies, ...)
        for idstr, start, length in discards:          # before LISTEN
            ram.discard(idstr, start, length)
        ram.register()                                  # LISTEN: missing pages fault now
        ram.start_vcpu("pc.ram", Workload(Pattern.RANDOM, touches=100_000))
        ...  # postcopy runs: place_records again (UFFDIO_COPY runs); single pages:
        ...  #   receive_target_pages(offset, data) or receive_zero(offset, length)
        results = ram.close()                            # safe tear-down; vCPU results
        stats = faults.stats()                           # latency p50/p99/max, blocktime

Modules: :mod:`~qmig.ram.uffd` (the binding), :mod:`~qmig.ram.blocks` (blocks, bitmap, page
placement), :mod:`~qmig.ram.faults` (fault thread, stats), :mod:`~qmig.ram.workload` (C vCPUs),
:mod:`~qmig.ram.session` (set-up and tear-down order), :mod:`~qmig.ram.support` (host check),
:mod:`~qmig.ram.handoff` (the userfaultfd handed to a fault handler in another process).
"""

from qmig.ram.blocks import (
    TARGET_PAGE_SIZE,
    BlockSpec,
    BlockStats,
    RamBlock,
    RamBlocks,
    RecordsResult,
)
from qmig.ram.errors import FaultingSideGoneError, RamError, UffdCallError
from qmig.ram.faults import FaultStats, FaultThread, LatencySummary, PageRequest, StrayFault
from qmig.ram.session import RamSession
from qmig.ram.support import SupportReport, check_host
from qmig.ram.uffd import PlaceResult, Userfaultfd
from qmig.ram.workload import Pattern, Vcpus, Workload, WorkloadResult

__all__ = [
    "TARGET_PAGE_SIZE",
    "BlockSpec",
    "BlockStats",
    "FaultStats",
    "FaultThread",
    "FaultingSideGoneError",
    "LatencySummary",
    "PageRequest",
    "Pattern",
    "PlaceResult",
    "RamBlock",
    "RamBlocks",
    "RamError",
    "RamSession",
    "RecordsResult",
    "StrayFault",
    "SupportReport",
    "UffdCallError",
    "Userfaultfd",
    "Vcpus",
    "Workload",
    "WorkloadResult",
    "check_host",
]
