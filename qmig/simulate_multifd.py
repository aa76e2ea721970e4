"""``qmig simulate --multifd N``: both ends' multifd, qmig to qmig.

The source sends precopy RAM in packets over N extra connections to the same listener, right
after the main one (:mod:`qmig.runner.multifd_send`); the destination takes the next N
connections as its multifd channels (:mod:`qmig.runner.peer`). Both ends are qmig, so multifd
goes with postcopy whatever the wire's version (QEMU allows it from 10.1 on): the source
flushes and syncs the channels before the switchover, and postcopy pages go on the main
channel.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from qmig.errors import QmigError
from qmig.protocol.multifd_source import ZERO_PAGE_DETECTIONS, MultifdPlan, MultifdSendOptions
from qmig.protocol.source import Source
from qmig.runner.multifd_send import channel_kind
from qmig.transport import Connection, connect
from qmig.wire.profiles import load_profile, target_page_size

MAX_CHANNELS = 255  # the handshake's channel id is one byte


def check(
    channels: int | None,
    zero_page_detection: str | None,
    *,
    preempt: bool,
    version: str | None,
    machine_type: str | None,
    postcopy: bool,
) -> None:
    """Refuse, in one line naming the option, what the two ends would not do together, or
    what the source's plan refuses (a version without the zero-page-detection asked for)."""
    if channels is None:
        if zero_page_detection is not None:
            raise QmigError("--zero-page-detection", "needs --multifd")
        return
    if not 1 <= channels <= MAX_CHANNELS:
        raise QmigError("--multifd", f"{channels} channels: 1 to {MAX_CHANNELS}")
    if zero_page_detection is not None and zero_page_detection not in ZERO_PAGE_DETECTIONS:
        raise QmigError(
            "--zero-page-detection",
            f"{zero_page_detection!r} is not one of {', '.join(ZERO_PAGE_DETECTIONS)}",
        )
    if preempt:
        # The destination takes the connections after the main one as multifd channels, in
        # order; the preempt channel would be one more it cannot tell from them.
        raise QmigError(
            "--multifd",
            "not together with --preempt: qmig's destination refuses multifd with "
            "postcopy-preempt (use --multifd with --postcopy-after, or --preempt alone)",
        )
    profile = load_profile(version)
    MultifdPlan(
        profile,
        MultifdSendOptions(channels, zero_page_detection, qmig_peer=True),
        machine_type=machine_type or profile.default_machine_type,
        target_page_size=target_page_size(version),
        postcopy=postcopy,
    )


def source_options(
    channels: int | None, zero_page_detection: str | None
) -> MultifdSendOptions | None:
    """The source's multifd settings; the peer is qmig (multifd with postcopy is allowed)."""
    if channels is None:
        return None
    return MultifdSendOptions(channels, zero_page_detection, qmig_peer=True)


def openers(uri: str, channels: int | None) -> dict[str, Callable[[float], Connection]]:
    """Each multifd channel connects to the destination's listener, after the main one."""
    return {
        channel_kind(channel): lambda timeout: connect(uri, timeout)
        for channel in range(channels or 0)
    }


def summary(source: Source, sent_bytes: list[int], destination: dict[str, Any]) -> dict[str, Any]:
    """Both ends' multifd figures, in receive's and replay's words: ``multifd`` (replay's
    plan summary as sent, receive's channel summary as received), ``multifd_pages`` (target
    pages on the main channel and on each multifd channel, as each end counted them) and
    ``multifd_syncs``; None and 0 without multifd."""
    plan = source.multifd
    received = destination.get("multifd")
    if plan is None:
        return {"multifd": None, "multifd_pages": None, "multifd_syncs": 0}
    stats = source.stats
    sent_pages = {"main": stats.precopy_pages + stats.postcopy_pages - sum(plan.pages_per_channel)}
    sent_pages.update({channel_kind(k): count for k, count in enumerate(plan.pages_per_channel)})
    placed = destination.get("placed_pages") or {}
    received_pages = {
        "main": sum(placed.values())
        - destination.get("preempt_pages", 0)
        - destination.get("multifd_pages", 0)
    }
    for channel in (received or {}).get("per_channel", []):
        received_pages[channel_kind(channel["id"])] = channel["pages"] + channel["zero_pages"]
    return {
        "multifd": {
            "sent": {**plan.summary(), "channel_bytes": list(sent_bytes)},
            "received": received,
        },
        "multifd_pages": {"sent": sent_pages, "received": received_pages},
        "multifd_syncs": {
            "sent": plan.syncs,
            "received": 0 if received is None else received["syncs"],
        },
    }
