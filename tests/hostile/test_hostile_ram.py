"""MEM_SIZE claims: a few bytes that claim terabytes cost address space, not memory.

Every per-page structure (the machine's page states, received and touched bitmaps, placement
times, inspect's page kinds) is sized by the claim, and all of them are mapped lazily
(``qmig.sparse``): resident memory follows the pages that arrived.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hostile_run import inspect, machine, receive, sender
from hostile_streams import GIB, PAGE, S, many_blocks, opening, pages_section

from qmig.sparse import ZeroedBuffer, zeroed
from qmig.wire import messages as m

pytestmark = [pytest.mark.uffd, pytest.mark.timeout(120)]

TIB = 1 << 40
ONE_TIB_BLOCK = (m.RamBlockInfo("pc.ram", TIB),)
# Pages at the start, the middle and the end of the 1 TiB block.
SPREAD = pages_section("pc.ram", [0, TIB // 2, TIB - PAGE])
EOF = bytes(S.eof.build(m.Eof()))


# --max-ram (default: the host's memory) would refuse these claims before anything is mapped
# (test_claims_past_max_ram_are_refused_before_mapping); lifted, the claims are mapped and
# must still cost nothing until pages arrive.
NO_LIMIT = ("--max-ram", "16T")


def test_claims_past_max_ram_are_refused_before_mapping() -> None:
    outcome = receive(sender(many_blocks(1000, 4 * GIB)))
    match = outcome.check_error("RAM", "MEM_SIZE claims 0x3e800000000 bytes of RAM, more than")
    assert match["offset"] is not None
    outcome.check_bounded()


def test_thousand_4_gib_blocks_cost_no_memory() -> None:
    outcome = receive(sender(many_blocks(1000, 4 * GIB)), *NO_LIMIT)
    outcome.check_error("stream", "unexpected end of stream during precopy")
    outcome.check_bounded()


def test_4096_1_gib_blocks_cost_no_memory() -> None:
    outcome = receive(sender(many_blocks(4096, GIB)), *NO_LIMIT)
    outcome.check_error("stream", "unexpected end of stream during precopy")
    outcome.check_bounded()


def test_listen_registers_4_tib_of_claimed_blocks_without_memory() -> None:
    """At LISTEN every block is swept, registered with userfaultfd and given its per-page
    placement times: all sized by the claim, none of it resident."""
    advise = S.build_command(m.PostcopyAdvise(PAGE, PAGE))
    # LISTEN and RUN in one package, as QEMU sends them (a package ends its load at RUN).
    package = S.build_packaged(
        S.build_command(m.PostcopyListen()) + S.build_command(m.PostcopyRun())
    )
    stream = many_blocks(1000, 4 * GIB) + advise + package
    # The source then vanishes: with recovery off, that is the end.
    outcome = receive(sender(stream, hold=0.5), *NO_LIMIT, "--recover-timeout", "0")
    outcome.check_error("stream", "unexpected end of stream during RUNNING")
    outcome.check_bounded()


def test_one_tib_block_is_mapped_and_pages_land_anywhere_in_it() -> None:
    outcome = receive(sender(opening(ONE_TIB_BLOCK) + SPREAD), *NO_LIMIT)
    match = outcome.check_error("stream", "unexpected end of stream during precopy")
    assert int(match["offset"]) == len(opening(ONE_TIB_BLOCK) + SPREAD)
    outcome.check_bounded()


def test_inspect_of_a_tib_claim_counts_pages_without_sizing_by_it(tmp_path: Path) -> None:
    path = tmp_path / "claim.mig"
    path.write_bytes(opening(ONE_TIB_BLOCK) + SPREAD)
    outcome = inspect(path, "--json")
    outcome.check_error("stream", "unexpected end of stream")
    outcome.check_bounded()


def test_a_claim_beyond_the_address_space_is_one_line() -> None:
    outcome = receive(
        sender(opening((m.RamBlockInfo("pc.ram", 1 << 60),))), "--max-ram", str(1 << 62)
    )
    outcome.check_error("RAM", r"block 'pc.ram' of 0x1000000000000000 bytes is more than this host")
    outcome.check_bounded()


def test_inspect_counts_a_64_tib_claim_in_moments(tmp_path: Path) -> None:
    """A byte per page of 64 TiB is 16 GiB of page kinds: only the pages written are read."""
    path = tmp_path / "claim.mig"
    path.write_bytes(opening((m.RamBlockInfo("pc.ram", 64 * TIB),)) + SPREAD + EOF)
    outcome = inspect(path, "--json")
    assert outcome.status == 0, outcome.stderr
    figures = json.loads(outcome.stdout)["ram_blocks"]["pc.ram"]
    assert figures["distinct_pages"] == 3 and figures["used_length"] == 64 * TIB
    outcome.check_bounded()


def test_the_machine_tracks_a_tib_claim_by_the_pages_that_came(tmp_path: Path) -> None:
    path = tmp_path / "claim.mig"
    path.write_bytes(many_blocks(4096, GIB) + pages_section("ram7", [0, GIB - PAGE]))
    outcome = machine(path)
    outcome.check_error("stream", "unexpected end of stream")
    outcome.check_bounded()


def test_zeroed_buffers_behave_like_bytearrays() -> None:
    small, large = zeroed(100), zeroed(1 << 30)
    assert isinstance(small, bytearray) and isinstance(large, ZeroedBuffer)
    for buffer in (small, large):
        assert buffer.find(1) == -1 and buffer.find(0, 5, 10) == 5
        assert buffer.count(0) == len(buffer)
        buffer[77] = 2
        assert buffer.find(2) == 77 and buffer.count(2) == 1 and buffer[77] == 2
        assert buffer.count(0) == len(buffer) - 1
