"""Broken streams: valid bytes with one targeted defect, and where reading must fail."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from hypothesis import strategies as st

from qmig.strategies.basics import MAX_NAME, U16_MAX, U64_MAX, _profile, _schema, names, uints
from qmig.strategies.commands import discard_ranges
from qmig.strategies.framing import configurations
from qmig.strategies.return_path import pongs, req_pages
from qmig.wire import messages as m
from qmig.wire.profiles import available_versions, load_profile
from qmig.wire.schema import DISCARD_TERMINATOR, Schema, discard_range_offset

Channel = Literal["stream", "return_path"]


@dataclass(frozen=True)
class InvalidStream:
    """Bytes with one defect: reading them must fail naming ``what`` in [start, end)."""

    data: bytes = field(repr=False)
    what: str
    start: int  # absolute offset of the faulty record
    end: int  # absolute offset just past it
    description: str
    channel: Channel = "stream"


@dataclass(frozen=True)
class _Prefix:
    data: bytes
    blocks: tuple[m.RamBlockInfo, ...]


@st.composite
def _valid_prefix(draw: st.DrawFn, version: str | None) -> _Prefix:
    """Header, CONFIGURATION, OPEN_RETURN_PATH, PING, ADVISE and the ram SECTION_START."""
    schema = _schema(version)
    page = schema.target_page_size
    idstrs = draw(st.lists(names(1, 24), min_size=1, max_size=3, unique=True))
    blocks = tuple(m.RamBlockInfo(i, draw(st.integers(1, 64)) * page) for i in idstrs)
    configuration = draw(configurations(version).map(_no_caps))
    data = schema.build_opening(configuration, return_path=True) + schema.build_command(m.Ping(1))
    data += schema.build_command(m.PostcopyAdvise(page, page))
    data += schema.build_ram_setup(2, blocks)
    return _Prefix(data, blocks)


def _no_caps(configuration: m.Configuration) -> m.Configuration:
    # Without x-ignore-shared the prefix's MEM_SIZE entries have no memory-region address.
    return m.Configuration(
        configuration.machine_type, configuration.target_page_bits, None, configuration.uuid
    )


@st.composite
def _placed(
    draw: st.DrawFn,
    version: str | None,
    bad: bytes,
    what: str,
    description: str,
    trailer: bytes = b"",
    may_package: bool = True,
) -> InvalidStream:
    """``bad`` behind a valid prefix, optionally inside a PACKAGED blob, then ``trailer``."""
    schema = _schema(version)
    prefix = draw(_valid_prefix(version)).data
    if may_package and draw(st.booleans()):
        inner_prefix = schema.build_command(m.PostcopyListen())
        body = inner_prefix + bad + trailer
        packaged = schema.build_command(m.Packaged(len(body)))
        start = len(prefix) + len(packaged) + len(inner_prefix)
        data = prefix + packaged + body
    else:
        start = len(prefix)
        data = prefix + bad + trailer
    return InvalidStream(data, what, start, start + len(bad), description)


def _raw_command(schema: Schema, name_or_number: str | int, payload: bytes, length: int) -> bytes:
    number = (
        schema.profile.commands[name_or_number]
        if isinstance(name_or_number, str)
        else name_or_number
    )
    header = bytes(schema.command_header.build({"cmd": number, "len": length}))
    return header + payload


@st.composite
def invalid_command_lengths(draw: st.DrawFn, version: str = "7.2") -> InvalidStream:
    """A command whose length its receiver refuses (fixed lengths; DISCARD below 20)."""
    schema = _schema(version)
    rules = schema.profile.command_lengths
    # Variable-length commands without a minimum (RECV_BITMAP) check their own fields.
    checked = sorted(name for name, rule in rules.items() if rule.accepted or rule.min_length)
    name = draw(st.sampled_from(checked))
    rule = rules[name]
    if rule.accepted is None:
        length = draw(st.integers(0, rule.min_length - 1))
    else:
        length = draw(st.integers(0, 64).filter(lambda n: n not in (rule.accepted or ())))
    payload = draw(st.binary(min_size=length, max_size=length))
    bad = _raw_command(schema, name, payload, length)
    return draw(_placed(version, bad, name, f"{name} with length {length}"))


@st.composite
def invalid_rp_lengths(draw: st.DrawFn, version: str = "7.2") -> InvalidStream:
    """A return-path message with a length the source refuses (fixed, or over 512)."""
    schema = _schema(version)
    profile = schema.profile
    name = draw(st.sampled_from(sorted(profile.rp_lengths)))
    rule = profile.rp_lengths[name]
    limit = profile.rp_max_length
    if rule.accepted is None:
        too_long = st.integers(limit + 1, U16_MAX)
        too_short = st.integers(0, rule.min_length - 1) if rule.min_length else st.nothing()
        length = draw(too_long | too_short)
    else:
        length = draw(st.integers(0, 600).filter(lambda n: n not in (rule.accepted or ())))
    payload = draw(st.binary(min_size=min(length, 600), max_size=min(length, 600)))
    header = bytes(schema.rp_header.build({"type": profile.rp_messages[name], "len": length}))
    lead = draw(st.lists(pongs(), max_size=2))
    prefix = b"".join(schema.build_rp(pong) for pong in lead)
    data = prefix + header + payload
    end = len(prefix) + schema.rp_header_size + length
    return InvalidStream(
        data, name, len(prefix), end, f"{name} with length {length}", "return_path"
    )


@st.composite
def invalid_overlong_names(draw: st.DrawFn, version: str = "7.2") -> InvalidStream:
    """A name whose counted length runs past the end of its command or message."""
    schema = _schema(version)
    profile = schema.profile
    choices = ["POSTCOPY_RAM_DISCARD", "REQ_PAGES_ID"]
    if "RECV_BITMAP" in profile.commands:
        choices.append("RECV_BITMAP")
    which = draw(st.sampled_from(choices))
    if which == "POSTCOPY_RAM_DISCARD":
        length = draw(st.integers(profile.command_lengths[which].min_length, 200))
        name_length = draw(st.integers(length - 1, MAX_NAME))
        head = bytes([profile.discard_version, name_length])
        payload = head + draw(names(length - len(head), length - len(head))).encode()
        bad = _raw_command(schema, which, payload, length)
        trailer = draw(st.binary(max_size=300))
        return draw(_placed(version, bad, which, "discard name longer than the command", trailer))
    if which == "RECV_BITMAP":
        length = draw(st.integers(1, 200))
        name_length = draw(st.integers(length, MAX_NAME))
        payload = bytes([name_length]) + draw(names(length - 1, length - 1)).encode()
        bad = _raw_command(schema, which, payload, length)
        trailer = draw(st.binary(max_size=300))
        return draw(_placed(version, bad, which, "bitmap name longer than the command", trailer))
    # The message's length stops short of its name: the message cut after ``length`` bytes.
    name_length = draw(st.integers(1, MAX_NAME))
    fixed = profile.rp_lengths[which].min_length  # start, length and the name's length byte
    length = draw(st.integers(fixed, fixed + name_length - 1))
    request = m.ReqPagesId(draw(uints(64)), draw(uints(32)), draw(names(name_length, name_length)))
    head = schema.rp_header_size
    body = schema.build_rp(request)[head : head + length]
    header = bytes(schema.rp_header.build({"type": profile.rp_messages[which], "len": length}))
    trailer = draw(st.binary(max_size=300))
    data = header + body + trailer
    return InvalidStream(
        data, which, 0, head + length, "request name longer than the message", "return_path"
    )


@st.composite
def invalid_wrapping_discards(draw: st.DrawFn, version: str = "7.2") -> InvalidStream:
    """A discard whose name is longer than its command by a multiple of 16.

    QEMU subtracts ``3 + name length`` from the command length in a 16-bit counter: these
    wrap it to a multiple of 16 near 65536, so QEMU would read range pairs far past the
    command. The bytes after the command continue the name, as such an attack would.
    """
    schema = _schema(version)
    profile = schema.profile
    fixed = discard_range_offset("", 0)  # version, the name's length byte, the terminator
    span = discard_range_offset("", 1) - fixed  # one range
    least = profile.command_lengths["POSTCOPY_RAM_DISCARD"].min_length
    name_length = draw(st.integers(least - fixed + span, MAX_NAME))
    wraps = draw(st.integers(1, (name_length + fixed - least) // span))
    # (length - fixed - name_length) % 65536 = 65536 - span * wraps
    length = name_length + fixed - span * wraps
    name = draw(names(name_length, name_length)).encode()
    head = bytes([profile.discard_version, name_length])
    payload = head + name[: length - len(head)]
    bad = _raw_command(schema, "POSTCOPY_RAM_DISCARD", payload, length)
    terminator = DISCARD_TERMINATOR.build(None)
    trailer = name[length - len(head) :] + terminator + draw(st.binary(min_size=span, max_size=64))
    return draw(
        _placed(version, bad, "POSTCOPY_RAM_DISCARD", "16-bit length wraps", trailer, False)
    )


@st.composite
def _discard_against_prefix(
    draw: st.DrawFn, version: str, make_range: Callable[[st.DrawFn, m.RamBlockInfo, int], Any]
) -> tuple[_Prefix, bytes]:
    schema = _schema(version)
    prefix = draw(_valid_prefix(version))
    block = draw(st.sampled_from(prefix.blocks))
    page = schema.target_page_size
    good = draw(
        st.lists(
            st.integers(0, block.used_length // page - 1).map(
                lambda i: m.DiscardRange(i * page, page)
            ),
            max_size=5,
        )
    )
    bad = make_range(draw, block, page)
    at = draw(st.integers(0, len(good)))
    ranges = (*good[:at], bad, *good[at:])
    return prefix, schema.build_command(m.PostcopyRamDiscard(block.idstr, ranges))


def _beyond(draw: st.DrawFn, block: m.RamBlockInfo, page: int) -> m.DiscardRange:
    if draw(st.booleans()):
        # Starts inside or at the end, ends beyond the block.
        start = draw(st.integers(0, block.used_length // page)) * page
        least = max(page, block.used_length - start + page)
        length = draw(st.integers(least // page, least // page + 64)) * page
        return m.DiscardRange(start, length)
    # start + length wraps past 2**64 and lands inside the block.
    start = draw(st.integers(block.used_length // page, (U64_MAX // page))) * page
    length = (1 << 64) - start + draw(st.integers(0, block.used_length // page - 1)) * page
    return m.DiscardRange(start, length)


def _unaligned(draw: st.DrawFn, block: m.RamBlockInfo, page: int) -> m.DiscardRange:
    start = draw(st.integers(0, block.used_length // page - 1)) * page
    length = page
    if draw(st.booleans()):
        start += draw(st.integers(1, page - 1))
    else:
        length = draw(st.integers(1, page - 1))
    return m.DiscardRange(start, length)


def invalid_discard_ranges(version: str = "7.2") -> st.SearchStrategy[InvalidStream]:
    """A discard range beyond its RAMBlock, or one whose ``start + length`` wraps 64 bits."""
    return _invalid_discard(version, _beyond, "range beyond the block")


def invalid_unaligned_discards(version: str = "7.2") -> st.SearchStrategy[InvalidStream]:
    """A discard range whose start or length is not a multiple of the block's page size."""
    return _invalid_discard(version, _unaligned, "unaligned range")


