"""Every message on the wire, as a plain frozen dataclass.

These are the values that :mod:`qmig.wire.schema` parses bytes into and builds bytes from;
the field names are the schema's field names. The byte layouts live only in the schema.
``NAME`` is the message's name as QEMU spells it, without its ``QEMU_VM_``, ``MIG_CMD_`` or
``MIG_RP_MSG_`` prefix: it is the key into a version profile's numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

# --- stream framing ---------------------------------------------------------------------


@dataclass(frozen=True)
class StreamHeader:
    NAME: ClassVar[str] = "HEADER"
    version: int = 3


@dataclass(frozen=True)
class Configuration:
    """The CONFIGURATION section: the machine type and the checks the destination makes."""

    NAME: ClassVar[str] = "CONFIGURATION"
    machine_type: str
    target_page_bits: int | None = None
    capabilities: tuple[str, ...] | None = None
    uuid: bytes | None = None


@dataclass(frozen=True)
class SectionStart:
    NAME: ClassVar[str] = "SECTION_START"
    section_id: int
    idstr: str
    instance_id: int
    version_id: int


@dataclass(frozen=True)
class SectionFull:
    NAME: ClassVar[str] = "SECTION_FULL"
    section_id: int
    idstr: str
    instance_id: int
    version_id: int


@dataclass(frozen=True)
class SectionPart:
    NAME: ClassVar[str] = "SECTION_PART"
    section_id: int


@dataclass(frozen=True)
class SectionEnd:
    NAME: ClassVar[str] = "SECTION_END"
    section_id: int


@dataclass(frozen=True)
class SectionFooter:
    NAME: ClassVar[str] = "SECTION_FOOTER"
    section_id: int


@dataclass(frozen=True)
class Eof:
    NAME: ClassVar[str] = "EOF"


@dataclass(frozen=True)
class VmDescription:
    """The JSON that follows EOF in a precopy stream and describes every device section."""

    NAME: ClassVar[str] = "VMDESCRIPTION"
    json: bytes


@dataclass(frozen=True)
class DeviceState:
    """A device section's payload, delimited but opaque unless a VMDESCRIPTION decodes it."""

    NAME: ClassVar[str] = "DEVICE_STATE"
    idstr: str
    instance_id: int
    data: bytes
    decoded: dict[str, Any] | None = field(default=None, compare=False)


SectionHeader = SectionStart | SectionFull | SectionPart | SectionEnd

# --- QEMU_VM_COMMAND ---------------------------------------------------------------------


@dataclass(frozen=True)
class OpenReturnPath:
    NAME: ClassVar[str] = "OPEN_RETURN_PATH"


@dataclass(frozen=True)
class Ping:
    NAME: ClassVar[str] = "PING"
    value: int


@dataclass(frozen=True)
class PostcopyAdvise:
    """ADVISE: 16 bytes when RAM postcopy is on, 0 bytes (both fields ``None``) otherwise."""

    NAME: ClassVar[str] = "POSTCOPY_ADVISE"
    page_size_summary: int | None = None
    target_page_size: int | None = None

    @property
    def ram_postcopy(self) -> bool:
        return self.page_size_summary is not None


@dataclass(frozen=True)
class PostcopyListen:
    NAME: ClassVar[str] = "POSTCOPY_LISTEN"


@dataclass(frozen=True)
class PostcopyRun:
    NAME: ClassVar[str] = "POSTCOPY_RUN"


@dataclass(frozen=True)
class DiscardRange:
    start: int
    length: int


@dataclass(frozen=True)
class PostcopyRamDiscard:
    """Byte ranges of one RAMBlock that the destination must drop before LISTEN."""

    NAME: ClassVar[str] = "POSTCOPY_RAM_DISCARD"
    block: str
    ranges: tuple[DiscardRange, ...]
    version: int = 0


@dataclass(frozen=True)
class Packaged:
    """PACKAGED announces ``length`` bytes of nested stream that follow the command."""

    NAME: ClassVar[str] = "PACKAGED"
    length: int


@dataclass(frozen=True)
class PackageEnd:
    """Not on the wire: the reader's marker for the end of a PACKAGED blob."""

    NAME: ClassVar[str] = "PACKAGE_END"


@dataclass(frozen=True)
class EnableColo:
    NAME: ClassVar[str] = "ENABLE_COLO"


@dataclass(frozen=True)
class PostcopyResume:
    NAME: ClassVar[str] = "POSTCOPY_RESUME"


@dataclass(frozen=True)
class RecvBitmap:
    NAME: ClassVar[str] = "RECV_BITMAP"
    block: str


@dataclass(frozen=True)
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


@dataclass(frozen=True)
class Shut:
    NAME: ClassVar[str] = "SHUT"
    status: int


@dataclass(frozen=True)
class Pong:
    NAME: ClassVar[str] = "PONG"
    value: int


@dataclass(frozen=True)
class ReqPagesId:
    """A page request naming its RAMBlock; later REQ_PAGES reuse that block."""

    NAME: ClassVar[str] = "REQ_PAGES_ID"
    start: int
    length: int
    block: str


@dataclass(frozen=True)
class ReqPages:
    NAME: ClassVar[str] = "REQ_PAGES"
    start: int
    length: int


@dataclass(frozen=True)
class RpRecvBitmap:
    NAME: ClassVar[str] = "RECV_BITMAP"
    block: str


@dataclass(frozen=True)
class ResumeAck:
    NAME: ClassVar[str] = "RESUME_ACK"
    value: int


@dataclass(frozen=True)
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


@dataclass(frozen=True)
class RamBlockInfo:
    """One entry of the MEM_SIZE block list."""

    idstr: str
    used_length: int
    page_size: int | None = None
    mr_addr: int | None = None


@dataclass(frozen=True)
class MemSize:
    NAME: ClassVar[str] = "MEM_SIZE"
    total: int
    blocks: tuple[RamBlockInfo, ...]


@dataclass(frozen=True)
class RamPage:
    """One target page (PAGE) or a same-byte page (ZERO, ``data`` is the fill byte)."""

    NAME: ClassVar[str] = "RAM"
    block: str | None  # None: CONTINUE, the same block as the previous record
    offset: int
    zero: bool
    data: bytes  # PAGE: one target page; ZERO: the single fill byte


@dataclass(frozen=True)
class RamXbzrle:
    NAME: ClassVar[str] = "RAM"
    block: str | None
    offset: int
    encoded: bytes


@dataclass(frozen=True)
class RamCompressed:
    NAME: ClassVar[str] = "RAM"
    block: str | None
    offset: int
    compressed: bytes


@dataclass(frozen=True)
class RamEos:
    NAME: ClassVar[str] = "EOS"


@dataclass(frozen=True)
class RamMultifdFlush:
    NAME: ClassVar[str] = "MULTIFD_FLUSH"


@dataclass(frozen=True)
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
