"""Reading a byte string with a reader, fed in pieces, for tests that compare two readings."""

from __future__ import annotations

from typing import Any

from qmig.errors import QmigError
from qmig.wire.reader import END, NEED_DATA, Record

Outcome = tuple[list[Record], QmigError | None]


def read_outcome(reader: Any, data: bytes, chunk: int) -> Outcome:
    """The records ``reader`` (a StreamReader or ReturnPathReader) makes of ``data`` fed
    ``chunk`` bytes at a time, up to its error if there is one, and that error."""
    records: list[Record] = []
    try:
        for at in range(0, len(data), chunk):
            reader.feed(data[at : at + chunk])
            drain(reader, records)
        reader.feed_eof()
        drain(reader, records)
    except QmigError as error:
        return records, error
    return records, None


def drain(reader: Any, records: list[Record]) -> None:
    while (record := reader.next_record()) is not NEED_DATA and record is not END:
        assert isinstance(record, Record)
        records.append(record)


def assert_same(a: Outcome, b: Outcome) -> None:
    """The same records, and the same error (class, what, detail, offset) or none."""
    (records_a, error_a), (records_b, error_b) = a, b
    assert records_a == records_b
    assert type(error_a) is type(error_b), (error_a, error_b)
    if error_a is not None and error_b is not None:
        assert (error_a.what, error_a.detail, error_a.offset) == (
            error_b.what,
            error_b.detail,
            error_b.offset,
        )