@st.composite
def _invalid_discard(
    draw: st.DrawFn,
    version: str,
    bad_range: Callable[[st.DrawFn, m.RamBlockInfo, int], Any],
    description: str,
) -> InvalidStream:
    prefix, command = draw(_discard_against_prefix(version, bad_range))
    start = len(prefix.data)
    return InvalidStream(
        prefix.data + command, "POSTCOPY_RAM_DISCARD", start, start + len(command), description
    )


@st.composite
def invalid_orphan_req_pages(draw: st.DrawFn, version: str = "7.2") -> InvalidStream:
    """A return path whose first page request is REQ_PAGES: there is no previous block."""
    schema = _schema(version)
    lead = b"".join(schema.build_rp(pong) for pong in draw(st.lists(pongs(), max_size=3)))
    request = schema.build_rp(draw(req_pages()))
    return InvalidStream(
        lead + request,
        "REQ_PAGES",
        len(lead),
        len(lead) + len(request),
        "REQ_PAGES with no previous REQ_PAGES_ID",
        "return_path",
    )


EMPTY_NAME_RECORDS = (
    "POSTCOPY_RAM_DISCARD",
    "RECV_BITMAP",
    "SECTION_START",
    "SECTION_FULL",
    "MEM_SIZE",
    "RAM",
)


