"""``qmig export-pcap [DIR FILE.pcapng] [--lua FILE.lua]``: a capture for Wireshark.

Writes a capture folder (``qmig capture``'s, or a fixture's xz-compressed one, or a bare
stream file) as a pcapng file, each channel (main, postcopy-preempt, multifd-K, and each
connection a recovery opened) a synthetic TCP connection, and/or the Lua dissector for the
chosen ``--qemu-version``, which decodes them in Wireshark or tshark.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from qmig.cli import add_json, add_qemu_version
from qmig.errors import QmigError


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "export-pcap",
        help="write a capture as pcapng for Wireshark, and the Lua dissector that decodes it",
        description="Write a capture folder (or a stream file) as a pcapng file: each channel "
        "(main with its return path, postcopy-preempt, each multifd connection) a synthetic "
        "TCP connection to the destination's one port, every chunk at its recorded time; "
        "and/or the Lua dissector of the chosen QEMU version's wire format.",
    )
    parser.add_argument(
        "capture",
        type=Path,
        nargs="?",
        metavar="DIR",
        help="the capture folder (or a bare stream file) to export",
    )
    parser.add_argument(
        "out", type=Path, nargs="?", metavar="FILE.pcapng", help="the pcapng file to write"
    )
    parser.add_argument(
        "--lua",
        type=Path,
        metavar="FILE.lua",
        help="also write the Wireshark dissector here (default: no dissector)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=None,
        help="the destination's TCP port in the pcapng (default 4444, the dissector's)",
    )
    parser.add_argument(
        "--segment-size",
        type=int,
        default=None,
        metavar="BYTES",
        help="largest TCP payload per packet (default 65495, the most an IPv4 packet holds)",
    )
    add_qemu_version(parser)
    add_json(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.capture is not None and args.out is None:
        raise QmigError("export-pcap", "give the pcapng file to write after the capture folder")
    if args.capture is None and args.lua is None:
        raise QmigError("export-pcap", "nothing to do: give DIR FILE.pcapng, --lua FILE, or both")
    report: dict[str, Any] = {}
    if args.lua is not None:
        from qmig.wireshark import dissector

        text = dissector.render(args.qemu_version)
        args.lua.write_text(text)
        report["lua"] = {"path": str(args.lua), "qemu_version": args.qemu_version or "default"}
    if args.capture is not None:
        from qmig.pcap import DEFAULT_PORT, MAX_SEGMENT, write_pcapng

        summary = write_pcapng(
            args.capture,
            args.out,
            port=DEFAULT_PORT if args.port is None else args.port,
            max_segment=MAX_SEGMENT if args.segment_size is None else args.segment_size,
        )
        report["pcapng"] = summary.as_json()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    if "lua" in report:
        print(f"dissector: {args.lua} (load with: tshark -X lua_script:{args.lua} ...)")
    if "pcapng" in report:
        pcap = report["pcapng"]
        others = "".join(f", {size} {name} bytes" for name, size in pcap["channel_bytes"].items())
        print(
            f"pcapng: {pcap['path']}: {pcap['packets']} packets, {pcap['stream_bytes']} stream "
            f"bytes, {pcap['return_path_bytes']} return-path bytes{others}, "
            f"{pcap['duration_s']:.3f} s"
        )
    return 0
