"""The destination's multifd options (``qmig receive --multifd N`` and what goes with it)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from qmig.cli.multifd_source_options import migration_uuid
from qmig.cli.options import positive_count

if TYPE_CHECKING:
    from qmig.runner.multifd_recv import MultifdReceiveOptions

# QEMU's multifd-compression values -> the packet flags' method names (formats/*.toml).
COMPRESSION = {"none": "NOCOMP", "zlib": "ZLIB", "zstd": "ZSTD"}


def add_multifd(parser: Any) -> None:
    group = parser.add_argument_group("multifd")
    group.add_argument(
        "--multifd",
        type=positive_count,
        default=0,
        metavar="N",
        help="the source has the multifd capability with multifd-channels N: accept N more "
        "connections (told from the main one by their handshake) and read each on its own "
        "thread (default: no multifd)",
    )
    group.add_argument(
        "--multifd-compression",
        choices=sorted(COMPRESSION),
        help="the multifd-compression parameter: every packet with pages must use it "
        "(default: take what the packets say)",
    )
    group.add_argument(
        "--multifd-flush-after-each-section",
        choices=["on", "off"],
        help="sync the channels at each RAM section's end as well as at MULTIFD_FLUSH "
        "(default: from the machine type, as QEMU: on for 8.0 and older, and always in 7.2)",
    )
    group.add_argument(
        "--uuid",
        type=migration_uuid,
        default=bytes(16),
        metavar="UUID",
        help="this destination's UUID (QEMU's -uuid), which each multifd handshake must carry "
        "(default: all zeros, as QEMU without -uuid)",
    )


def multifd_options(args: argparse.Namespace) -> MultifdReceiveOptions:
    from qmig.runner.multifd_recv import MultifdReceiveOptions

    flush = args.multifd_flush_after_each_section
    return MultifdReceiveOptions(
        uuid=args.uuid,
        compression=None if args.multifd_compression is None
        else COMPRESSION[args.multifd_compression],
        flush_after_each_section=None if flush is None else flush == "on",
    )  # fmt: skip


def multifd_openings(version: str) -> list[bytes]:
    """The bytes a multifd channel opens with (magic, version): the given QEMU version's, or
    with ``auto`` those of every version that has multifd."""
    from qmig.cli.versions import AUTO
    from qmig.wire.multifd import multifd_schema
    from qmig.wire.profiles import available_versions, load_profile

    versions = available_versions() if version == AUTO else [version]
    openings = []
    for name in versions:
        spec = load_profile(name).multifd
        if spec is not None:
            schema = multifd_schema(name)
            openings.append(bytes(schema.init.build(dict(
                magic=spec.magic, version=spec.version, uuid=bytes(16), id=0,
                unused1=bytes(7), unused2=bytes(32),
            )))[:8])  # fmt: skip
    return list(dict.fromkeys(openings))
