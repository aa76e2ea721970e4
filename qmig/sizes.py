"""Sizes as people write them (``256M``, ``2MiB``, ``4096``) and as qmig prints them.

One unit system everywhere: IEC binary units (KiB, MiB, GiB, TiB). Input accepts the
suffix alone (``2M``), with ``B`` (``2MB``) or with ``iB`` (``2MiB``), in any case; all mean
powers of 1024, as in QEMU's own ``-m 2G``.
"""

from __future__ import annotations

import re

UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
IEC_NAMES = (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10))
SIZE_EXAMPLES = "e.g. 4096, 64K, 2M, 1.5G"
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(?:([KMGT])(?:iB|B)?|B)?", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes in ``text``; ValueError naming the text when it is not a whole number of bytes."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"not a size: {text!r} ({SIZE_EXAMPLES})")
    number, unit = match.group(1), (match.group(2) or "").upper()
    if "." in number:
        whole, fraction = number.split(".")
        # Exact arithmetic: 1.5G is 1610612736 bytes, never a float rounding of it.
        scaled = int(whole + fraction) * UNITS[unit]
        divisor = 10 ** len(fraction)
        if scaled % divisor:
            raise ValueError(f"not a whole number of bytes: {text!r}")
        return scaled // divisor
    return int(number) * UNITS[unit]


def format_size(size: float) -> str:
    """``size`` bytes in the largest IEC unit it reaches, one decimal: ``1.5 GiB``, ``512 B``."""
    for name, unit in IEC_NAMES:
        if abs(size) >= unit:
            value = size / unit
            return f"{value:.0f} {name}" if value == int(value) else f"{value:.1f} {name}"
    return f"{size:.0f} B"
