"""Hostile migration streams, each a few bytes that claim a lot, built with qmig's schemas."""

from __future__ import annotations

import json
from typing import Any

from qmig.wire import messages as m
from qmig.wire.schema import schema_for

VERSION = "7.2"
S = schema_for(VERSION)
PAGE = 4096
GIB = 1 << 30
RAM_SECTION = 2
DEVICE_SECTION = 3


def opening(blocks: tuple[m.RamBlockInfo, ...], *, return_path: bool = True) -> bytes:
    """Header, CONFIGURATION, (OPEN_RETURN_PATH), the RAM setup section with MEM_SIZE."""
    opening = S.build_opening(m.Configuration("pc-i440fx-7.2"), return_path=return_path)
    return opening + S.build_ram_setup(RAM_SECTION, blocks)


def small_opening() -> bytes:
    return opening((m.RamBlockInfo("pc.ram", 16 * PAGE),))


def many_blocks(count: int, size: int) -> bytes:
    """MEM_SIZE claiming ``count`` blocks of ``size`` bytes each."""
    return opening(tuple(m.RamBlockInfo(f"ram{i}", size) for i in range(count)))


def device_section(payload: bytes, idstr: str = "dev", section_id: int = DEVICE_SECTION) -> bytes:
    return (
        S.build_section(m.SectionFull(section_id, idstr, 0, 1))
        + payload
        + S.build_footer(section_id)
    )


def field(name: str, kind: str, size: int, **extra: Any) -> dict[str, Any]:
    return {"name": name, "type": kind, "size": size, **extra}


def description(fields: list[dict[str, Any]], idstr: str = "dev") -> bytes:
    """A VMDESCRIPTION JSON with one device of these fields."""
    device = {"name": idstr, "instance_id": 0, "vmsd_name": idstr, "version": 1, "fields": fields}
    return json.dumps({"page_size": PAGE, "devices": [device]}).encode()


def precopy_end(json_text: bytes) -> bytes:
    """EOF and the VMDESCRIPTION that follows it."""
    return bytes(S.eof.build(m.Eof())) + bytes(S.vmdescription.build(m.VmDescription(json_text)))


def described_device(fields: list[dict[str, Any]], payload: bytes) -> bytes:
    """A whole precopy stream: opening, one device section, EOF, its VMDESCRIPTION."""
    return small_opening() + device_section(payload) + precopy_end(description(fields))


def nested_structs_description(depth: int) -> bytes:
    """A VMDESCRIPTION whose device has a struct holding a struct ... ``depth`` deep, with
    one uint8 inside (written out by hand: json.dumps itself recurses per level)."""
    leaf = json.dumps(field("leaf", "uint8", 1))
    opening = '{"name": "s", "type": "struct", "size": 1, "struct": {"vmsd_name": "s", "fields": ['
    inner = opening * depth + leaf + "]}}" * depth
    device = (
        '{"name": "dev", "instance_id": 0, "vmsd_name": "dev", "version": 1, '
        f'"fields": [{inner}]}}'
    )
    return f'{{"page_size": {PAGE}, "devices": [{device}]}}'.encode()


def pages_section(block: str, offsets: list[int], fill: int = 1) -> bytes:
    """A SECTION_PART of the RAM section holding one data page at each offset, then EOS."""
    out = S.build_section(m.SectionPart(RAM_SECTION))
    first = True
    for offset in offsets:
        out += S.build_ram_page(
            m.RamPage(block if first else None, offset, False, bytes([fill]) * PAGE)
        )
        first = False
    return out + S.build_ram_flag("EOS") + S.build_footer(RAM_SECTION)
