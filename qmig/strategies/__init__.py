"""Hypothesis strategies for QEMU's migration wire: messages, whole streams, broken streams.

These are the generators qmig's own property tests use; fuzz your code with them too. Every
strategy that depends on the wire format takes a QEMU ``version`` (a profile in
``formats/``: ``"2.9"``, ``"7.2"``, ``"10.0"``) and generates only what that version knows.

**Messages.** One small strategy per message, each producing a value of
:mod:`qmig.wire.messages` that the version's :class:`~qmig.wire.schema.Schema` can build:
:func:`pings`, :func:`postcopy_advises`, :func:`postcopy_ram_discards`, ... (every
QEMU_VM_COMMAND), :func:`pongs`, :func:`req_pages_ids`, ... (every return-path message),
:func:`ram_pages`, :func:`mem_sizes`, :func:`ram_block_infos`, ... (RAM records),
:func:`section_headers`, :func:`configurations`. :func:`commands`,
:func:`return_path_messages` and :func:`ram_records` pick any of them; :func:`encoded`
pairs a message with its bytes::

    from hypothesis import given
    from qmig import strategies as qs
    from qmig.wire.schema import schema_for

    @given(qs.commands("7.2"))
    def test_command_round_trip(command):
        schema = schema_for("7.2")
        data = schema.build_command(command)
        payload = schema.command_payloads[command.NAME]
        head = schema.command_header_size
        assert payload.parse(data[head:], len=len(data) - head) == command

**Whole streams.** :func:`postcopy_streams` composes them into the stream a QEMU source
sends for a postcopy migration (header, CONFIGURATION, OPEN_RETURN_PATH, PING, ADVISE, the
``ram`` SECTION_START with its MEM_SIZE list, precopy PARTs with pages, discards, PING,
PACKAGED(LISTEN, device SECTION_FULLs with footers, PING, RUN), PING, postcopy PARTs, END,
EOF), with consistent section ids and RAMBlocks. It returns a :class:`GeneratedStream`: the
bytes plus the facts a reader must find in them::

    from qmig.wire.reader import StreamReader

    @given(qs.postcopy_streams("7.2"))
    def test_reader_finds_every_page(stream):
        reader = StreamReader(stream.version)
        reader.feed(stream.data)
        reader.feed_eof()
        runs = [r.message for r in reader if r.message.NAME == "RAM"]
        assert sum(run.count for run in runs) == len(stream.pages)

**Broken streams.** The ``invalid_*`` strategies each produce an :class:`InvalidStream`:
the bytes (``.data``) of an otherwise valid stream (or return path, see ``.channel``) with
one targeted defect, the WHAT that the error must name and the byte range of the faulty
record::

    import pytest
    from qmig.errors import MalformedError

    @given(qs.invalid_unknown_commands("2.9"))
    def test_unknown_commands_are_refused(bad):
        reader = StreamReader("2.9")
        reader.feed(bad.data)
        reader.feed_eof()
        with pytest.raises(MalformedError) as caught:
            list(reader)
        assert caught.value.what == bad.what
        assert bad.start <= caught.value.offset < bad.end

Use ``.map(lambda bad: bad.data)`` where only the bytes are wanted. The readers
(:class:`~qmig.wire.reader.StreamReader`, :class:`~qmig.wire.reader.ReturnPathReader`)
refuse every variant whose defect is in the bytes alone (a REQ_PAGES with no REQ_PAGES_ID
before it included); discard ranges outside or unaligned to their block and empty requested
block names are well-formed bytes that :mod:`qmig.protocol`'s ``Destination`` and ``Source``
refuse, since only they know the blocks.

**Multifd and mapped-ram.** :func:`multifd_inits`, :func:`multifd_packets` (a
:class:`MultifdWire`: header, offsets, pages and bytes), :func:`multifd_channels` (a
handshake and packets), :func:`mapped_ram_headers` and :func:`mapped_ram_files` cover
the formats of the other channels and of mapped-ram files (``"7.2"`` and ``"10.0"``;
mapped-ram is 10.0 only); :func:`invalid_multifd_channels` spoils one field of a channel
(an :class:`InvalidMultifd`).

**Command orders.** :func:`command_orders` gives well-formed postcopy commands, page
records and EOF in any order behind a valid opening (a :class:`CommandOrder`): what a
destination refuses there is the order alone, to check against QEMU's PostcopyState rules.

Sizes are kept small (a few RAMBlocks of up to 64 target pages, a handful of pages per
section) so that a property runs in milliseconds; the keyword arguments raise them.
"""

from __future__ import annotations

