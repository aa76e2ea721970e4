"""A capture folder with multifd connections, made with qmig's own multifd builders.

The main channel is a shipped fixture's (stream, return path, index); beside it go
``multifd-<K>.bin`` files holding each channel's handshake and packets, with their index lines
(direction ``multifd-<K>``) merged into the fixture's timeline and the channels listed in
``meta.json``: the capture-folder convention for multifd channels.
"""

from __future__ import annotations

import json
import lzma
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from qmig.capture.recording import INDEX_HEADER
from qmig.wire.multifd import (
    MultifdDeviceStateHeader,
    MultifdInit,
    MultifdPacketHeader,
    multifd_schema,
)

PAGE = 4096


@dataclass
class Built:
    """What the folder's multifd channels hold, counted as they were built."""

    inits: int = 0
    packets: int = 0
    device_states: int = 0
    normal_pages: int = 0
    zero_pages: int = 0
    syncs: int = 0
    packet_numbers: list[int] = field(default_factory=list)
    blocks: list[str] = field(default_factory=list)  # per RAM packet
    normal_offsets: list[int] = field(default_factory=list)
    data_bytes: int = 0


def _channel(version: str, channel: int, uuid: bytes, rng: random.Random, built: Built) -> bytes:
    schema = multifd_schema(version)
    spec = schema.spec
    out = bytearray(schema.build_init(MultifdInit(uuid, channel)))
    built.inits += 1
    page_count = schema.page_count(PAGE)
    for number in range(channel, 12, 2):  # channels take turns with the packet numbers
        sync = number % 5 == 4
        normal = 0 if sync else rng.randint(1, page_count)
        zero = 0
        if spec.zero_pages == "packet" and not sync:
            zero = rng.randint(0, page_count - normal)
        pages = rng.sample(range(4096), normal + zero)
        block = "pc.ram" if number % 3 else "vga.vram"
        header = MultifdPacketHeader(
            flags=spec.sync_flag if sync else 0,
            pages_alloc=normal + zero,
            normal_pages=normal,
            next_packet_size=normal * PAGE,
            packet_num=number,
            zero_pages=zero,
            ramblock=block,
        )
        offsets = [page * PAGE for page in pages]
        out += schema.build_packet(header, offsets, PAGE)
        out += rng.randbytes(normal * PAGE)
        built.packets += 1
        built.syncs += sync
        built.normal_pages += normal
        built.zero_pages += zero
        built.packet_numbers.append(number)
        built.blocks.append(block)
        built.normal_offsets += offsets[:normal]
        built.data_bytes += normal * PAGE
        if spec.device_state_flag is not None and number == channel:
            state = rng.randbytes(300)
            out += schema.build_device_state(
                MultifdDeviceStateHeader(spec.device_state_flag, "0000:00:02.0/vfio", 0, 300)
            )
            out += state
            built.device_states += 1
    return bytes(out)


def _decompressed(fixture: Path, name: str, out: Path) -> None:
    plain, packed = fixture / name, fixture / f"{name}.xz"
    if plain.exists():
        shutil.copy(plain, out / name)
    else:
        with lzma.open(packed) as source, (out / name).open("wb") as target:
            shutil.copyfileobj(source, target)


def build_folder(fixture: Path, out: Path, version: str, channels: int = 2) -> Built:
    """``fixture``'s capture with ``channels`` multifd connections added."""
    out.mkdir(parents=True)
    for name in ("stream.bin", "return-path.bin", "index.tsv"):
        _decompressed(fixture, name, out)
    rng = random.Random(16)
    uuid = rng.randbytes(16)
    built = Built()
    lines = (out / "index.tsv").read_text().splitlines(keepends=True)[1:]
    start = int(lines[0].rsplit("\t", 1)[1])
    for channel in range(channels):
        data = _channel(version, channel, uuid, rng, built)
        (out / f"multifd-{channel}.bin").write_bytes(data)
        # In chunks that cut through handshakes and packets, a millisecond apart.
        at = 0
        for number, size in enumerate(iter(lambda: rng.randint(100, 200_000), None)):
            if at >= len(data):
                break
            size = min(size, len(data) - at)
            t_ns = start + 1_000_000 * number + channel
            lines.append(f"multifd-{channel}\t{at}\t{size}\t{t_ns}\n")
            at += size
    lines.sort(key=lambda line: int(line.rsplit("\t", 1)[1]))
    (out / "index.tsv").write_text(INDEX_HEADER + "".join(lines))
    meta = json.loads((fixture / "meta.json").read_text())
    meta["channels"] = ["stream", "return-path", *(f"multifd-{k}" for k in range(channels))]
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    return built
