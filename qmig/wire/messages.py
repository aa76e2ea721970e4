"""Every message on the wire, as a plain frozen dataclass (see :func:`message`).

These are the values that :mod:`qmig.wire.schema` parses bytes into and builds bytes from;
the field names are the schema's field names. The byte layouts live only in the schema.
``NAME`` is the message's name as QEMU spells it, without its ``QEMU_VM_``, ``MIG_CMD_`` or
``MIG_RP_MSG_`` prefix: it is the key into a version profile's numbers.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Sequence
from dataclasses import MISSING, dataclass, field
from typing import Any, ClassVar, TypeVar, cast, dataclass_transform

T = TypeVar("T")


# --- frozen value classes, cheaply --------------------------------------------------------
# @dataclass(frozen=True) compiles six methods per class when the module is imported; for
# the forty-odd classes here that was about 25 ms, a sixth of `qmig inspect`'s whole run on
# a 300 000-record stream. ``message`` gives the same behaviour (fields(), replace(),
# asdict(), match, equality, hashing, immutability) from methods shared by every class.


class _Message:
    __slots__ = ()
    _names: ClassVar[tuple[str, ...]]
    _compared: ClassVar[tuple[str, ...]]
    _defaults: ClassVar[dict[str, Any]]
    _factories: ClassVar[dict[str, Callable[[], Any]]]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        names = self._names
        if len(args) > len(names):
            raise TypeError(f"{type(self).__name__}() takes {len(names)} arguments")
        values = dict(zip(names, args, strict=False))
        for name, value in kwargs.items():
            if name not in names or name in values:
                raise TypeError(f"{type(self).__name__}() got a bad argument {name!r}")
            values[name] = value
        for name in names:
            if name not in values:
                if name in self._defaults:
                    values[name] = self._defaults[name]
                elif name in self._factories:
                    values[name] = self._factories[name]()
                else:
                    raise TypeError(f"{type(self).__name__}() missing argument {name!r}")
            object.__setattr__(self, name, values[name])

    def _key(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self._compared)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._names)
        return f"{type(self).__qualname__}({fields})"

    def __setattr__(self, name: str, value: Any) -> None:
        raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise dataclasses.FrozenInstanceError(f"cannot delete field {name!r}")


@dataclass_transform(frozen_default=True, field_specifiers=(field,))
def message(cls: type[T]) -> type[T]:
    """A frozen dataclass whose methods come from :class:`_Message` (see above)."""
    namespace = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
    doc = namespace.get("__doc__")
    namespace["__doc__"] = doc or "-"  # spares dataclass() computing a signature for it
    built: Any = dataclass(init=False, repr=False, eq=False)(
        type(cls.__name__, (_Message,), namespace)
    )
    fields = dataclasses.fields(built)
    built._names = tuple(f.name for f in fields)
    built._compared = tuple(f.name for f in fields if f.compare)
    built._defaults = {f.name: f.default for f in fields if f.default is not MISSING}
    built._factories = {
        f.name: f.default_factory for f in fields if f.default_factory is not MISSING
    }
    # What inspect.signature() and hypothesis's builds() read, as a dataclass's __init__ has.
    built.__signature__ = inspect.Signature(
        [
            inspect.Parameter(
                f.name,
                inspect.Parameter.POSITIONAL_OR_KEYWORD,
                default=f.default if f.default is not MISSING else inspect.Parameter.empty,
            )
            for f in fields
        ]
    )
    built.__doc__ = doc or f"{cls.__name__}{built.__signature__}"
    return cast("type[T]", built)


# --- stream framing ---------------------------------------------------------------------


@message
class StreamHeader:
    NAME: ClassVar[str] = "HEADER"
    version: int = 3


@message
class Configuration:
    """The CONFIGURATION section: the machine type and the checks the destination makes."""

    NAME: ClassVar[str] = "CONFIGURATION"
    machine_type: str
    target_page_bits: int | None = None
    capabilities: tuple[str, ...] | None = None
    uuid: bytes | None = None


@message
class SectionStart:
    NAME: ClassVar[str] = "SECTION_START"
    section_id: int
    idstr: str
    instance_id: int
    version_id: int


@message
class SectionFull:
    NAME: ClassVar[str] = "SECTION_FULL"
    section_id: int
    idstr: str
    instance_id: int
    version_id: int


@message
class SectionPart:
    NAME: ClassVar[str] = "SECTION_PART"
    section_id: int


@message
class SectionEnd:
    NAME: ClassVar[str] = "SECTION_END"
    section_id: int


@message
class SectionFooter:
    NAME: ClassVar[str] = "SECTION_FOOTER"
    section_id: int


@message
class Eof:
    NAME: ClassVar[str] = "EOF"


@message
class VmDescription:
    """The JSON that follows EOF in a precopy stream and describes every device section."""

    NAME: ClassVar[str] = "VMDESCRIPTION"
    json: bytes


@message
class DeviceState:
    """A device section's payload, delimited but opaque unless a VMDESCRIPTION decodes it."""

    NAME: ClassVar[str] = "DEVICE_STATE"
    idstr: str
    instance_id: int
    data: bytes
    decoded: dict[str, Any] | None = field(default=None, compare=False)


