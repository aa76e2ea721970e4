"""Read a save image's header and domain XML, checked in libvirt's order, never trusting a length.

libvirt (``qemuSaveImageReadHeader``) checks the magic (the partial magic means the save never
finished), then the version (a version above its own: the other byte order), the format word
and the data length; the XML is ``cookieOffset`` bytes long when there is a cookie, else the
whole data. QEMU's stream starts right after the data.
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from qmig.errors import MalformedError, QmigError, TruncatedError
from qmig.libvirt.layout import Layout, header_size, header_struct, load_layout

WHAT = "libvirt save header"
MAX_TEXT = 16 << 20  # qmig's bound on the XML or cookie it reads; libvirt's own is 64 KiB padding
# Memory units of libvirt's domain XML (unit='...'); its default is KiB.
MEMORY_UNITS = {
    "b": 1, "bytes": 1,
    "kb": 1000, "k": 1 << 10, "kib": 1 << 10,
    "mb": 1000**2, "m": 1 << 20, "mib": 1 << 20,
    "gb": 1000**3, "g": 1 << 30, "gib": 1 << 30,
    "tb": 1000**4, "t": 1 << 40, "tib": 1 << 40,
}  # fmt: skip


@dataclass(frozen=True)
class DomainFacts:
    """What a user wants first from the domain XML: which guest, which machine, how much RAM."""

    name: str | None
    uuid: str | None
    domain_type: str | None  # qemu (TCG) or kvm
    machine_type: str | None
    arch: str | None
    memory_bytes: int | None
    vcpus: int | None

    def as_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class SaveImage:
    path: Path
    complete: bool  # the final magic; False: libvirt never finished writing it
    byte_order: str
    version: int
    data_len: int
    was_running: bool
    format_number: int
    format: str  # its name in formats/libvirt-save.toml
    compression: str  # what the stream really is: version 1 images are always raw
    cookie_offset: int
    xml: str
    cookie: str | None
    stream_offset: int
    facts: DomainFacts

    def as_json(self) -> dict[str, Any]:
        return {
            "complete": self.complete,
            "byte_order": self.byte_order,
            "version": self.version,
            "data_len": self.data_len,
            "was_running": self.was_running,
            "format": self.format,
            "format_number": self.format_number,
            "compression": self.compression,
            "cookie_offset": self.cookie_offset,
            "stream_offset": self.stream_offset,
            "domain": self.facts.as_json(),
        }


def read_image(path: Path) -> SaveImage:
    layout = load_layout()
    with path.open("rb") as file:
        size = path.stat().st_size
        raw = file.read(header_size())
        if len(raw) < header_size():
            raise TruncatedError(WHAT, len(raw), during="the header")
        byte_order, header = _header(raw, layout)
        data_len = header.data_len
        if data_len == 0:
            raise MalformedError(WHAT, "data length 0", _at("data_len"))
        if header.cookie_offset > data_len:
            raise MalformedError(
                WHAT, f"cookie offset {header.cookie_offset} past the data's {data_len} bytes",
                _at("cookie_offset"),
            )  # fmt: skip
        stream_offset = header_size() + data_len
        if stream_offset > size:
            raise TruncatedError(WHAT, size, during=f"the domain XML ({data_len} bytes claimed)")
        xml_len = header.cookie_offset or data_len
        xml = _text(file, xml_len, header_size(), "domain XML")
        cookie = None
        if header.cookie_offset:
            cookie = _text(file, data_len - xml_len, header_size() + xml_len, "save cookie")
    name = layout.formats[header.format]
    compressed = header.version >= layout.compressed_since_version
    return SaveImage(
        path=path,
        complete=header.magic == layout.magic,
        byte_order=byte_order,
        version=header.version,
        data_len=data_len,
        was_running=bool(header.was_running),
        format_number=header.format,
        format=name,
        compression=name if compressed else "raw",
        cookie_offset=header.cookie_offset,
        xml=xml,
        cookie=cookie,
        stream_offset=stream_offset,
        facts=domain_facts(xml, header_size()),
    )


def _at(field: str) -> int:
    from qmig.wire.schema import field_offset

    return field_offset(header_struct("little"), field)


def _header(raw: bytes, layout: Layout) -> tuple[str, Any]:
    header = header_struct(sys.byteorder).parse(raw)
    if header.magic not in (layout.magic, layout.partial_magic):
        raise MalformedError(WHAT, f"magic {header.magic!r} is not {layout.magic!r}", 0)
    byte_order = sys.byteorder
    if header.version > layout.version:
        # libvirt's rule: a version above its own was written in the other byte order.
        byte_order = "big" if sys.byteorder == "little" else "little"
        header = header_struct(byte_order).parse(raw)
    if header.version > layout.version:
        raise MalformedError(
            WHAT, f"version {header.version} is newer than {layout.version}, the newest known",
            _at("version"),
        )  # fmt: skip
    if header.format not in layout.formats:
        known = ", ".join(f"{number} {name}" for number, name in layout.formats.items())
        raise MalformedError(
            WHAT, f"unknown format {header.format} (known: {known})", _at("format")
        )
    return byte_order, header


def _text(file: BinaryIO, length: int, offset: int, what: str) -> str:
    """NUL-terminated text at the start of ``length`` bytes (the rest is padding)."""
    data = file.read(min(length, MAX_TEXT))
    end = data.find(b"\0")
    if end < 0:
        if length > MAX_TEXT:
            raise QmigError(WHAT, f"{what} longer than {MAX_TEXT} bytes", offset)
        raise MalformedError(WHAT, f"{what} has no NUL terminator", offset + len(data))
    file.seek(offset + length)
    try:
        return data[:end].decode("utf-8")
    except UnicodeDecodeError as error:
        raise MalformedError(WHAT, f"{what} is not UTF-8", offset + error.start) from None


def domain_facts(xml: str, offset: int) -> DomainFacts:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as error:
        raise MalformedError(WHAT, f"domain XML does not parse: {error}", offset) from None
    os_type = root.find("os/type")
    vcpus = root.findtext("vcpu")
    return DomainFacts(
        name=root.findtext("name"),
        uuid=root.findtext("uuid"),
        domain_type=root.get("type"),
        machine_type=None if os_type is None else os_type.get("machine"),
        arch=None if os_type is None else os_type.get("arch"),
        memory_bytes=_memory(root.find("memory"), offset),
        vcpus=int(vcpus) if vcpus and vcpus.strip().isdigit() else None,
    )


def _memory(element: ET.Element | None, offset: int) -> int | None:
    if element is None or element.text is None:
        return None
    unit = (element.get("unit") or "KiB").lower()
    if unit not in MEMORY_UNITS or not element.text.strip().isdigit():
        raise MalformedError(
            WHAT, f"domain XML memory {element.text.strip()!r} {unit!r} is not a size", offset
        )
    return int(element.text) * MEMORY_UNITS[unit]
