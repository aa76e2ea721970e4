"""The integrity oracle for qmig's test guest after a migration.

The guest adds one to the first byte of every page of ``[start, end)``, in the order of its walk
(address order by default), pass after pass. Stopped at any instant, memory therefore shows the
counters of one pass: either all equal (stopped between passes), or, in the walk's order, a low
run one higher (mod 256) than the high run from the page the incrementer was about to touch.
Any other picture means a page was lost, duplicated from an older round, or placed at the
wrong address.
"""

from __future__ import annotations

from dataclasses import dataclass

from qmig.errors import VerificationError
from qmig.qemu.guest import GuestSpec

SHOWN_BAD_PAGES = 8


@dataclass(frozen=True)
class CounterPicture:
    """What a consistent dump looked like: value of the low run, and where the high run starts."""

    low_value: int
    boundary: int | None  # guest address of the first page of the high run; None: all equal
    pages: int


def page_counters(dump: bytes, dump_address: int, spec: GuestSpec) -> bytes:
    """The counter byte of every page the guest writes, out of a dump taken at ``dump_address``."""
    first = spec.start - dump_address
    last = spec.end - dump_address
    if first < 0 or last > len(dump):
        raise VerificationError(
            "memory dump",
            f"covers {dump_address:#x}..{dump_address + len(dump):#x}, "
            f"the guest writes {spec.start:#x}..{spec.end:#x}",
        )
    return dump[first : last : spec.stride]


def _best_split(counters: bytes, low: int) -> tuple[int, list[int]]:
    """The boundary that leaves the fewest pages unexplained for this low-run value."""
    high = (low - 1) % 256
    cost = sum(1 for value in counters if value != high)  # boundary 0: everything is high
    best_cost, best_boundary = cost, 0
    for index, value in enumerate(counters):
        cost += (value != low) - (value != high)
        if cost < best_cost:
            best_cost, best_boundary = cost, index + 1
    bad = [i for i in range(best_boundary) if counters[i] != low]
    bad += [i for i in range(best_boundary, len(counters)) if counters[i] != high]
    return best_boundary, bad


def verify_counters(dump: bytes, dump_address: int, spec: GuestSpec) -> CounterPicture:
    """Check a dump of a stopped guest; raise VerificationError naming the first bad pages."""
    counters = _in_walk_order(page_counters(dump, dump_address, spec), spec)

    def address(index: int) -> int:  # of the page touched index-th in a pass; past the last
        return spec.end if index >= spec.pages else spec.start + spec.touched(index) * spec.stride

    if not counters:
        raise VerificationError("memory dump", "the guest range holds no pages")
    # In a consistent picture the commonest value is one of the two runs.
    common = max(set(counters), key=counters.count)
    candidates = [(low, *_best_split(counters, low)) for low in (common, (common + 1) % 256)]
    low, boundary, bad = min(candidates, key=lambda candidate: len(candidate[2]))
    if bad:
        shown = ", ".join(f"{address(i):#x}={counters[i]}" for i in bad[:SHOWN_BAD_PAGES])
        raise VerificationError(
            "memory content inconsistency",
            f"{len(bad)} of {len(counters)} pages break the pattern (best fit: {low} below "
            f"{address(boundary):#x}, {(low - 1) % 256} from there); "
            f"first bad pages (address=value): {shown}",
        )
    if boundary in (0, len(counters)):
        return CounterPicture(counters[0], None, len(counters))
    return CounterPicture(low, address(boundary), len(counters))


def _in_walk_order(counters: bytes, spec: GuestSpec) -> bytes:
    if spec.walk == 1:
        return counters
    return bytes(counters[spec.touched(index)] for index in range(spec.pages))
