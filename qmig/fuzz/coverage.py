"""A cheap coverage signal on qmig's own code, for guiding mutation.

Python 3.11 has no ``sys.monitoring``, and atheris is not a dependency: this tracer records
line-to-line edges (``code object, previous line, line``) in qmig's modules only, with
``sys.settrace``. Frames outside ``qmig/`` are not traced at all (the global tracer returns
``None`` for them), which keeps the cost to a few times the untraced run.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

ROOT = str(Path(__file__).resolve().parents[1])
SKIP = str(Path(__file__).resolve().parent)  # not the fuzzer itself

T = TypeVar("T")


class Coverage:
    """Edges seen so far; :meth:`run` returns how many new ones one call found."""

    def __init__(self, root: str = ROOT) -> None:
        self.root = root
        self.edges: set[tuple[int, int, int]] = set()
        self._new: set[tuple[int, int, int]] = set()

    def run(self, function: Callable[..., T], *args: Any) -> tuple[T, int]:
        self._new = set()
        previous = sys.gettrace()
        sys.settrace(self._global)
        try:
            result = function(*args)
        finally:
            sys.settrace(previous)
        fresh = self._new - self.edges
        self.edges |= fresh
        return result, len(fresh)

    def _global(self, frame: FrameType, event: str, arg: Any) -> Any:
        filename = frame.f_code.co_filename
        if not filename.startswith(self.root) or filename.startswith(SKIP):
            return None
        code = id(frame.f_code)
        last = -1
        new = self._new

        def local(frame: FrameType, event: str, arg: Any) -> Any:
            nonlocal last
            if event == "line":
                line = frame.f_lineno
                new.add((code, last, line))
                last = line
            elif event == "exception":
                new.add((code, last, -1))
            return local

        return local
