"""The save image's numbers (``formats/libvirt-save.toml``) and its header as a construct Struct.

libvirt writes the header's words in the saving host's byte order and, reading, takes a
version above its own as a sign of the other order; :func:`header_struct` builds both.
"""

from __future__ import annotations

import functools
import importlib.resources
import sys
import tomllib
from dataclasses import dataclass

import construct as cs

from qmig.errors import QmigError

LAYOUT_FILE = "libvirt-save.toml"


@dataclass(frozen=True)
class Layout:
    magic: bytes
    partial_magic: bytes
    magic_length: int
    unused_words: int
    version: int
    compressed_since_version: int
    xml_padding: int
    formats: dict[int, str]  # the format word -> its name
    decompress: dict[str, tuple[str, ...]]  # format name -> the program that decompresses it

    def format_number(self, name: str) -> int:
        return next(number for number, known in self.formats.items() if known == name)


@functools.cache
def load_layout() -> Layout:
    entry = importlib.resources.files("qmig.formats") / LAYOUT_FILE
    try:
        with entry.open("rb") as file:
            data = tomllib.load(file)
        header = data["header"]
        return Layout(
            magic=header["magic"].encode("ascii"),
            partial_magic=header["partial_magic"].encode("ascii"),
            magic_length=header["magic_length"],
            unused_words=header["unused_words"],
            version=header["version"],
            compressed_since_version=header["compressed_since_version"],
            xml_padding=header["xml_padding"],
            formats={number: name for name, number in data["formats"].items()},
            decompress={name: tuple(argv) for name, argv in data["decompress"].items()},
        )
    except (OSError, KeyError, tomllib.TOMLDecodeError) as error:
        raise QmigError(f"formats/{LAYOUT_FILE}", f"unreadable: {error!r}") from None


@functools.cache
def header_struct(byte_order: str = sys.byteorder) -> cs.Struct:
    """libvirt's virQEMUSaveHeader, its words in ``byte_order``."""
    layout = load_layout()
    word = cs.Int32ul if byte_order == "little" else cs.Int32ub
    return cs.Struct(
        "magic" / cs.Bytes(layout.magic_length),
        "version" / word,
        "data_len" / word,  # domain XML + cookie + padding
        "was_running" / word,
        "format" / word,  # formats/libvirt-save.toml [formats]
        "cookie_offset" / word,  # where the cookie starts in the data; 0: none
        "unused" / cs.Array(layout.unused_words, word),
    )


def header_size() -> int:
    return int(header_struct("little").sizeof())
