"""``qmig inspect`` of the other forms a migration takes: a mapped-ram file and a bare multifd
channel file. :func:`other_form` tells them apart from an ordinary stream by their first bytes;
the CLI hands them here."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from qmig.errors import MalformedError, QmigError
from qmig.wire import messages as m
from qmig.wire.profiles import DEFAULT_VERSION, load_profile

Form = Literal["mapped-ram", "multifd"]
PREFIX = 1 << 12


AUTO = "auto"


def chosen_version(version: str | None) -> str:
    """--qemu-version: "auto" reads these forms with the default profile (the one that has
    both; a 7.2 channel's packets differ only in a field 7.2 leaves zero)."""
    return DEFAULT_VERSION if version in (None, AUTO) else str(version)


def other_form(path: Path, version: str | None) -> Form | None:
    """A multifd channel when the file opens with a multifd handshake's magic, a mapped-ram
    file when its CONFIGURATION lists the mapped-ram capability; None for anything else."""
    version = chosen_version(version)
    if not path.is_file():
        return None
    with path.open("rb") as file:
        prefix = file.read(PREFIX)
    profile = load_profile(version)
    if profile.multifd is not None and prefix[:4] == profile.multifd.magic.to_bytes(4, "big"):
        return "multifd"
    if profile.mapped_ram is None or prefix[:4] != profile.magic.to_bytes(4, "big"):
        return None
    from qmig.wire.reader import END, NEED_DATA, Record, StreamReader

    reader = StreamReader(version)
    reader.feed(prefix)
    try:
        while (record := reader.next_record()) is not NEED_DATA and record is not END:
            assert isinstance(record, Record)
            if isinstance(record.message, m.Configuration):
                return "mapped-ram" if "mapped-ram" in (record.message.capabilities or ()) else None
    except QmigError:
        return None  # the ordinary reader says what is wrong
    return None


def run_other_form(args: argparse.Namespace, path: Path, form: Form) -> int:
    version = chosen_version(args.qemu_version)
    if form == "multifd":
        report = inspect_multifd(path, version, listing=not args.json)
    else:
        report = inspect_mapped_ram(args, path, version)
    if args.json:
        json.dump(report, sys.stdout, indent=1)
        sys.stdout.write("\n")
    return 0


# --- mapped-ram ------------------------------------------------------------------------------


def inspect_mapped_ram(args: argparse.Namespace, path: Path, version: str) -> dict[str, Any]:
    from qmig.cli.commands.inspect import Listing
    from qmig.inspect import StreamInspection, _image_name, read_records
    from qmig.mapped_ram.file import MappedRamFile
    from qmig.wire.reader import StreamReader

    with MappedRamFile(path, version) as mapped:
        blocks = []
        for block in mapped.blocks:
            layout = block.layout
            present = sum(count for _, count in mapped.page_runs(block))
            blocks.append(
                {
                    "block": layout.name,
                    "used_length": layout.used_length,
                    "entry_offset": block.entry_offset,
                    "header_offset": block.header_offset,
                    "version": layout.header.version,
                    "page_size": layout.header.page_size,
                    "bitmap_offset": layout.header.bitmap_offset,
                    "bitmap_size": layout.bitmap_size,
                    "pages_offset": layout.header.pages_offset,
                    "pages": layout.pages,
                    "pages_present": present,
                    "zero_pages": layout.pages - present,
                }
            )
        listing = None if args.json else Listing(args.pages)
        inspection = StreamInspection(StreamReader(version), args.dump_ram)
        try:
            for record in _relocated(mapped, read_records(mapped.stream(), inspection.reader)):
                inspection.add(record)
                if listing is not None:
                    listing.record(record)
        finally:
            inspection.close()
        if args.dump_ram is not None:
            # The stream part holds no pages: each block comes from its bitmap and pages.
            for block, figures in zip(mapped.blocks, blocks, strict=True):
                target = args.dump_ram / _image_name(block.layout.name)
                figures["pages_written"] = mapped.dump(block, target)
        report = inspection.as_json()
        report.update(
            stream=str(path),
            qemu_version=version,
            file_bytes=mapped.size,
            stream_part_bytes=sum(s.size for s in mapped.segments),
            mapped_ram={
                "mem_size_offset": mapped.mem_size_offset,
                "total": mapped.total,
                "blocks": blocks,
            },
        )
    if listing is not None:
        _print_mapped_ram(listing, report)
    return report


def _relocated(mapped: Any, records: Iterator[Any]) -> Iterator[Any]:
    """Records and errors of the stream part, at their offsets in the file."""
    try:
        for record in records:
            record.offset = mapped.real_offset(record.offset)
            yield record
    except QmigError as error:
        if error.offset is None:
            raise
        raise error.at(mapped.real_offset(error.offset)) from None


def _print_mapped_ram(listing: Any, report: dict[str, Any]) -> None:
    console = listing.console
    console.print(
        f"\nmapped-ram file: {report['file_bytes']} bytes, {report['stream_part_bytes']} of "
        f"them stream; QEMU {report['qemu_version']} wire"
    )
    console.print(
        f"{'block':<24} {'used length':>12} {'header at':>10} {'bitmap at':>10} "
        f"{'pages at':>10} {'pages':>8} {'present':>8} {'zero':>8}"
    )
    for block in report["mapped_ram"]["blocks"]:
        console.print(
            f"{block['block']:<24} {block['used_length']:>#12x} {block['header_offset']:>10} "
            f"{block['bitmap_offset']:>#10x} {block['pages_offset']:>#10x} "
            f"{block['pages']:>8} {block['pages_present']:>8} {block['zero_pages']:>8}",
            markup=False,
        )
    counts = ", ".join(f"{name} {count}" for name, count in report["counts"].items())
    console.print(f"stream records: {counts}")


# --- a bare multifd channel --------------------------------------------------------------------


def inspect_multifd(path: Path, version: str, *, listing: bool) -> dict[str, Any]:
    """Every event of one channel's bytes; the events cover the file exactly."""
    from rich.console import Console

    from qmig.wire.multifd_reader import DeviceState, Handshake, MultifdChannelReader, Packet

    console = Console(highlight=False, soft_wrap=True) if listing else None
    reader = MultifdChannelReader(version)
    packets: list[dict[str, Any]] = []
    report: dict[str, Any] = {"stream": str(path), "qemu_version": version, "form": "multifd"}
    totals = {"packets": 0, "device_state_packets": 0, "normal_pages": 0, "zero_pages": 0,
              "syncs": 0}  # fmt: skip
    covered = 0
    with path.open("rb") as file:
        while True:
            chunk = file.read(1 << 20)
            if chunk:
                reader.feed(chunk)
            else:
                reader.feed_eof()
            for event in reader:
                covered += event.size
                if isinstance(event, Handshake):
                    report["handshake"] = {
                        "uuid": event.init.uuid.hex(),
                        "channel": event.init.channel,
                    }
                    line = f"uuid {event.init.uuid.hex()}, channel {event.init.channel}"
                    name = "MULTIFD_INIT"
                elif isinstance(event, Packet):
                    h = event.header
                    totals["packets"] += 1
                    totals["normal_pages"] += h.normal_pages
                    totals["zero_pages"] += h.zero_pages
                    totals["syncs"] += event.sync
                    packets.append({"offset": event.offset, "size": event.size,
                                    "packet_num": h.packet_num, "flags": h.flags,
                                    "method": event.method, "sync": event.sync,
                                    "block": h.ramblock, "normal_pages": h.normal_pages,
                                    "zero_pages": h.zero_pages, "pages_alloc": h.pages_alloc,
                                    "payload": h.next_packet_size,
                                    "offsets": list(event.offsets)})  # fmt: skip
                    name = "MULTIFD_PACKET"
                    line = (f"#{h.packet_num} {h.ramblock or '-'}: {h.normal_pages} pages, "
                            f"{h.zero_pages} zero, {event.method}"
                            + (", SYNC" if event.sync else ""))  # fmt: skip
                else:
                    assert isinstance(event, DeviceState)
                    totals["device_state_packets"] += 1
                    packets.append({"offset": event.offset, "size": event.size,
                                    "device_state": event.header.idstr,
                                    "instance_id": event.header.instance_id})  # fmt: skip
                    name = "MULTIFD_DEVICE_STATE"
                    line = f"{event.header.idstr} {event.header.instance_id}: {len(event.data)} B"
                if console is not None:
                    console.print(f"{event.offset:>12}  [bold]{name:<22}[/bold] {line}")
            if not chunk:
                break
        size = file.tell()
    if covered != size:  # the reader ends only at a packet boundary
        raise MalformedError("multifd", f"{size - covered} bytes not in any packet", covered)
    report.update(totals, bytes=size, packets=packets)
    if console is not None:
        console.print(
            f"\n{size} bytes of multifd channel: {totals['packets']} packets "
            f"({totals['syncs']} SYNC), {totals['normal_pages']} normal pages, "
            f"{totals['zero_pages']} zero pages, {totals['device_state_packets']} device-state"
        )
    return report
