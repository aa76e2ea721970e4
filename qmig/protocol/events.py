"""What the state machines tell their runner: plain dataclasses, one per decision."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qmig.wire import messages as m
from qmig.wire.discard import DiscardRanges

# --- destination -> runner -------------------------------------------------------------


@dataclass(frozen=True)
class StreamOpened:
    configuration: m.Configuration | None


@dataclass(frozen=True)
class RamBlocksAnnounced:
    """The source's RAMBlocks (MEM_SIZE): map them."""

    blocks: tuple[m.RamBlockInfo, ...]


@dataclass(frozen=True)
class PostcopyAdvised:
    page_size_summary: int | None
    target_page_size: int | None


@dataclass(frozen=True)
class RangesDiscarded:
    """Drop these byte ranges of a block before LISTEN: they changed after they were sent.

    One event per POSTCOPY_RAM_DISCARD command; ``ranges.packed`` is the command's
    (start, length) pairs as on the wire, ready for ``RamBlock.discard_ranges``.
    """

    block: str
    ranges: DiscardRanges


@dataclass(frozen=True)
class ListenStarted:
    """From here on, missing pages fault: register RAM with userfaultfd."""


@dataclass
class PagesReceived:
    """Place these pages: directly during precopy, atomically by host page in postcopy.

    ``run`` refers to the machine's receive buffer and is valid until the next call.
    """

    run: m.RamPageRun
    postcopy: bool


@dataclass(frozen=True)
class DeviceStateLoaded:
    idstr: str
    instance_id: int
    version_id: int
    data: bytes


@dataclass(frozen=True)
class GuestRunning:
    """POSTCOPY_RUN: the guest runs on the destination now."""


@dataclass(frozen=True)
class MigrationCompleted:
    """The stream ended cleanly; SHUT(0) is queued on the return path."""

    postcopy: bool


@dataclass(frozen=True)
class PageRequested:
    """A fault became a request on the return path."""

    block: str
    start: int
    length: int
    message: m.ReqPages | m.ReqPagesId


@dataclass(frozen=True)
class Notice:
    """Something QEMU reports but does not fail on."""

    what: str
    detail: str
    offset: int | None = None


# --- source -> runner -------------------------------------------------------------------


@dataclass(frozen=True)
class PongReceived:
    value: int


@dataclass(frozen=True)
class RequestReceived:
    block: str
    start: int
    length: int


@dataclass(frozen=True)
class DestinationShut:
    status: int


@dataclass(frozen=True)
class PhaseChanged:
    phase: Any
