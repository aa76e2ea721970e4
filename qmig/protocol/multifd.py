"""Where a multifd destination waits for its channels: the sync rules, sans-IO.

Pages travel on the multifd channels while the main stream goes on; nothing orders the two
except the syncs. At a sync point of the main stream the destination waits until every channel
has read its SYNC packet (and placed what came before it), and each channel waits there until
the main stream has reached the sync point. So a page sent again after a sync (on any channel,
or as a ZERO record on the main one) is placed after its older version: the newest wins.

Which main-stream records are sync points (QEMU's ``ram_load_precopy``, facts in the profile's
``[multifd]`` table): a MULTIFD_FLUSH record (8.1+), and a RAM section's EOS when
``multifd-flush-after-each-section`` is on, which 7.2 always is and which 8.1+ takes from the
machine type's compat properties (8.0 and older: on). The machine type comes with the
CONFIGURATION section; the caller may fix the setting instead, as ``-global
migration.multifd-flush-after-each-section=...`` does for QEMU.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass

from qmig.errors import QmigError
from qmig.protocol import events as ev
from qmig.protocol.preempt import machine_version
from qmig.wire import messages as m
from qmig.wire.multifd_profile import MultifdSpec
from qmig.wire.profiles import Profile


@dataclass(frozen=True)
class MultifdSyncPoint(ev.Event):
    """Wait here until every multifd channel has read its next SYNC packet, then release them.

    ``record`` names the main-stream record (EOS or MULTIFD_FLUSH), at ``offset``."""

    record: str
    offset: int


class MultifdSyncRule:
    """Decides which main-stream records are sync points, for one migration."""

    def __init__(self, profile: Profile, flush_after_each_section: bool | None = None) -> None:
        """``flush_after_each_section``: the destination's setting, or None to take it from
        the machine type (the version's default until the CONFIGURATION names one)."""
        if profile.multifd is None:
            raise QmigError("--multifd", f"QEMU {profile.name} has no multifd")
        self.spec: MultifdSpec = profile.multifd
        self.fixed = flush_after_each_section
        self.flush_after_each_section = (
            flush_after_each_section
            if flush_after_each_section is not None
            else self.spec.section_sync_machines == "all"
        )
        self.syncs = 0

    def machine(self, machine_type: str | None) -> None:
        """The CONFIGURATION's machine type decides the setting (unless it was fixed)."""
        if self.fixed is not None or machine_type is None:
            return
        self.flush_after_each_section = section_sync(self.spec, machine_type)

    def sync_point(self, message: object, offset: int) -> MultifdSyncPoint | None:
        """The sync point ``message`` (a main-stream RAM record) makes, if any."""
        if isinstance(message, m.RamMultifdFlush) and self.spec.main_flush:
            point = MultifdSyncPoint("MULTIFD_FLUSH", offset)
        elif isinstance(message, m.RamEos) and self.flush_after_each_section:
            point = MultifdSyncPoint("EOS", offset)
        else:
            return None
        self.syncs += 1
        return point


def section_sync(spec: MultifdSpec, machine_type: str) -> bool:
    """Is multifd-flush-after-each-section on for ``machine_type`` (``pc-i440fx-8.0``)? An
    alias without a version (``pc``) is the newest machine type: off, where it can be."""
    if spec.section_sync_machines is None:
        return False
    if spec.section_sync_machines == "all":
        return True
    version = machine_version(machine_type)
    limit = machine_version("-" + spec.section_sync_machines)
    return version is not None and limit is not None and version <= limit


def mark_received(state: bytearray, offsets: array[int], target_page_size: int) -> None:
    """Record target pages placed by a multifd channel (byte ``offsets`` in their block) in
    the destination's per-page map, as pages of the main channel are: a postcopy recovery
    sends that map as its received bitmap, and the source sends again only what it lacks.
    A packet's pages are nearly always one run, marked with one slice."""
    if not offsets:
        return
    start, end = offsets[0], offsets[-1]
    if offsets == array("Q", range(start, end + 1, target_page_size)):
        first = start // target_page_size
        state[first : first + len(offsets)] = b"\1" * len(offsets)
        return
    for offset in offsets:
        state[offset // target_page_size] = 1
