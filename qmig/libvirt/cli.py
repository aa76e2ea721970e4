"""``qmig inspect`` of a libvirt save image: its header and domain facts, then its QEMU stream."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from qmig.errors import QmigError
from qmig.libvirt.image import SaveImage, read_image
from qmig.libvirt.streams import SPARSE_DETAIL, relocate
from qmig.sizes import format_size

StreamCommand = Callable[[argparse.Namespace, dict[str, Any] | None], int]


def run_save_image(args: argparse.Namespace, inspect_stream: StreamCommand) -> int:
    image = read_image(args.stream)
    if not args.json:
        _show(image)
    if not image.complete:
        print(
            f"qmig: warning: {args.stream}: libvirt's partial magic: the save never finished, "
            "the stream may end early",
            file=sys.stderr,
        )
    if image.compression == "sparse":
        if args.dump_ram is not None:
            raise QmigError(str(args.stream), SPARSE_DETAIL)
        if args.json:
            json.dump({"libvirt": image.as_json(), "stream_decoded": False,
                       "note": SPARSE_DETAIL}, sys.stdout, indent=1)  # fmt: skip
            sys.stdout.write("\n")
        else:
            print(f"stream not decoded: {SPARSE_DETAIL}")
        return 0
    try:
        return inspect_stream(args, image.as_json())
    except QmigError as error:
        raise relocate(error, image) from None


def _show(image: SaveImage) -> None:
    from rich.console import Console

    console = Console(highlight=False, soft_wrap=True)
    facts = image.facts
    state = "complete" if image.complete else "INCOMPLETE (partial magic)"
    compression = image.format
    if image.compression != image.format:
        compression += f" (version {image.version}: stream is {image.compression})"
    memory = "?" if facts.memory_bytes is None else format_size(facts.memory_bytes)
    console.print(f"[bold]libvirt save image[/bold] {image.path}: {state}")
    console.print(
        f"  header: version {image.version}, {image.byte_order}-endian, format "
        f"{image.format_number} {compression}, was running: {'yes' if image.was_running else 'no'}"
    )
    console.print(
        f"  data: {image.data_len} bytes (domain XML {len(image.xml.encode())} bytes"
        + ("" if image.cookie is None else f", cookie at {image.cookie_offset}")
        + f"); QEMU stream from file byte {image.stream_offset}"
    )
    console.print(
        f"  domain: {facts.name} {facts.uuid}, type {facts.domain_type}, machine "
        f"{facts.machine_type} ({facts.arch}), memory {memory}, vCPUs {facts.vcpus}\n"
    )
