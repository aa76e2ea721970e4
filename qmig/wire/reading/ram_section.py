"""The ``ram`` section: page records, the MEM_SIZE block list, and the flags between them.

A ``ram`` section carries no length: its records run until EOS. Runs of ZERO/PAGE records
of one block go through the C scanner (:mod:`qmig.wire.ramscan`): those that CONTINUE it, and
those that name it again (in postcopy the source names the block afresh after each page it
sends out of turn, and a run that stopped at each of them gave the destination two to three
times the runs to apply). A whole ZERO/PAGE record that names its block begins such a run
(:meth:`RamSectionReader._read_named_page`, the schema's layout, without construct); every
other record, and any of those cut short, is read by the schema. The
MEM_SIZE list's optional page-size field is decided by QEMU's rule where the reader knows the
destination's blocks, else read off the bytes.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable
from typing import Any

from qmig.errors import MalformedError, QmigError
from qmig.wire import messages as m
from qmig.wire.fields import NAME_ENCODING
from qmig.wire.profiles import Profile
from qmig.wire.ramscan import RamScanner, Stop
from qmig.wire.reading.framing import RAM_IDSTR, FramedInput
from qmig.wire.reading.records import NeedMore, Record
from qmig.wire.schema import mem_size_params

MAX_RAM_BLOCKS = 4096
# MEM_SIZE lists longer than this (QEMU sends a handful) are not searched for their layout:
# the search recurses once per entry.
MAX_INFERRED_BLOCKS = 256


class RamSectionReader(FramedInput):
    """The records of an open ``ram`` section (a part of :class:`StreamReader`)."""

    local_page_sizes: dict[str, int] | None
    host_page_size: int
    # False: the schema reads every record the C scanner does not (tests compare the two).
    named_fast_path = True
    # False: a record naming its block begins a run of its own, as before runs took them in
    # (bench/named_pages_bench.py compares the two).
    join_named_records = True
    _scanner: RamScanner
    # The profile's MEM_SIZE rules, chosen once by _mem_size_rules().
    _mr_addr_rule: Callable[[], bool]
    _page_size_rule: Callable[[bool, int], Callable[[int, Any], bool]]

    def _read_ram(self) -> Record:
        flags = self.profile.ram_flags
        offset = self.offset
        head = self.schema.ram_header_size
        if self._limit() - self._pos < head:
            if self._bounded_by_package():
                raise MalformedError("RAM", "runs past the end of the package", offset)
            raise NeedMore("RAM", offset)
        header = int.from_bytes(self._buf[self._pos : self._pos + head], "big")
        record_flags = header & self.schema.flag_mask
        kind = record_flags & ~flags["CONTINUE"]
        block = self.context.current_block
        if (
            record_flags & flags["CONTINUE"]
            and kind in (flags["ZERO"], flags["PAGE"])
            and block is not None
        ):
            return self._read_page_run(block)
        if (
            kind in (flags["ZERO"], flags["PAGE"])
            and not record_flags & flags["CONTINUE"]
            and self.named_fast_path
        ):
            named = self._read_named_page(header, kind)
            if named is not None:
                return named
        if kind == flags["MEM_SIZE"]:
            return self._read_mem_size(header)
        if kind == flags["EOS"] and not record_flags & flags["CONTINUE"]:
            self._after_section()
            return self._emit(m.RamEos(), head, RAM_IDSTR)
        if kind == flags.get("MULTIFD_FLUSH") and not record_flags & flags["CONTINUE"]:
            return self._emit(m.RamMultifdFlush(), head, RAM_IDSTR)
        if kind == flags["HOOK"]:
            return self._emit(m.RamHook(header & ~self.schema.flag_mask), head, RAM_IDSTR)
        if kind not in self.schema.ram_bodies:
            raise MalformedError(
                "RAM", f"unknown combination of migration flags {record_flags:#x}", offset
            )
        return self._read_one_ram_record()

    def _read_page_run(self, block: str) -> Record:
        info = self.context.ram_blocks.get(block)
        length = info.used_length if info else (1 << 64) - 1
        limit = self._limit()
        view = self._buf if limit == len(self._buf) else self._buf[:limit]
        # Records naming the run's own block join it (unless the schema is to read them).
        joining = self.named_fast_path and self.join_named_records
        name = block.encode(NAME_ENCODING) if joining else None
        result = self._scanner.scan(view, self._pos, self._base, length, name)
        if result.count == 0:
            offset = self.offset
            if result.stop is Stop.RANGE:
                self._raise_offset_range(block, offset)
            if result.stop is Stop.SHORT:
                if self._bounded_by_package():
                    raise MalformedError("RAM", "runs past the end of the package", offset)
                raise NeedMore("RAM", offset)
            return self._read_one_ram_record()
        run = m.RamPageRun(
            block=block,
            count=result.count,
            zero_count=result.zero_count,
            # Copies: the scanner reuses its arrays, and a run must stay valid on its own.
            headers=memoryview(result.headers.tobytes()).cast("Q"),
            bodies=memoryview(result.bodies.tobytes()).cast("Q"),
            data=self._buf,
            data_base=self._base,
            target_page_size=self.schema.target_page_size,
            page_flag=self.profile.ram_flags["PAGE"],
        )
        return self._emit(run, result.next_pos - self._pos, RAM_IDSTR)

    def _raise_offset_range(self, block: str, offset: int) -> None:
        header = int.from_bytes(
            self._buf[self._pos : self._pos + self.schema.ram_header_size], "big"
        )
        info = self.context.ram_blocks[block]
        raise MalformedError(
            "RAM",
            f"illegal RAM offset {header & ~self.schema.flag_mask:#x} in block {block!r} "
            f"(used length {info.used_length:#x})",
            offset,
        )

    def _read_named_page(self, header: int, kind: int) -> Record | None:
        """A ZERO/PAGE record that names its block, read as ``Schema.ram_record`` reads it
        (header, counted name, the kind's body), without construct, and the run it begins;
        None when it is not all in the buffer, for the schema to read (and to say where it
        runs short)."""
        head = self.schema.ram_header_size
        at = self._pos + head
        limit = self._limit()
        if at >= limit:
            return None
        name_end = at + 1 + self._buf[at]
        size = name_end - self._pos + self.schema.ram_body_sizes[kind]
        if self._pos + size > limit:
            return None
        block = self._named_block(bytes(self._buf[at + 1 : name_end]).decode(NAME_ENCODING))
        self._check_offset(block, header & ~self.schema.flag_mask)
        if self.join_named_records and self._joins(self._pos + size, self._buf[at:name_end]):
            # Complete and in its block, and the next record may join it: a run begins.
            return self._read_page_run(block)
        return self._emit(self._single_run(block, header, kind, size), size, RAM_IDSTR)

    def _joins(self, at: int, counted_name: Any) -> bool:
        """Whether the record at ``at`` may join a run of the block ``counted_name`` names (a
        ZERO/PAGE record that CONTINUEs, or names that block again), as far as the buffer
        holds it: a record beginning a run of one is read without the scanner."""
        head = self.schema.ram_header_size
        if self._limit() - at < head:
            return False
        flags = int.from_bytes(self._buf[at : at + head], "big") & self.schema.flag_mask
        ram_flags = self.profile.ram_flags
        if flags & ~ram_flags["CONTINUE"] not in (ram_flags["ZERO"], ram_flags["PAGE"]):
            return False
        if flags & ram_flags["CONTINUE"]:
            return True
        return self._buf[at + head : at + head + len(counted_name)] == counted_name

    def _read_one_ram_record(self) -> Record:
        """A record neither fast path takes: XBZRLE/COMPRESS, a ZERO/PAGE record cut short
        (the schema says where), or one of a kind the scanner leaves (CONTINUE with no block
        named before)."""
        flags = self.profile.ram_flags
        offset = self.offset
        record, size = self._parse("RAM", self.schema.ram_record)
        if record.block is None:
            if self.context.current_block is None:
                raise MalformedError("RAM", "CONTINUE with no previous block", offset)
            block = self.context.current_block
        else:
            block = self._named_block(record.block)
        self._check_offset(block, record.offset)
        name = None if record.flags & flags["CONTINUE"] else block
        if record.kind in (flags["ZERO"], flags["PAGE"]):
            return self._emit(
                self._single_run(block, record.header, record.kind, size), size, RAM_IDSTR
            )
        if record.kind == flags["XBZRLE"]:
            return self._emit(m.RamXbzrle(name, record.offset, record.body.data), size, RAM_IDSTR)
        return self._emit(m.RamCompressed(name, record.offset, record.body.data), size, RAM_IDSTR)

    def _named_block(self, block: str) -> str:
        """A block a record names: known (when the blocks are), and the one CONTINUE means."""
        if self.context.ram_blocks and block not in self.context.ram_blocks:
            raise MalformedError(
                "RAM", f"can't find block {block!r}", self.offset + self.schema.ram_header_size
            )
        self.context.current_block = block
        return block

    def _check_offset(self, block: str, offset: int) -> None:
        info = self.context.ram_blocks.get(block)
        if info is not None and offset >= info.used_length:
            self._raise_offset_range(block, self.offset)

    def _single_run(self, block: str, header: int, kind: int, size: int) -> m.RamPageRun:
        """A run of one record, in the scanner's shape."""
        zero = kind == self.profile.ram_flags["ZERO"]
        body_size = self.schema.ram_body_sizes[kind]
        body_at = self.offset + size - body_size
        return m.RamPageRun(
            block=block,
            count=1,
            zero_count=int(zero),
            headers=memoryview(array("Q", [header])),
            bodies=memoryview(array("Q", [body_at])),
            data=self._buf,
            data_base=self._base,
            target_page_size=self.schema.target_page_size,
            page_flag=self.profile.ram_flags["PAGE"],
        )

    def _read_mem_size(self, header: int) -> Record:
        offset = self.offset
        total = header & ~self.schema.flag_mask
        pos = self.schema.ram_header_size
        blocks: list[m.RamBlockInfo] = []
        remaining = total
        mr_addr = self._mr_addr_rule()
        page_sizes = self._page_size_rule(mr_addr, total)
        while remaining > 0:
            if len(blocks) >= MAX_RAM_BLOCKS:
                raise MalformedError("MEM_SIZE", f"more than {MAX_RAM_BLOCKS} RAMBlocks", offset)
            self._pos += pos
            try:
                entry = len(blocks)
                rules = mem_size_params(lambda ctx, i=entry: page_sizes(i, ctx), mr_addr)
                info, used = self._parse("MEM_SIZE", self.schema.mem_size_block, rules=rules)
            finally:
                self._pos -= pos
            if info.used_length > remaining:
                raise MalformedError(
                    "MEM_SIZE",
                    f"block {info.idstr!r} length {info.used_length:#x} exceeds the "
                    f"remaining total {remaining:#x}",
                    offset + pos,
                )
            remaining -= info.used_length
            blocks.append(info)
            pos += used
        for info in blocks:
            self.context.ram_blocks[info.idstr] = info
        return self._emit(m.MemSize(total, tuple(blocks)), pos, RAM_IDSTR)

    def _mem_size_rules(self) -> None:
        """Take the profile's MEM_SIZE rules (every value it may hold has a case here)."""
        match self.profile.mem_size_mr_addr:
            case "x-ignore-shared":
                self._mr_addr_rule = self._mr_addr_with_ignore_shared
            case "never":
                self._mr_addr_rule = lambda: False
            case rule:
                raise _unknown_rule(self.profile, "mem_size_mr_addr", rule)
        match self.profile.mem_size_page_size:
            case "postcopy-advised-and-differs":
                self._page_size_rule = self._page_size_if_advised_and_differs
            case page_size_rule:
                raise _unknown_rule(self.profile, "mem_size_page_size", page_size_rule)

    def _mr_addr_with_ignore_shared(self) -> bool:
        # QEMU's rule on both sides: the region address follows each entry exactly when
        # x-ignore-shared is on, which the CONFIGURATION's capabilities subsection says.
        return "x-ignore-shared" in self.context.capabilities

    def _page_size_if_advised_and_differs(
        self, mr_addr: bool, total: int
    ) -> Callable[[int, Any], bool]:
        """Whether MEM_SIZE entry ``i`` carries a page size: QEMU's rule, or read off the bytes.

        The source writes it when RAM postcopy is on and the block's page size differs from
        the host's; the destination reads it when postcopy was advised and its own block's
        page size differs from the host's. A reader given its blocks (``local_page_sizes``)
        decides as QEMU's destination does. Without them, the one layout of the whole list
        that the bytes admit is found by :meth:`_infer_page_sizes`.
        """
        advise = self.context.advise
        if advise is None or not advise.ram_postcopy:
            return lambda i, ctx: False
        local = self.local_page_sizes
        if local is not None:
            host = self.host_page_size
            return lambda i, ctx: local.get(ctx.idstr, host) != host
        summary = advise.page_size_summary or 0
        if summary == self.host_page_size:
            return lambda i, ctx: False  # the summary ORs every block's size: all are host's
        layout = self._infer_page_sizes(mr_addr, total, summary)
        return lambda i, ctx: i < len(layout) and layout[i]

    def _infer_page_sizes(self, mr_addr: bool, total: int, summary: int) -> tuple[bool, ...]:
        """Which MEM_SIZE entries carry a page size, found by walking the list's bytes.

        An entry is ``cstr8 idstr, be64 used_length, [be64 page_size], [be64 mr_addr]``. A
        page size is a power of two other than the host's that the ADVISE summary announced;
        but a region address may look like one. So both layouts of each entry are tried, and
        one is kept only if the rest of the list then reads: every name non-empty, the lengths
        summing exactly to ``total``, and a RAM record header (EOS in practice) after the
        last entry. A layout that puts the 8 bytes in the wrong place meets a zero name
        length or a flag-less header almost at once. When no layout fits, the plausible-size
        guess stands and the schema reports what is wrong.
        """
        head, word = self.schema.ram_header_size, self.schema.mem_size_field_size
        name_length = self.schema.name_length_size
        buf, start = self._buf, self._pos + head
        limit = self._limit()
        flag_mask, known = self.schema.flag_mask, self.profile.known_ram_flags
        host = self.host_page_size
        extra = word if mr_addr else 0

        def available(end: int) -> bool:
            if end <= limit:
                return True
            if end > len(buf) and not self._eof and not self._bounded_by_package():
                raise NeedMore("MEM_SIZE", self.offset)
            return False

        def field(at: int) -> int:
            return int.from_bytes(buf[at : at + word], "big")

        def plausible(at: int) -> bool:
            size = field(at)
            return size != host and size & (size - 1) == 0 and bool(size & summary)

        def follows(at: int) -> bool:
            """A RAM record header can start at ``at``: offset bits clear, known flags."""
            if not available(at + head):
                return False
            flags = int.from_bytes(buf[at : at + head], "big")
            return flags == flags & flag_mask and flags != 0 and not flags & ~known

        failed: set[tuple[int, int]] = set()

        def walk(at: int, remaining: int, depth: int = 0) -> tuple[bool, ...] | None:
            if remaining == 0:
                return () if follows(at) else None
            if (at, remaining) in failed or depth >= MAX_INFERRED_BLOCKS:
                return None
            if not available(at + name_length) or buf[at] == 0:
                return None
            after_length = at + name_length + buf[at] + word
            if not available(after_length + extra) or field(after_length - word) > remaining:
                return None
            left = remaining - field(after_length - word)
            if available(after_length + word + extra) and plausible(after_length):
                rest = walk(after_length + word + extra, left, depth + 1)
                if rest is not None:
                    return (True, *rest)
            rest = walk(after_length + extra, left, depth + 1)
            if rest is not None:
                return (False, *rest)
            failed.add((at, remaining))
            return None

        layout = walk(start, total)
        if layout is not None:
            return layout
        return self._guess_page_sizes(start, total, extra, plausible)

    def _guess_page_sizes(
        self, start: int, total: int, extra: int, plausible: Callable[[int], bool]
    ) -> tuple[bool, ...]:
        """A list no layout fits: take every plausible size, so that the schema's parse goes
        as far as the bytes allow and reports the first field that is wrong.

        The guess stops at the first empty name, which the schema then reports: a name
        length of zero is wrong whatever the layout, and what follows it is not a list. Bytes
        it needs and lacks are waited for (at EOF: a truncated list); past a package's end it
        stops and the schema's parse says the list runs past the package. So the guess is the
        same however the stream was chunked.
        """
        buf, limit = self._buf, self._limit()
        word, name_length = self.schema.mem_size_field_size, self.schema.name_length_size
        layout: list[bool] = []
        at, remaining = start, total
        while remaining > 0 and len(layout) < MAX_RAM_BLOCKS:
            if at + name_length > limit or buf[at] == 0:
                if at + name_length > limit:
                    self._need_list_bytes()
                break  # no more bytes, or an empty name: the schema's parse says which
            after_length = at + name_length + buf[at] + word
            if after_length + word > limit:
                self._need_list_bytes()
                break
            present = plausible(after_length)
            layout.append(present)
            used_length = int.from_bytes(buf[after_length - word : after_length], "big")
            remaining -= min(remaining, used_length)
            at = after_length + extra + (word if present else 0)
        return tuple(layout)

    def _need_list_bytes(self) -> None:
        """Wait for more of the MEM_SIZE list (at EOF: truncated), unless a package ends it."""
        if not self._bounded_by_package():
            raise NeedMore("MEM_SIZE", self.offset)


def _unknown_rule(profile: Profile, name: str, rule: object) -> QmigError:
    return QmigError("profile", f"QEMU {profile.name}: unknown {name} rule {rule!r}")
