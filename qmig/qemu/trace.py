"""QEMU's own fault latency, from its trace events, for QEMU versions that do not report it.

QEMU 10.1 reports postcopy fault latency in ``query-migrate``; older destinations do not, but
every build with the ``log`` trace backend (Debian's, 7.2 and 10.0) can log each userfault its
fault thread reads (``postcopy_ram_fault_thread_request``, with the faulting address) and
each host page it places (``postcopy_place_page`` and ``postcopy_place_page_zero``, with the
page's address), stamped to the microsecond with ``-msg timestamp=on``. A fault's latency is
then the time from its line to the first placement of its host page after it: the same
span as qmig's ``fault_latency_us`` (fault read → page placed).

A fault whose page was placed before the fault thread read it is *late*, and left out, as
qmig leaves such faults out of its own figures (the placement woke the vCPU, not an answer).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

FAULT_EVENT = "postcopy_ram_fault_thread_request"
PLACE_EVENTS = ("postcopy_place_page", "postcopy_place_page_zero")

# "<tid>@<seconds>.<microseconds>:<event> <arguments>", the log backend's line with a timestamp
_LINE = re.compile(r"^\d+@(\d+)\.(\d{6}):(\w+) (.*)$")
_FAULT_ADDRESS = re.compile(r"HVA=0x([0-9a-fA-F]+)")
_PLACE_ADDRESS = re.compile(r"host=0x([0-9a-fA-F]+)")


def fault_trace_args(log: Path) -> list[str]:
    """The QEMU options that log a destination's faults and placements to ``log``."""
    events = [arg for event in (FAULT_EVENT, *PLACE_EVENTS) for arg in ("-trace", event)]
    return [*events, "-msg", "timestamp=on", "-D", str(log)]


@dataclass
class TracedFaults:
    """The faults of one trace: each one's fault → placed in ns (``latencies_ns``), the
    faults on pages placed before the fault was read (``late``) and those whose page the
    trace never shows placed (``unplaced``)."""

    latencies_ns: list[int] = field(default_factory=list)
    late: int = 0
    unplaced: int = 0


def _events(lines: Iterable[str]) -> list[tuple[int, bool, int]]:
    """(time in ns, is a fault, address) of every fault and placement line, in time order
    (the log's threads write their lines in turn, not strictly in time order)."""
    events = []
    for line in lines:
        match = _LINE.match(line)
        if match is None:
            continue
        seconds, micros, event, arguments = match.groups()
        if event == FAULT_EVENT:
            address = _FAULT_ADDRESS.search(arguments)
        elif event in PLACE_EVENTS:
            address = _PLACE_ADDRESS.search(arguments)
        else:
            continue
        if address is None:
            continue
        at = int(seconds) * 1_000_000_000 + int(micros) * 1000
        events.append((at, event == FAULT_EVENT, int(address.group(1), 16)))
    events.sort(key=lambda event: event[0])
    return events


def traced_faults(lines: Iterable[str], page_size: int) -> TracedFaults:
    """The faults of a trace's ``lines``, each matched with the first placement of its host
    page (``page_size`` bytes) at or after it."""
    result = TracedFaults()
    placed: set[int] = set()
    waiting: dict[int, list[int]] = {}
    for at, fault, address in _events(lines):
        page = address - address % page_size
        if fault:
            if page in placed:
                result.late += 1
            else:
                waiting.setdefault(page, []).append(at)
        elif page not in placed:
            placed.add(page)
            result.latencies_ns += [at - faulted for faulted in waiting.pop(page, [])]
    result.unplaced = sum(len(faults) for faults in waiting.values())
    return result


def traced_fault_file(log: Path, page_size: int) -> TracedFaults:
    """:func:`traced_faults` of the log file QEMU wrote."""
    with log.open(encoding="utf-8", errors="replace") as lines:
        return traced_faults(lines, page_size)
