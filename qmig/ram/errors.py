"""Errors of the RAM layer, all derived from :mod:`qmig.errors`.

The RAM layer knows nothing of stream offsets; a caller that does can anchor an error with
:meth:`qmig.errors.QmigError.at`.
"""

from __future__ import annotations

from qmig.errors import QmigError


class RamError(QmigError):
    """A RAM block was asked for something impossible (out of range, unplaced, torn down)."""

    def __init__(self, detail: str, offset: int | None = None) -> None:
        super().__init__("RAM", detail, offset)


class FaultingSideGoneError(RamError):
    """UFFDIO_COPY/ZEROPAGE found no one to place for: the area or its process is gone."""


class UffdCallError(QmigError):
    """A userfaultfd ioctl failed in a way that is neither EEXIST, EAGAIN nor a vanished peer."""

    def __init__(self, call: str, errno_value: int, detail: str) -> None:
        self.errno = errno_value
        super().__init__("userfaultfd", f"{call} failed: {detail}")


class UffdEventError(QmigError):
    """The userfaultfd said something other than a page fault about registered memory (a
    range removed, unmapped or moved): what was placed there is no longer known."""

    def __init__(self, detail: str) -> None:
        super().__init__("userfaultfd", detail)
