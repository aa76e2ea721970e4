"""Messages as text and as JSON values: one line per record for listings, dicts for --json."""

from __future__ import annotations

import dataclasses
from typing import Any

from qmig.wire import messages as m
from qmig.wire.discard import DiscardRanges


def to_json(message: Any) -> dict[str, Any]:
    """A message's fields as JSON-ready values (bytes become hex; long data is summarised)."""
    out: dict[str, Any] = {}
    for field in dataclasses.fields(message):
        value = getattr(message, field.name)
        out[field.name] = _json_value(value)
    return out


def _json_value(value: Any) -> Any:
    if isinstance(value, bytes | bytearray):
        if len(value) > 64:
            return {"length": len(value)}
        return value.hex()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_json(value)
    if isinstance(value, tuple | list | DiscardRanges):
        return [_json_value(item) for item in value]
    if isinstance(value, memoryview):
        return {"length": len(value)}
    return value


def describe(message: Any) -> str:
    """One line of detail for a listing (the record's name is printed beside it)."""
    match message:
        case m.StreamHeader(version=version):
            return f"version {version}"
        case m.Configuration():
            parts = [f"machine {message.machine_type}"]
            if message.target_page_bits is not None:
                parts.append(f"target-page-bits {message.target_page_bits}")
            if message.capabilities is not None:
                parts.append(f"capabilities {', '.join(message.capabilities) or '-'}")
            if message.uuid is not None:
                parts.append(f"uuid {message.uuid.hex()}")
            return "; ".join(parts)
        case m.SectionStart() | m.SectionFull():
            return (
                f"{message.idstr} (section {message.section_id}, instance "
                f"{message.instance_id}, version {message.version_id})"
            )
        case m.SectionPart() | m.SectionEnd() | m.SectionFooter():
            return f"section {message.section_id}"
        case m.Ping(value=value) | m.Pong(value=value):
            return f"{value:#x}"
        case m.PostcopyAdvise():
            if not message.ram_postcopy:
                return "no RAM postcopy (0 bytes)"
            return (
                f"page sizes {message.page_size_summary:#x}, "
                f"target page size {message.target_page_size:#x}"
            )
        case m.PostcopyRamDiscard():
            ranges = ", ".join(f"{r.start:#x}+{r.length:#x}" for r in message.ranges)
            return f"{message.block}: {len(message.ranges)} ranges: {ranges}"
        case m.Packaged(length=length):
            return f"{length} bytes follow"
        case m.RecvBitmap(block=block):
            return block
        case m.RpRecvBitmap(block=block, bitmap=bitmap):
            received = len(message.received_pages())
            return f"{block}: {len(bitmap)}-byte bitmap, {received} pages received"
        case m.Shut(status=status):
            return "clean" if status == 0 else f"error {status}"
        case m.ReqPagesId():
            return f"{message.block} {message.start:#x}+{message.length:#x}"
        case m.ReqPages():
            return f"{message.start:#x}+{message.length:#x} (same block)"
        case m.ResumeAck(value=value):
            return str(value)
        case m.MemSize():
            blocks = ", ".join(
                f"{b.idstr} {b.used_length:#x}"
                + (f" page {b.page_size:#x}" if b.page_size is not None else "")
                + (f" at {b.mr_addr:#x}" if b.mr_addr is not None else "")
                for b in message.blocks
            )
            return f"total {message.total:#x}: {blocks}"
        case m.DeviceState():
            decoded = "decoded" if message.decoded is not None else "not decoded"
            size = len(message.data)
            return f"{message.idstr} instance {message.instance_id}: {size} bytes, {decoded}"
        case m.VmDescription(json=text):
            return f"{len(text)} bytes of JSON"
        case m.RamXbzrle() | m.RamCompressed():
            return f"{message.block or '(same block)'} {message.offset:#x}"
    return ""
