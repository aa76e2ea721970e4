"""The source's packed POSTCOPY_RAM_DISCARD commands equal the schema's, byte for byte."""

from __future__ import annotations

import random

import pytest

from qmig.protocol.source import Source, SourceBlock
from qmig.wire import messages as m
from qmig.wire.profiles import available_versions
from qmig.wire.schema import schema_for

PAGE = 4096


def expected_discards(version: str, idstr: str, dirty: bytearray, used: int) -> bytes:
    """The commands built one by one from the schema, the slow way the definition reads."""
    schema = schema_for(version)
    ranges = []
    at = 0
    while at < len(dirty):
        if not dirty[at]:
            at += 1
            continue
        end = at
        while end < len(dirty) and dirty[end]:
            end += 1
        ranges.append(m.DiscardRange(at * PAGE, min(end * PAGE, used) - at * PAGE))
        at = end
    limit = schema.profile.max_discard_ranges
    return b"".join(
        schema.build_command(m.PostcopyRamDiscard(idstr, tuple(ranges[i : i + limit])))
        for i in range(0, len(ranges), limit)
    )


@pytest.mark.parametrize("version", available_versions())
@pytest.mark.parametrize("seed", range(4))
def test_discards_match_the_schema(version: str, seed: int) -> None:
    rng = random.Random(seed)
    pages = rng.randrange(1, 400)
    used = pages * PAGE - rng.choice([0, 0, 100])  # a block may end inside its last page
    idstr = "x" * rng.randrange(1, 60)
    block = SourceBlock(idstr, used, bytearray(pages * PAGE))
    source = Source([block], version=version)
    source.start()
    source.data_to_send(0)  # the opening; nothing sent yet, so every page is still dirty
    density = rng.random()
    block.dirty[:] = bytes(1 if rng.random() < density else 0 for _ in range(pages))
    dirty = bytearray(block.dirty)
    source.start_postcopy()
    out = source.data_to_send(0)
    want = expected_discards(version, idstr, dirty, used)
    assert out[: len(want)] == want
    limit = schema_for(version).profile.max_discard_ranges
    assert source.stats.discard_commands == -(-len(_runs(dirty)) // limit)
    assert source.stats.discarded_pages == sum(dirty)


def _runs(dirty: bytearray) -> list[int]:
    return [i for i in range(len(dirty)) if dirty[i] and (i == 0 or not dirty[i - 1])]


@pytest.mark.parametrize("version", available_versions())
@pytest.mark.parametrize("runs", [1, 11, 12, 13, 24, 25])
def test_discards_match_the_schema_at_each_command_boundary(version: str, runs: int) -> None:
    """Exactly as many runs as fill whole commands, one more, one fewer."""
    limit = schema_for(version).profile.max_discard_ranges
    runs = runs * limit // 12  # the same boundaries whatever the profile's limit
    pages = 2 * runs + 1
    block = SourceBlock("pc.ram", pages * PAGE, bytearray(pages * PAGE))
    source = Source([block], version=version)
    source.start()
    source.data_to_send(0)
    block.dirty[:] = bytes(k % 2 for k in range(pages))  # every other page: one run each
    dirty = bytearray(block.dirty)
    source.start_postcopy()
    out = source.data_to_send(0)
    want = expected_discards(version, "pc.ram", dirty, pages * PAGE)
    assert out[: len(want)] == want
    assert source.stats.discard_commands == -(-runs // limit)