@st.composite
def invalid_empty_names(
    draw: st.DrawFn, version: str = "7.2", records: Sequence[str] = EMPTY_NAME_RECORDS
) -> InvalidStream:
    """A zero-length name where QEMU's reader cannot accept one, on the main stream.

    ``records`` limits the choice to some of :data:`EMPTY_NAME_RECORDS` (RECV_BITMAP only
    where ``version`` has it).
    """
    schema = _schema(version)
    choices = [
        name
        for name in records
        if name != "RECV_BITMAP" or "RECV_BITMAP" in schema.profile.commands
    ]
    which = draw(st.sampled_from(choices))
    page = schema.target_page_size
    if which == "POSTCOPY_RAM_DISCARD":
        # Two ranges or more keep the command at its minimum length or more.
        ranges = tuple(draw(st.lists(discard_ranges(), min_size=2, max_size=4)))
        bad = schema.build_command(m.PostcopyRamDiscard("", ranges, schema.profile.discard_version))
        return draw(_placed(version, bad, which, "empty RAMBlock name"))
    if which == "RECV_BITMAP":
        bad = schema.build_command(m.RecvBitmap(""))
        return draw(_placed(version, bad, which, "empty block name"))
    if which in ("SECTION_START", "SECTION_FULL"):
        cls = m.SectionStart if which == "SECTION_START" else m.SectionFull
        bad = schema.build_section(cls(draw(uints(32)), "", draw(uints(32)), draw(uints(32))))
        return draw(_placed(version, bad, which, "empty idstr"))
    prefix = draw(_valid_prefix(version))
    start = len(prefix.data)
    if which == "MEM_SIZE":
        section = schema.build_section(
            m.SectionStart(7, "ram", 0, schema.profile.ram_section_version)
        )
        others = tuple(draw(st.lists(st.builds(m.RamBlockInfo, names(1, 8), st.just(page)))))
        empty = m.RamBlockInfo("", page)
        bad = schema.build_mem_size(m.MemSize(page * (len(others) + 1), (*others, empty)))
        start += len(section)
        return InvalidStream(
            prefix.data + section + bad, which, start, start + len(bad), "empty RAMBlock name"
        )
    section = schema.build_section(m.SectionPart(2))
    bad = schema.build_ram_page(m.RamPage("", 0, True, b"\x00"))
    start += len(section)
    return InvalidStream(
        prefix.data + section + bad, which, start, start + len(bad), "empty block name"
    )


