"""The records of the ``ram`` section: pages, XBZRLE, compressed pages, MEM_SIZE, flags."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from qmig.strategies.basics import (
    HUGE_PAGE,
    _profile,
    _schema,
    names,
    page_contents,
    page_offsets,
)
from qmig.strategies.commands import commands
from qmig.strategies.return_path import return_path_messages
from qmig.wire import messages as m
from qmig.wire.schema import Schema


def ram_block_infos(
    version: str | None = None,
    *,
    page_size: bool | None = None,
    mr_addr: bool | None = None,
    max_pages: int = 1 << 20,
) -> st.SearchStrategy[m.RamBlockInfo]:
    """One MEM_SIZE entry; ``page_size`` / ``mr_addr``: force the optional field on or off."""
    page = _schema(version).target_page_size

    def optional(present: bool | None, values: st.SearchStrategy[int]) -> Any:
        if present is None:
            return st.none() | values
        return values if present else st.none()

    return st.builds(
        m.RamBlockInfo,
        idstr=names(),
        used_length=st.integers(1, max_pages).map(lambda pages: pages * page),
        page_size=optional(page_size, st.sampled_from([page, 64 << 10, HUGE_PAGE, 1 << 30])),
        mr_addr=optional(mr_addr, page_offsets(version)),
    )


@st.composite
def mem_sizes(
    draw: st.DrawFn,
    version: str | None = None,
    *,
    page_size: bool = False,
    mr_addr: bool = False,
    max_blocks: int = 6,
) -> m.MemSize:
    """A MEM_SIZE record whose total is the sum of its blocks' lengths."""
    infos = st.lists(
        ram_block_infos(version, page_size=page_size, mr_addr=mr_addr),
        min_size=1,
        max_size=max_blocks,
        unique_by=lambda info: info.idstr,
    )
    blocks = draw(infos)
    return m.MemSize(sum(info.used_length for info in blocks), tuple(blocks))


def ram_pages(
    version: str | None = None, blocks: st.SearchStrategy[str | None] | None = None
) -> st.SearchStrategy[m.RamPage]:
    """ZERO (a fill byte) or PAGE records; a ``None`` block means CONTINUE."""
    block_names = blocks if blocks is not None else st.none() | names()
    zero = st.builds(
        m.RamPage,
        block=block_names,
        offset=page_offsets(version),
        zero=st.just(True),
        data=st.binary(min_size=1, max_size=1),
    )
    full = st.builds(
        m.RamPage,
        block=block_names,
        offset=page_offsets(version),
        zero=st.just(False),
        data=page_contents(version),
    )
    return zero | full


def ram_xbzrles(version: str | None = None, max_size: int = 64) -> st.SearchStrategy[Any]:
    return st.builds(
        m.RamXbzrle, st.none() | names(), page_offsets(version), st.binary(max_size=max_size)
    )


def ram_compresseds(version: str | None = None, max_size: int = 64) -> st.SearchStrategy[Any]:
    return st.builds(
        m.RamCompressed, st.none() | names(), page_offsets(version), st.binary(max_size=max_size)
    )


def ram_records(version: str | None = None) -> st.SearchStrategy[Any]:
    """Any single RAM record ``version`` knows, MEM_SIZE included."""
    flags = _profile(version).ram_flags
    options: list[st.SearchStrategy[Any]] = [
        ram_pages(version),
        ram_xbzrles(version),
        st.just(m.RamEos()),
        st.builds(m.RamHook, page_offsets(version)),
        mem_sizes(version),
    ]
    if "COMPRESS_PAGE" in flags:
        options.append(ram_compresseds(version))
    if "MULTIFD_FLUSH" in flags:
        options.append(st.just(m.RamMultifdFlush()))
    return st.one_of(options)


def build_ram_record(schema: Schema, record: Any) -> bytes:
    """The bytes of any value :func:`ram_records` draws."""
    if isinstance(record, m.MemSize):
        return schema.build_mem_size(record)
    if isinstance(record, m.RamPage):
        return schema.build_ram_page(record)
    if isinstance(record, m.RamXbzrle):
        return schema.build_ram_xbzrle(record)
    if isinstance(record, m.RamCompressed):
        return schema.build_ram_compressed(record)
    if isinstance(record, m.RamHook):
        return schema.build_ram_flag("HOOK", record.offset)
    return schema.build_ram_flag(record.NAME)


@st.composite
def encoded(
    draw: st.DrawFn, version: str | None = None, kind: str = "command"
) -> tuple[Any, bytes]:
    """A message and its bytes; ``kind`` is ``command``, ``return_path`` or ``ram``."""
    schema = _schema(version)
    if kind == "command":
        command = draw(commands(version))
        return command, schema.build_command(command)
    if kind == "return_path":
        message = draw(return_path_messages(version))
        return message, schema.build_rp(message)
    record = draw(ram_records(version))
    return record, build_ram_record(schema, record)