SectionHeader = SectionStart | SectionFull | SectionPart | SectionEnd

# --- QEMU_VM_COMMAND ---------------------------------------------------------------------


@message
class OpenReturnPath:
    NAME: ClassVar[str] = "OPEN_RETURN_PATH"


@message
class Ping:
    NAME: ClassVar[str] = "PING"
    value: int


@message
class PostcopyAdvise:
    """ADVISE: 16 bytes when RAM postcopy is on, 0 bytes (both fields ``None``) otherwise."""

    NAME: ClassVar[str] = "POSTCOPY_ADVISE"
    page_size_summary: int | None = None
    target_page_size: int | None = None

    @property
    def ram_postcopy(self) -> bool:
        return self.page_size_summary is not None


@message
class PostcopyListen:
    NAME: ClassVar[str] = "POSTCOPY_LISTEN"


@message
class PostcopyRun:
    NAME: ClassVar[str] = "POSTCOPY_RUN"


@message
class DiscardRange:
    start: int
    length: int


@message
class PostcopyRamDiscard:
    """Byte ranges of one RAMBlock that the destination must drop before LISTEN.

    ``ranges``: a tuple from the schema, or, from the reader's fast path, a
    :class:`qmig.wire.discard.DiscardRanges` (equal to the tuple of the same ranges)."""

    NAME: ClassVar[str] = "POSTCOPY_RAM_DISCARD"
    block: str
    ranges: Sequence[DiscardRange]
    version: int = 0


@message
class PostcopyRamDiscards:
    """Consecutive POSTCOPY_RAM_DISCARD commands of one RAMBlock, read as one record.

    Not a message of its own on the wire: a reader asked to (``StreamReader(...,
    coalesce_discards=True)``, as the destination's is) returns a run of well-formed discard
    commands this way, since a switchover sends them by the hundred. ``ranges`` holds all
    their ranges in order; ``commands`` gives, per command, its offset from the record's
    start and how many of the ranges are its own."""

    NAME: ClassVar[str] = "POSTCOPY_RAM_DISCARD"
    block: str
    ranges: Sequence[DiscardRange]
    version: int = 0
    commands: tuple[tuple[int, int], ...] = ()


@message
class Packaged:
    """PACKAGED announces ``length`` bytes of nested stream that follow the command."""

    NAME: ClassVar[str] = "PACKAGED"
    length: int


@message
class PackageEnd:
    """Not on the wire: the reader's marker for the end of a PACKAGED blob."""

    NAME: ClassVar[str] = "PACKAGE_END"


@message
class EnableColo:
    NAME: ClassVar[str] = "ENABLE_COLO"


@message
class PostcopyResume:
    NAME: ClassVar[str] = "POSTCOPY_RESUME"


@message
class RecvBitmap:
    NAME: ClassVar[str] = "RECV_BITMAP"
    block: str


@message
class SwitchoverStart:
    NAME: ClassVar[str] = "SWITCHOVER_START"


Command = (
    OpenReturnPath
    | Ping
    | PostcopyAdvise
    | PostcopyListen
    | PostcopyRun
    | PostcopyRamDiscard
    | Packaged
    | EnableColo
    | PostcopyResume
    | RecvBitmap
    | SwitchoverStart
)
COMMANDS: tuple[type[Command], ...] = (
    OpenReturnPath,
    Ping,
    PostcopyAdvise,
    PostcopyListen,
    PostcopyRun,
    PostcopyRamDiscard,
    Packaged,
    EnableColo,
    PostcopyResume,
    RecvBitmap,
    SwitchoverStart,
)

