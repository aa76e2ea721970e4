"""A destination runner's multifd channels: the receiver (:mod:`qmig.runner.multifd_recv`)
joined to the machine (its sync rule, its received bitmaps), the report and the main channel's
limits."""

from __future__ import annotations

import threading
from array import array
from collections.abc import Callable

from qmig.protocol.destination import Destination
from qmig.protocol.multifd import MultifdSyncRule, mark_received
from qmig.runner.channels import Channels
from qmig.runner.destination_report import DestinationReport
from qmig.runner.multifd_recv import MultifdReceiveOptions, MultifdReceiver


def multifd_receiver(
    channels: Channels,
    dest: Destination,
    count: int,
    options: MultifdReceiveOptions,
    *,
    report: DestinationReport,
    report_lock: threading.Lock,
    idle_timeout: float,
    on_error: Callable[[], None],
) -> MultifdReceiver | None:
    """The receiver of ``count`` channels, with ``options``; None without multifd.
    ``on_error``: a channel failed (the runner ends the main channel's reads, so that its
    loop stops and reports the error)."""
    if not count:
        return None
    dest.multifd = MultifdSyncRule(dest.profile, options.flush_after_each_section)

    def alive(count: int) -> None:
        """Bytes on a multifd channel: the source is not idle while the main channel is
        silent (it may be, for a whole pass of RAM), and they count for its rate."""
        meter = channels.main.meter
        if meter is not None:
            meter.got_elsewhere(count)

    def placed(block: str, pages: int, zero: int, spent_ns: int, offsets: array[int]) -> None:
        # Received, for a postcopy recovery's bitmap (before this channel posts its SYNC, so
        # before the switchover's discards clear what the source dirtied since).
        tracker = dest.blocks[block]
        normal = pages - zero
        mark_received(tracker.state, offsets[:normal], tracker.target_page_size)
        mark_received(tracker.state, offsets[normal:], tracker.target_page_size)
        with report_lock:
            report.placing_ns["precopy"] += spent_ns
            report.placed_pages["precopy"] += pages
            report.multifd_pages += pages
            counts = report.block_pages.setdefault(block, [0, 0])
            counts[0] += pages
            counts[1] += zero

    return MultifdReceiver(
        channels,
        count,
        dest.profile.name,
        uuid=options.uuid,
        target_page_size=dest.reader.schema.target_page_size,
        method=options.compression,
        open_timeout=idle_timeout,
        sync_timeout=idle_timeout,
        on_placed=placed,
        on_error=on_error,
        on_bytes=alive,
    )
