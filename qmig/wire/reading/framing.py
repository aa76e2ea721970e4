"""Stream framing: where the reader is in the grammar, what it has learnt, and how it parses.

:class:`FramedInput` is what the section readers (:mod:`.ram_section`,
:mod:`.device_sections`) and :class:`~qmig.wire.reading.stream.StreamReader` share: the
framing context, the open PACKAGED blobs that bound every record inside them, and the one
way to run a schema over the buffer that tells "malformed" from "not all here yet".
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import construct as cs

from qmig.errors import MalformedError
from qmig.wire import messages as m
from qmig.wire.fields import FieldError
from qmig.wire.profiles import Profile
from qmig.wire.reading.buffer import ByteStream, InputBuffer
from qmig.wire.reading.records import NeedMore, Record, construct_detail
from qmig.wire.schema import Schema

RAM_IDSTR = "ram"


@dataclass
class Section:
    section_id: int
    idstr: str
    instance_id: int
    version_id: int

    @property
    def is_ram(self) -> bool:
        return self.idstr == RAM_IDSTR


class Mode(enum.Enum):
    """What the stream reader expects next."""

    HEADER = enum.auto()  # the stream header
    CONFIGURATION = enum.auto()  # the CONFIGURATION section, where the profile has one
    TOP = enum.auto()  # a section header, a command or EOF
    RAM = enum.auto()  # a record of the open ram section
    FOOTER = enum.auto()  # the open section's footer
    DEVICE = enum.auto()  # the open device section's state
    AFTER_EOF = enum.auto()  # the VMDESCRIPTION after the outer EOF
    END = enum.auto()  # nothing: the stream is complete


@dataclass
class Frame:
    """The reader's position in the grammar."""

    mode: Mode
    section: Section | None = None


@dataclass
class FramingContext:
    """What the reader has learnt that later bytes depend on (public for inspection)."""

    target_page_size: int
    sections: dict[int, Section] = field(default_factory=dict)
    ram_blocks: dict[str, m.RamBlockInfo] = field(default_factory=dict)
    current_block: str | None = None
    advise: m.PostcopyAdvise | None = None
    capabilities: tuple[str, ...] = ()
    configuration: m.Configuration | None = None


class FramedInput(InputBuffer):
    """The buffer seen as a stream of records, bounded by the open PACKAGED blobs."""

    schema: Schema
    profile: Profile
    context: FramingContext
    max_record: int
    _frame: Frame
    _packages: list[int]  # absolute end offsets of the open PACKAGED blobs

    def _limit(self) -> int:
        """Index in _buf beyond which the current record may not read."""
        end = len(self._buf)
        if self._packages:
            end = min(end, self._packages[-1] - self._base)
        return end

    def _bounded_by_package(self) -> bool:
        return bool(self._packages) and self._packages[-1] - self._base <= len(self._buf)

    def _parse(
        self,
        what: str,
        schema: cs.Construct,
        size: int | None = None,
        window: int = 1 << 17,
        **kw: Any,
    ) -> tuple[Any, int]:
        """Parse ``schema`` at the current position; return (value, bytes used).

        ``size`` is the record's known length; without it the schema may read up to
        ``window`` bytes, and running out of buffer means "need more data".
        """
        offset = self.offset
        limit = self._limit()
        if size is not None and self._pos + size > limit:
            if self._bounded_by_package():
                raise MalformedError(what, "runs past the end of the package", offset)
            raise NeedMore(what, offset)
        end = self._pos + size if size is not None else min(limit, self._pos + window)
        with ByteStream(self._buf[self._pos : end]) as stream:
            return self._parse_from(stream, what, schema, size, offset, kw)

    def _parse_from(
        self,
        stream: ByteStream,
        what: str,
        schema: cs.Construct,
        size: int | None,
        offset: int,
        kw: dict[str, Any],
    ) -> tuple[Any, int]:
        try:
            value = schema.parse_stream(stream, **kw)
        except FieldError as error:
            if error.short and size is None:
                self._short(what, offset)
            raise MalformedError(what, error.detail, offset + error.position) from None
        except cs.StreamError:
            if size is None:
                self._short(what, offset)
            raise MalformedError(what, "runs past the end of its record", offset) from None
        except cs.ConstructError as error:
            raise MalformedError(what, construct_detail(error), offset) from None
        return value, stream.tell()

    def _short(self, what: str, offset: int) -> None:
        """A record ran out of bytes: malformed inside a complete package, else wait."""
        if self._bounded_by_package():
            raise MalformedError(what, "runs past the end of the package", offset) from None
        raise NeedMore(what, offset) from None

    def _emit(self, message: Any, size: int, section: str | None = None) -> Record:
        record = Record(self.offset, size, message, len(self._packages), section)
        self._pos += size
        return record

    def _peek_byte(self) -> int:
        return self._buf[self._pos]

    def _after_section(self) -> None:
        if self.profile.section_footer:
            self._frame = Frame(Mode.FOOTER, self._frame.section)
        else:
            self._frame = Frame(Mode.TOP)
