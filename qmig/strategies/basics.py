"""Small strategies the others are built from: integers, names, page offsets and contents."""

from __future__ import annotations

import random
import string
from typing import Any

from hypothesis import strategies as st

from qmig.wire.profiles import Profile, load_profile
from qmig.wire.schema import Schema, schema_for

U16_MAX = (1 << 16) - 1
U32_MAX = (1 << 32) - 1
U64_MAX = (1 << 64) - 1
MAX_NAME = 255  # a counted string's length is one byte
HUGE_PAGE = 2 << 20
# The large-page block of a generated stream: 64 KiB pages (as on some aarch64 hosts) keep
# whole host pages at 16 records; with 2 MiB pages every stream would carry 512 per page.
LARGE_PAGE = 64 << 10
# Characters QEMU uses in section idstrs and RAMBlock names ("pc.ram", "0000:00:02.0/vga.vram").
NAME_ALPHABET = string.ascii_letters + string.digits + "._-/:@"


def _schema(version: str | None) -> Schema:
    return schema_for(version)


def _profile(version: str | None) -> Profile:
    return load_profile(version)


def uints(bits: int) -> st.SearchStrategy[int]:
    return st.integers(0, (1 << bits) - 1)


def names(
    min_size: int = 1, max_size: int = MAX_NAME, *, any_byte: bool = False
) -> st.SearchStrategy[str]:
    """Names as counted strings carry them: QEMU-like by default, any latin-1 byte on request."""
    alphabet: Any = st.characters(max_codepoint=0xFF) if any_byte else NAME_ALPHABET
    return st.text(alphabet=alphabet, min_size=min_size, max_size=max_size)


def page_offsets(version: str | None = None, limit: int = 1 << 52) -> st.SearchStrategy[int]:
    """Offsets that fit a RAM record header: multiples of the target page size."""
    page = _schema(version).target_page_size
    return st.integers(0, limit - 1).map(lambda index: index * page)


def page_contents(version: str | None = None) -> st.SearchStrategy[bytes]:
    """One target page: a repeated byte or pseudo-random bytes (cheap to draw and shrink)."""
    page = _schema(version).target_page_size
    return st.one_of(
        uints(8).map(lambda fill: bytes([fill]) * page),
        uints(32).map(lambda seed: random.Random(seed).randbytes(page)),
    )
