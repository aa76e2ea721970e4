"""Where fuzzing starts: real QEMU captures made small, and qmig's own strategies.

A real capture holds tens of megabytes of page data that every mutation would mostly hit.
:func:`compact_capture` keeps every record that is not a page (header, CONFIGURATION, every
command, section headers and footers, device state, PACKAGED with its blob, EOF,
VMDESCRIPTION) and only the first page record of the first few page runs: a few kilobytes
of the same grammar, byte for byte as QEMU sent it.
"""

from __future__ import annotations

import lzma
import random
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from qmig.errors import QmigError
from qmig.wire import messages as m
from qmig.wire.reader import Record, StreamReader
from qmig.wire.schema import schema_for

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
PAGE_RUNS_KEPT = 3
STRATEGY_SEEDS = 24


def compact_capture(stream: bytes, version: str | None = "7.2") -> bytes:
    """``stream`` without most of its pages (see the module doc); still a valid stream."""
    reader = StreamReader(version)
    reader.feed(stream)
    reader.feed_eof()
    out = bytearray()
    runs = 0
    for record in reader:
        assert isinstance(record, Record)
        message = record.message
        if isinstance(message, m.RamPageRun):
            if runs >= PAGE_RUNS_KEPT:
                continue
            runs += 1
            first_body = message.bodies[0]
            body = message.target_page_size if message.headers[0] & message.page_flag else 1
            out += stream[record.offset : first_body + body]
            continue
        out += stream[record.offset : record.offset + record.size]
    return bytes(out)


def capture_seeds(version: str | None = "7.2") -> list[tuple[str, bytes, bytes | None]]:
    """(name, compact stream, return path) of each real capture in ``fixtures/``."""
    seeds: list[tuple[str, bytes, bytes | None]] = []
    if not FIXTURES.is_dir():
        return seeds
    for folder in sorted(FIXTURES.iterdir()):
        stream_file = folder / "stream.bin.xz"
        if not stream_file.is_file():
            continue
        try:
            stream = compact_capture(lzma.decompress(stream_file.read_bytes()), version)
        except (QmigError, lzma.LZMAError, OSError):
            continue  # a capture this version cannot read is no seed for it
        rp_file = folder / "return-path.bin.xz"
        rp = lzma.decompress(rp_file.read_bytes()) if rp_file.is_file() else None
        seeds.append((folder.name, stream, rp))
    return seeds


def _draw(strategy: Any, rng: random.Random, count: int) -> list[Any]:
    """``count`` examples of a hypothesis strategy, reproducibly from ``rng`` when possible."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    found: list[Any] = []

    @settings(
        max_examples=count,
        database=None,
        deadline=None,
        derandomize=False,
        suppress_health_check=list(HealthCheck),
    )
    @given(st.data())
    def collect(data: Any) -> None:
        found.append(data.draw(strategy))

    # hypothesis seeds from the random module: make it follow --seed.
    from hypothesis import seed as hypothesis_seed

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hypothesis_seed(rng.getrandbits(32))(collect)()
    return found[:count]


def strategy_seeds(
    channel: str, version: str | None, rng: random.Random, count: int = STRATEGY_SEEDS
) -> list[bytes]:
    """Inputs drawn from :mod:`qmig.strategies`: valid streams and the invalid variants."""
    from hypothesis import strategies as st

    from qmig import strategies as qs

    name = version or "10.0"
    schema = schema_for(version)
    if channel == "return_path":
        messages = st.lists(qs.return_path_messages(name), min_size=1, max_size=8)
        valid = [b"".join(schema.build_rp(x) for x in batch) for batch in
                 _draw(messages, rng, count // 2)]  # fmt: skip
        invalid = [
            bad.data
            for bad in _draw(qs.invalid_streams(name), rng, count)
            if bad.channel == "return_path"
        ]
        return valid + invalid
    small = qs.postcopy_streams(name, max_pages_per_section=2, max_blocks=2)
    valid = [stream.data for stream in _draw(small, rng, count // 2)]
    invalid = [
        bad.data for bad in _draw(qs.invalid_streams(name), rng, count) if bad.channel == "stream"
    ]
    return valid + invalid


def dictionary(channel: str, version: str | None) -> list[bytes]:
    """Whole records to splice into inputs: every command, every return-path message."""
    schema = schema_for(version)
    page = schema.target_page_size
    if channel == "return_path":
        messages: Iterable[Any] = (
            m.Pong(1),
            m.Shut(0),
            m.Shut(1),
            m.ReqPagesId(0, page, "pc.ram"),
            m.ReqPagesId(0, 0, ""),
            m.ReqPages(page, page),
            m.ReqPages((1 << 64) - page, page),
        )
        return [schema.build_rp(message) for message in messages]
    commands: list[Any] = [
        m.OpenReturnPath(),
        m.Ping(1),
        m.PostcopyAdvise(page, page),
        m.PostcopyAdvise(),
        m.PostcopyListen(),
        m.PostcopyRun(),
        m.PostcopyRamDiscard("pc.ram", (m.DiscardRange(0, page),)),
        m.PostcopyRamDiscard("pc.ram", (m.DiscardRange((1 << 64) - page, 2 * page),)),
        m.Packaged(0),
        m.Packaged(0xFFFFFFFF),
    ]
    known = schema.profile.commands
    out = [schema.build_command(c) for c in commands if c.NAME in known]
    out += [
        schema.build_section(m.SectionPart(2)),
        schema.build_section(m.SectionEnd(2)),
        schema.build_section(m.SectionFull(9, "timer", 0, 2)),
        schema.build_footer(2),
        schema.build_ram_flag("EOS"),
        schema.build_ram_page(m.RamPage("pc.ram", 0, True, b"\x00")),
        schema.build_ram_page(m.RamPage(None, page, True, b"\x01")),
        schema.build_ram_page(m.RamPage("pc.ram", (1 << 40) * page, True, b"\x00")),
        b"\x00",
    ]
    return out
