"""The multifd options of a sending command (replay, simulate)."""

from __future__ import annotations

import argparse
import uuid
from typing import Any

from qmig.protocol.zero_page_detection import ZERO_PAGE_DETECTIONS

MAX_CHANNELS = 255  # the handshake's channel id is one byte


def channel_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of channels") from None
    if not 1 <= value <= MAX_CHANNELS:
        raise argparse.ArgumentTypeError(f"{value} channels: 1 to {MAX_CHANNELS}")
    return value


def migration_uuid(text: str) -> bytes:
    """A QEMU ``-uuid`` (as multifd handshakes carry it), for --uuid on either side."""
    try:
        return uuid.UUID(text).bytes
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a UUID") from None


def add_multifd_source(parser: Any, *, uuid: bool = True) -> None:
    """``uuid``: offer --uuid (not where both ends are qmig's own, as in simulate)."""
    group = parser.add_argument_group("multifd")
    group.add_argument(
        "--multifd",
        type=channel_count,
        metavar="N",
        help="send precopy RAM in packets over N extra connections, as QEMU's multifd "
        "capability with multifd-channels N (the destination must have both set; "
        "default: no multifd)",
    )
    group.add_argument(
        "--zero-page-detection",
        choices=ZERO_PAGE_DETECTIONS,
        help="with --multifd: legacy sends zero pages as ZERO records on the main channel, "
        "multifd lists them in the packets (QEMU 9.0+), none sends them as data "
        "(default: the version's, for the machine type)",
    )
    if not uuid:
        return
    group.add_argument(
        "--uuid",
        type=migration_uuid,
        metavar="UUID",
        help="with --multifd: the destination QEMU's -uuid, which it expects in every "
        "channel's handshake (default: none, all zeros; libvirt sets the domain's)",
    )
