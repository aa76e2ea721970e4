"""Incremental, sans-IO readers of the migration stream and of the return path.

Feed bytes in with :meth:`StreamReader.feed`, take :class:`Record` values out with
:meth:`StreamReader.next_record` until it returns :data:`NEED_DATA` (feed more) or
:data:`END`. No I/O happens here: the same reader serves a file, a socket, a fuzzer or a test.

The reader keeps only *framing* context, the facts without which the bytes cannot be
delimited: which section ids are the ``ram`` section, which RAMBlock a CONTINUE record
continues, whether a 16-byte ADVISE preceded the MEM_SIZE list, where a PACKAGED blob ends.
It knows nothing of PostcopyState; :mod:`qmig.protocol` decides what is legal when.

Memory stays bounded whatever a length field claims: a PACKAGED blob is read record by
record, never allocated, and no single record may need more than ``max_record`` bytes.

The readers live in :mod:`qmig.wire.reading`, one module per part of the grammar; this
module is where they are imported from.
"""

from __future__ import annotations

from qmig.wire.reading.buffer import MIN_BUFFER
from qmig.wire.reading.device_sections import MAX_DESCRIPTION, find_trailing_vmdesc
from qmig.wire.reading.framing import RAM_IDSTR, FramingContext
from qmig.wire.reading.ram_section import MAX_INFERRED_BLOCKS, MAX_RAM_BLOCKS
from qmig.wire.reading.records import END, NEED_DATA, Record
from qmig.wire.reading.return_path import MAX_BITMAP, ReturnPathReader
from qmig.wire.reading.stream import MAX_RECORD, StreamReader

__all__ = [
    "END",
    "MAX_BITMAP",
    "MAX_DESCRIPTION",
    "MAX_INFERRED_BLOCKS",
    "MAX_RAM_BLOCKS",
    "MAX_RECORD",
    "MIN_BUFFER",
    "NEED_DATA",
    "RAM_IDSTR",
    "FramingContext",
    "Record",
    "ReturnPathReader",
    "StreamReader",
    "find_trailing_vmdesc",
]
