"""The values of QEMU's ``zero-page-detection`` parameter (9.0+), apart from the multifd
machinery, so that a command's parser can offer them without loading the wire schemas."""

from __future__ import annotations

from typing import Literal, get_args

ZeroPageDetection = Literal["legacy", "multifd", "none"]
ZERO_PAGE_DETECTIONS: tuple[str, ...] = get_args(ZeroPageDetection)
