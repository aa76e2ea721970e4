"""What the readers hand out: :class:`Record` values and the two sentinels.

Also the helpers both readers use to turn a length-delimited payload into a message and a
construct failure into one line.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final

import construct as cs

from qmig.errors import MalformedError
from qmig.wire.fields import FieldError
from qmig.wire.reading.buffer import ByteStream


class Sentinel:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


NEED_DATA: Final = Sentinel("NEED_DATA")
END: Final = Sentinel("END")


def records_of(next_record: Callable[[], Record | Sentinel]) -> Iterator[Record]:
    """The records ``next_record`` hands out until it needs more input or the input ended:
    a reader's ``__iter__``."""
    while True:
        record = next_record()
        if record is NEED_DATA or record is END:
            return
        assert isinstance(record, Record)
        yield record


@dataclass
class Record:
    """One item of the stream, where it was, and where it sits."""

    offset: int  # absolute offset of the record's first byte in the outer stream
    size: int  # bytes the record covers
    message: Any  # a value from qmig.wire.messages
    depth: int = 0  # 0: the outer stream; 1: inside PACKAGED; ...
    section: str | None = None  # idstr of the section the record belongs to

    @property
    def name(self) -> str:
        return str(self.message.NAME)


class NeedMore(Exception):
    """The next record is not complete in the buffer yet."""

    def __init__(self, what: str, offset: int, limit: int | None = None) -> None:
        self.what = what
        self.offset = offset
        self.limit = limit


def parse_payload(
    what: str, kind: str, schema: cs.Construct, payload: memoryview, offset: int, header: int
) -> Any:
    """A length-delimited payload, which must be used up exactly (QEMU's length checks).

    ``offset`` is where the record starts and ``header`` the bytes before its payload.
    """
    length = len(payload)
    with ByteStream(payload) as stream:
        try:
            message = schema.parse_stream(stream, len=length)
        except FieldError as error:
            detail = f"runs past the end of the {kind}" if error.short else error.detail
            raise MalformedError(what, detail, offset + header + error.position) from None
        except cs.ConstructError as error:
            raise MalformedError(what, construct_detail(error), offset + header) from None
        left = length - stream.tell()
    if left:
        raise MalformedError(what, f"{left} bytes left over in the {kind}", offset)
    return message


def construct_detail(error: cs.ConstructError) -> str:
    text = str(error).splitlines()[-1]
    return text.strip() or type(error).__name__
