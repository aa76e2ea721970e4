"""Progress on stderr for the long commands: the phase, and bytes with their rate.

Quiet with ``--json`` and whenever stderr is not a terminal (a script, a pipe, CI), so that
nothing but the command's own output appears there. Rich redraws the lines in place and
removes them when the work is done (``transient``), leaving the summary alone on screen.
"""

from __future__ import annotations

import argparse
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

POLL_SECONDS = 0.2


def quiet(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "json", False)) or not sys.stderr.isatty()


class PhaseProgress:
    """One line per phase (precopy, postcopy, stream, return path...): bytes and rate, and a
    bar where the phase's total is known. A no-op when ``quiet``."""

    def __init__(self, quiet: bool, totals: dict[str, int] | None = None) -> None:
        self.totals = totals or {}
        self._tasks: dict[str, Any] = {}
        self._progress: Any = None
        if not quiet:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn

            from qmig.cli.text import transfer_columns

            self._progress = Progress(
                TextColumn("[bold]{task.description:<12}"),
                BarColumn(),
                *transfer_columns(),
                console=Console(stderr=True),
                transient=True,
            )

    def _task(self, phase: str) -> Any:
        if phase not in self._tasks:
            self._tasks[phase] = self._progress.add_task(phase, total=self.totals.get(phase))
        return self._tasks[phase]

    def advance(self, phase: str, count: int) -> None:
        if self._progress is not None:
            self._progress.advance(self._task(phase), count)

    def set(self, phase: str, done: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task(phase), completed=done)

    @contextmanager
    def shown(self, poll: Callable[[], dict[str, int]] | None = None) -> Iterator[PhaseProgress]:
        """Show it while the block runs; ``poll`` (on a thread of its own, every 0.2 s) gives
        each phase's bytes so far, for work that runs without calling :meth:`advance`."""
        if self._progress is None:
            yield self
            return
        stop = threading.Event()

        def watch() -> None:
            while not stop.wait(POLL_SECONDS):
                assert poll is not None
                for phase, done in poll().items():
                    self.set(phase, done)

        watcher = threading.Thread(target=watch, daemon=True) if poll else None
        with self._progress:
            if watcher is not None:
                watcher.start()
            try:
                yield self
            finally:
                stop.set()
                if watcher is not None:
                    watcher.join()