@st.composite
def invalid_empty_rp_names(
    draw: st.DrawFn, version: str = "7.2", messages: Sequence[str] = ("REQ_PAGES_ID", "RECV_BITMAP")
) -> InvalidStream:
    """REQ_PAGES_ID or RECV_BITMAP naming the empty RAMBlock (no RAMBlock has that name).

    Well-formed on the wire: the source refuses them when it looks the block up.
    """
    schema = _schema(version)
    choices = [
        name for name in messages if name != "RECV_BITMAP" or name in schema.profile.rp_messages
    ]
    which = draw(st.sampled_from(choices))
    message: Any = (
        m.ReqPagesId(draw(uints(64)), draw(uints(32)), "")
        if which == "REQ_PAGES_ID"
        else m.RpRecvBitmap("")
    )
    data = schema.build_rp(message)
    return InvalidStream(data, which, 0, len(data), "empty block name", "return_path")


def unknown_command_numbers(version: str = "7.2") -> st.SearchStrategy[int]:
    """Command numbers ``version`` does not know: 0, those of newer versions, and beyond."""
    known = set(_profile(version).commands.values())
    first_invalid = max(known) + 1
    newer = sorted(
        {n for other in available_versions() for n in load_profile(other).commands.values()} - known
    )
    return st.one_of(
        st.just(0),
        st.sampled_from(newer) if newer else st.nothing(),
        st.integers(first_invalid, U16_MAX),
    )


@st.composite
def invalid_unknown_commands(draw: st.DrawFn, version: str = "7.2") -> InvalidStream:
    """A QEMU_VM_COMMAND whose number ``version`` does not know."""
    schema = _schema(version)
    number = draw(unknown_command_numbers(version))
    length = draw(st.integers(0, 32))
    payload = draw(st.binary(min_size=length, max_size=length))
    bad = _raw_command(schema, number, payload, length)
    return draw(_placed(version, bad, "unknown command", f"MIG_CMD {number:#x}"))


@st.composite
def invalid_unknown_rp_messages(draw: st.DrawFn, version: str = "7.2") -> InvalidStream:
    """A return-path message whose type ``version`` does not know."""
    schema = _schema(version)
    known = set(schema.profile.rp_messages.values())
    number = draw(st.integers(0, U16_MAX).filter(lambda n: n not in known))
    length = draw(st.integers(0, 16))
    header = bytes(schema.rp_header.build({"type": number, "len": length}))
    data = header + draw(st.binary(min_size=length, max_size=length))
    return InvalidStream(data, "unknown message", 0, len(data), f"type {number:#x}", "return_path")


INVALID_STRATEGIES: dict[str, Callable[[str], st.SearchStrategy[InvalidStream]]] = {
    "command_lengths": invalid_command_lengths,
    "rp_lengths": invalid_rp_lengths,
    "overlong_names": invalid_overlong_names,
    "wrapping_discards": invalid_wrapping_discards,
    "discard_ranges": invalid_discard_ranges,
    "unaligned_discards": invalid_unaligned_discards,
    "orphan_req_pages": invalid_orphan_req_pages,
    "empty_names": invalid_empty_names,
    "empty_rp_names": invalid_empty_rp_names,
    "unknown_commands": invalid_unknown_commands,
    "unknown_rp_messages": invalid_unknown_rp_messages,
}
"""Every invalid-variant strategy, by name; each takes a QEMU version."""


def invalid_streams(version: str = "7.2") -> st.SearchStrategy[InvalidStream]:
    """Any of the invalid variants."""
    return st.one_of([strategy(version) for strategy in INVALID_STRATEGIES.values()])