# --- return path (destination -> source) ------------------------------------------------


@message
class Shut:
    NAME: ClassVar[str] = "SHUT"
    status: int


@message
class Pong:
    NAME: ClassVar[str] = "PONG"
    value: int


@message
class ReqPagesId:
    """A page request naming its RAMBlock; later REQ_PAGES reuse that block."""

    NAME: ClassVar[str] = "REQ_PAGES_ID"
    start: int
    length: int
    block: str


@message
class ReqPages:
    NAME: ClassVar[str] = "REQ_PAGES"
    start: int
    length: int


@message
class RpRecvBitmap:
    """The destination's received bitmap of one block, its answer to CMD RECV_BITMAP.

    The message itself names the block; the bitmap follows it on the return path, outside
    the message's length. ``bitmap`` holds its bytes: little-endian 64-bit words, bit i set
    when target page i of the block was received.
    """

    NAME: ClassVar[str] = "RECV_BITMAP"
    block: str
    bitmap: bytes = b""

    def received_pages(self) -> list[int]:
        """Indices of the target pages whose bit is set."""
        bits = int.from_bytes(self.bitmap, "little")
        return [index for index in range(bits.bit_length()) if bits >> index & 1]


@message
class ResumeAck:
    NAME: ClassVar[str] = "RESUME_ACK"
    value: int


@message
class SwitchoverAck:
    NAME: ClassVar[str] = "SWITCHOVER_ACK"


ReturnPathMessage = Shut | Pong | ReqPagesId | ReqPages | RpRecvBitmap | ResumeAck | SwitchoverAck
RETURN_PATH_MESSAGES: tuple[type[ReturnPathMessage], ...] = (
    Shut,
    Pong,
    ReqPagesId,
    ReqPages,
    RpRecvBitmap,
    ResumeAck,
    SwitchoverAck,
)

# --- the "ram" section -------------------------------------------------------------------


@message
class RamBlockInfo:
    """One entry of the MEM_SIZE block list."""

    idstr: str
    used_length: int
    page_size: int | None = None
    mr_addr: int | None = None


@message
class MemSize:
    NAME: ClassVar[str] = "MEM_SIZE"
    total: int
    blocks: tuple[RamBlockInfo, ...]


@message
class RamPage:
    """One target page (PAGE) or a same-byte page (ZERO, ``data`` is the fill byte)."""

    NAME: ClassVar[str] = "RAM"
    block: str | None  # None: CONTINUE, the same block as the previous record
    offset: int
    zero: bool
    data: bytes  # PAGE: one target page; ZERO: the single fill byte


@message
class RamXbzrle:
    NAME: ClassVar[str] = "RAM"
    block: str | None
    offset: int
    encoded: bytes


@message
class RamCompressed:
    NAME: ClassVar[str] = "RAM"
    block: str | None
    offset: int
    compressed: bytes


@message
class RamEos:
    NAME: ClassVar[str] = "EOS"


@message
class RamMultifdFlush:
    NAME: ClassVar[str] = "MULTIFD_FLUSH"


@message
class RamHook:
    NAME: ClassVar[str] = "HOOK"
    offset: int


@dataclass
class RamPageRun:
    """Many consecutive PAGE / ZERO records of one block, decoded by the fast path.

    ``headers[i]`` is record i's be64 (offset | flags); ``bodies[i]`` is the absolute stream
    offset of its body (the page data, or the fill byte). ``data`` holds the stream bytes from
    absolute offset ``data_base`` on (a view of the reader's buffer, which it keeps alive).
    """

    NAME: ClassVar[str] = "RAM"
    block: str
    count: int
    zero_count: int
    headers: memoryview
    bodies: memoryview
    data: memoryview
    data_base: int
    target_page_size: int
    page_flag: int

    def pages(self) -> list[tuple[int, bool, bytes]]:
        """(offset in block, is_zero, page bytes or fill byte) for each record; slow, for tests."""
        mask = self.target_page_size - 1
        out = []
        for header, body in zip(self.headers, self.bodies, strict=True):
            start = body - self.data_base
            zero = not (header & self.page_flag)
            size = 1 if zero else self.target_page_size
            out.append((header & ~mask, zero, bytes(self.data[start : start + size])))
        return out


RamRecord = RamPage | RamXbzrle | RamCompressed | RamEos | RamMultifdFlush | RamHook | MemSize
