"""Save images built as libvirt writes them, around a real QEMU stream, for the reader's tests.

The header is built with qmig's own construct Struct; the numbers come from
``formats/libvirt-save.toml``; each compressor is the program or library libvirt's format is
named after (libvirt runs ``PROGRAM -c``).
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import subprocess
from typing import Any

from qmig.libvirt.layout import header_struct, load_layout

DOMAIN_XML = """<domain type='qemu'>
  <name>built</name>
  <uuid>6f1c0b52-6a0e-4d37-9f52-2b2ef1b8b0a1</uuid>
  <memory unit='KiB'>32768</memory>
  <vcpu placement='static'>1</vcpu>
  <os><type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type></os>
</domain>
"""
COOKIE = "<cookie>\n  <slirpHelper/>\n</cookie>\n"


def compress(data: bytes, name: str) -> bytes:
    if name in ("raw", "sparse"):
        return data
    if name == "gzip":
        return gzip.compress(data, 1)
    if name == "bzip2":
        return bz2.compress(data, 1)
    if name == "xz":
        return lzma.compress(data, preset=0)
    if name == "zstd":
        import zstandard

        return zstandard.ZstdCompressor().compress(data)
    if name == "lzop":
        return subprocess.run(["lzop", "-c"], input=data, capture_output=True, check=True).stdout
    raise ValueError(name)


def header(fields: dict[str, Any], byte_order: str = "little") -> bytes:
    layout = load_layout()
    values = {
        "magic": layout.magic,
        "version": layout.version,
        "was_running": 1,
        "cookie_offset": 0,
        "unused": [0] * layout.unused_words,
        **fields,
    }
    return bytes(header_struct(byte_order).build(values))


def build_image(
    stream: bytes,
    name: str = "raw",
    *,
    version: int | None = None,
    byte_order: str = "little",
    magic: bytes | None = None,
    xml: str = DOMAIN_XML,
    cookie: str | None = COOKIE,
    padding: int | None = None,
) -> bytes:
    """An image of ``stream`` in format ``name``, its data as virQEMUSaveDataWrite lays it out."""
    layout = load_layout()
    xml_bytes = xml.encode() + b"\0"
    cookie_bytes = b"" if cookie is None else cookie.encode() + b"\0"
    pad = layout.xml_padding if padding is None else padding
    data = xml_bytes + cookie_bytes + bytes(pad)
    fields: dict[str, Any] = {
        "data_len": len(data),
        "format": layout.format_number(name),
        "cookie_offset": len(xml_bytes) if cookie is not None else 0,
    }
    if version is not None:
        fields["version"] = version
    if magic is not None:
        fields["magic"] = magic
    return header(fields, byte_order) + data + compress(stream, name)
