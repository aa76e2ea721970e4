"""Sizes as people write them: ``256M``, ``1G``, ``4096``."""

from __future__ import annotations

UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes in ``text``: a number with an optional K/M/G/T suffix (binary units)."""
    cleaned = text.strip().upper().removesuffix("IB").removesuffix("B")
    if cleaned and cleaned[-1] in UNITS:
        return int(float(cleaned[:-1]) * UNITS[cleaned[-1]])
    return int(cleaned)
