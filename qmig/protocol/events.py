"""What the state machines tell their runner: dataclasses, one per decision, all of them
:class:`Event`s, so that ``next_event()`` has one type (or the reader's NEED_DATA / END)."""

from __future__ import annotations

from dataclasses import dataclass

from qmig.protocol.states import SourceState
from qmig.wire import messages as m
from qmig.wire.discard import DiscardRanges
from qmig.wire.reading.records import Sentinel as Sentinel  # next_event()'s "no event" type


class Event:
    """Base of every event (a plain class: frozen and mutable dataclasses both derive it)."""

    __slots__ = ()


# --- destination -> runner -------------------------------------------------------------


@dataclass(frozen=True)
class StreamOpened(Event):
    configuration: m.Configuration | None


@dataclass(frozen=True)
class RamBlocksAnnounced(Event):
    """The source's RAMBlocks (MEM_SIZE): map them."""

    blocks: tuple[m.RamBlockInfo, ...]


@dataclass(frozen=True)
class PostcopyAdvised(Event):
    page_size_summary: int | None
    target_page_size: int | None


@dataclass(frozen=True)
class RangesDiscarded(Event):
    """Drop these byte ranges of a block before LISTEN: they changed after they were sent.

    One event per POSTCOPY_RAM_DISCARD command; ``ranges.packed`` is the command's
    (start, length) pairs as on the wire, ready for ``RamBlock.discard_ranges``.
    """

    block: str
    ranges: DiscardRanges


@dataclass(frozen=True)
class ListenStarted(Event):
    """From here on, missing pages fault: register RAM with userfaultfd."""


@dataclass
class PagesReceived(Event):
    """Place these pages: directly during precopy, atomically by host page in postcopy.

    ``run`` refers to the machine's receive buffer and is valid until the next call.
    """

    run: m.RamPageRun
    postcopy: bool


@dataclass(frozen=True)
class DeviceStateLoaded(Event):
    idstr: str
    instance_id: int
    version_id: int
    data: bytes


@dataclass(frozen=True)
class GuestRunning(Event):
    """POSTCOPY_RUN: the guest runs on the destination now."""


@dataclass(frozen=True)
class MigrationCompleted(Event):
    """The stream ended cleanly; SHUT(0) is queued on the return path."""

    postcopy: bool


@dataclass(frozen=True)
class PageRequested(Event):
    """A fault became a request on the return path."""

    block: str
    start: int
    length: int
    message: m.ReqPages | m.ReqPagesId


@dataclass(frozen=True)
class Notice(Event):
    """Something QEMU reports but does not fail on."""

    what: str
    detail: str
    offset: int | None = None


@dataclass(frozen=True)
class Paused(Event):
    """The channel broke after RUN: postcopy is paused. Keep RAM and the vCPUs blocked, and
    wait for a new channel (QEMU's ``postcopy-paused``)."""


@dataclass(frozen=True)
class PartialHostPageDropped(Event):
    """Part of a host page had arrived when the channel broke: drop what the RAM gathered
    of it; it is asked for again."""

    block: str
    host_offset: int


@dataclass(frozen=True)
class Resumed(Event):
    """POSTCOPY_RESUME: RESUME_ACK and the ``resent`` pending requests are queued."""

    recoveries: int
    resent: int


# --- source -> runner -------------------------------------------------------------------


@dataclass(frozen=True)
class PongReceived(Event):
    value: int


@dataclass(frozen=True)
class RequestReceived(Event):
    block: str
    start: int
    length: int
    # Every page it asks for was clean when it was read: sent already (QEMU 7.2's source
    # traces such a request as get_queued_page_not_dirty), so nothing goes out for it.
    already_sent: bool = False


@dataclass(frozen=True)
class DestinationShut(Event):
    status: int


@dataclass(frozen=True)
class BitmapReceived(Event):
    """Recovery: a block's received bitmap came; ``missing`` target pages go out again."""

    block: str
    missing: int


@dataclass(frozen=True)
class PhaseChanged(Event):
    """The source moved from one state to another (every change is reported, in order)."""

    old: SourceState
    new: SourceState


@dataclass(frozen=True)
class PassCompleted(Event):
    """A precopy pass is out: sync the dirty log, then begin_pass, start_postcopy or
    complete_precopy. ``passes`` counts the passes so far, this one included."""

    passes: int