from qmig.strategies.basics import (
    HUGE_PAGE,
    LARGE_PAGE,
    MAX_NAME,
    NAME_ALPHABET,
    U16_MAX,
    U32_MAX,
    U64_MAX,
    names,
    page_contents,
    page_offsets,
    uints,
)
from qmig.strategies.commands import (
    COMMAND_STRATEGIES,
    commands,
    discard_ranges,
    enable_colos,
    open_return_paths,
    packageds,
    pings,
    postcopy_advises,
    postcopy_listens,
    postcopy_ram_discards,
    postcopy_resumes,
    postcopy_runs,
    recv_bitmaps,
    switchover_starts,
)
from qmig.strategies.framing import (
    configurations,
    machine_types,
    section_ends,
    section_footers,
    section_fulls,
    section_headers,
    section_parts,
    section_starts,
    stream_headers,
    vm_descriptions,
)
from qmig.strategies.invalid import (
    EMPTY_NAME_RECORDS,
    INVALID_STRATEGIES,
    Channel,
    InvalidStream,
    invalid_command_lengths,
    invalid_discard_ranges,
    invalid_empty_names,
    invalid_empty_rp_names,
    invalid_orphan_req_pages,
    invalid_overlong_names,
    invalid_rp_lengths,
    invalid_streams,
    invalid_unaligned_discards,
    invalid_unknown_commands,
    invalid_unknown_rp_messages,
    invalid_wrapping_discards,
    unknown_command_numbers,
)
from qmig.strategies.multifd import (
    InvalidMultifd,
    MappedRamFileBytes,
    MultifdChannel,
    MultifdWire,
    invalid_multifd_channels,
    mapped_ram_files,
    mapped_ram_headers,
    multifd_channels,
    multifd_inits,
    multifd_packets,
)
from qmig.strategies.orders import (
    ORDER_STEPS,
    CommandOrder,
    command_orders,
)
from qmig.strategies.ram import (
    build_ram_record,
    encoded,
    mem_sizes,
    ram_block_infos,
    ram_compresseds,
    ram_pages,
    ram_records,
    ram_xbzrles,
)
from qmig.strategies.return_path import (
    RETURN_PATH_STRATEGIES,
    pongs,
    req_pages,
    req_pages_ids,
    resume_acks,
    return_path_messages,
    rp_recv_bitmaps,
    shuts,
    switchover_acks,
)
from qmig.strategies.streams import (
    ExpectedPage,
    ExpectedRecord,
    GeneratedStream,
    postcopy_streams,
)

__all__ = [
    "COMMAND_STRATEGIES",
    "EMPTY_NAME_RECORDS",
    "HUGE_PAGE",
    "INVALID_STRATEGIES",
    "LARGE_PAGE",
    "MAX_NAME",
    "NAME_ALPHABET",
    "ORDER_STEPS",
    "RETURN_PATH_STRATEGIES",
    "U16_MAX",
    "U32_MAX",
    "U64_MAX",
    "Channel",
    "CommandOrder",
    "ExpectedPage",
    "ExpectedRecord",
    "GeneratedStream",
    "InvalidMultifd",
    "InvalidStream",
    "MappedRamFileBytes",
    "MultifdChannel",
    "MultifdWire",
    "build_ram_record",
    "command_orders",
    "commands",
    "configurations",
    "discard_ranges",
    "enable_colos",
    "encoded",
    "invalid_command_lengths",
    "invalid_discard_ranges",
    "invalid_empty_names",
    "invalid_empty_rp_names",
    "invalid_multifd_channels",
    "invalid_orphan_req_pages",
    "invalid_overlong_names",
    "invalid_rp_lengths",
    "invalid_streams",
    "invalid_unaligned_discards",
    "invalid_unknown_commands",
    "invalid_unknown_rp_messages",
    "invalid_wrapping_discards",
    "machine_types",
    "mapped_ram_files",
    "mapped_ram_headers",
    "mem_sizes",
    "multifd_channels",
    "multifd_inits",
    "multifd_packets",
    "names",
    "open_return_paths",
    "packageds",
    "page_contents",
    "page_offsets",
    "pings",
    "pongs",
    "postcopy_advises",
    "postcopy_listens",
    "postcopy_ram_discards",
    "postcopy_resumes",
    "postcopy_runs",
    "postcopy_streams",
    "ram_block_infos",
    "ram_compresseds",
    "ram_pages",
    "ram_records",
    "ram_xbzrles",
    "recv_bitmaps",
    "req_pages",
    "req_pages_ids",
    "resume_acks",
    "return_path_messages",
    "rp_recv_bitmaps",
    "section_ends",
    "section_footers",
    "section_fulls",
    "section_headers",
    "section_parts",
    "section_starts",
    "shuts",
    "stream_headers",
    "switchover_acks",
    "switchover_starts",
    "uints",
    "unknown_command_numbers",
    "vm_descriptions",
]
