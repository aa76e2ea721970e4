"""Is this file a libvirt save image? Its first bytes say, finished or partial."""

from __future__ import annotations

from pathlib import Path

from qmig.libvirt.layout import load_layout


def is_save_image(path: Path) -> bool:
    """A regular file that opens with libvirt's magic, finished or partial."""
    if not path.is_file():
        return False
    layout = load_layout()
    with path.open("rb") as file:
        magic = file.read(layout.magic_length)
    return magic in (layout.magic, layout.partial_magic)
