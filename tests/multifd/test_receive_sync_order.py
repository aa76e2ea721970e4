"""The newest version of every page wins, whatever channel each version took.

Each case is a random migration of several rounds, written here byte by byte: in a round a
page goes at most once (as a QEMU source sends it), on a random multifd channel or as a zero
page (a ZERO record on the main channel in 7.2; listed in a packet in 10.0). The main stream
syncs at each round's end as the version does (7.2: EOS; 10.0 on pc-i440fx-10.0:
MULTIFD_FLUSH), and every channel's bytes are there at once: only the sync decides. The
dumped RAM must hold each page's last version.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from test_receive_multifd import BLOCK, PAGE, SYNC, main_stream, migrate, outcome, receive

from qmig.wire import messages as m
from qmig.wire.multifd import MultifdInit, MultifdPacketHeader, multifd_schema
from qmig.wire.schema import schema_for

PAGES = BLOCK.used_length // PAGE  # a 1 MiB block
CHANNELS = 3
ROUNDS = 4
MACHINE = {"7.2": "pc-i440fx-7.2", "10.0": "pc-i440fx-10.0"}

Version = dict[int, bytes]  # page -> its content (zero pages: zero bytes)


def packets(version: str, normal: Version, zero: list[int], number: int) -> bytes:
    """A round's pages on one channel, up to 128 a packet, then its SYNC packet."""
    schema = multifd_schema(version)
    out = []
    entries = [(page, data) for page, data in normal.items()] + [(page, None) for page in zero]
    for start in range(0, len(entries), 128):
        chunk = entries[start : start + 128]
        pages = [(page, data) for page, data in chunk if data is not None]
        zeros = [page for page, data in chunk if data is None]
        header = MultifdPacketHeader(0, 128, len(pages), 0, number, len(zeros), "pc.ram")
        offsets = [page * PAGE for page, _ in pages] + [page * PAGE for page in zeros]
        out.append(schema.build_packet(header, offsets, PAGE) + b"".join(d for _, d in pages))
        number += 1
    header = MultifdPacketHeader(SYNC, 128, 0, 0, number, 0, "pc.ram")
    out.append(schema.build_packet(header, [], PAGE))
    return b"".join(out)


def random_migration(version: str, seed: int) -> tuple[bytes, list[bytes], bytes]:
    rng = random.Random(seed)
    schema = schema_for(version)
    ram = [bytes(PAGE)] * PAGES
    rounds: list[bytes] = []
    channels = [
        multifd_schema(version).build_init(MultifdInit(bytes(16), k))
        + packets(version, {}, [], 0)  # setup's sync
        for k in range(CHANNELS)
    ]
    for number in range(1, ROUNDS + 1):
        sent = range(PAGES) if number == 1 else rng.sample(range(PAGES), PAGES // 3)
        main_zero: list[int] = []
        normal: list[Version] = [{} for _ in range(CHANNELS)]
        zero: list[list[int]] = [[] for _ in range(CHANNELS)]
        for page in sent:
            where = rng.randrange(CHANNELS + 1)
            is_zero = rng.random() < 0.3
            data = bytes(PAGE) if is_zero else bytes([number, page % 251 + 1]) * (PAGE // 2)
            ram[page] = data
            if is_zero and (version == "7.2" or where == CHANNELS):
                main_zero.append(page)  # 7.2: zero pages only ever go on the main channel
            elif is_zero:
                zero[where].append(page)
            else:
                normal[where % CHANNELS][page] = data
        rounds.append(
            b"".join(
                schema.build_ram_page(m.RamPage("pc.ram", page * PAGE, True, b"\0"))
                for page in main_zero
            )
        )
        for k in range(CHANNELS):
            channels[k] += packets(version, normal[k], zero[k], number * 10)
    return main_stream(rounds, version, MACHINE[version]), channels, b"".join(ram)


@pytest.mark.uffd
@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("version", ["7.2", "10.0"])
def test_the_last_version_of_each_page_wins(tmp_path: Path, version: str, seed: int) -> None:
    main, channels, expected = random_migration(version, seed)
    args = ["--multifd", str(CHANNELS)]
    with receive(tmp_path, *args, version=version) as (process, port):
        migrate(port, main, list(reversed(channels)))
        code, _stdout, stderr = outcome(process)
    assert code == 0, stderr
    ram = (tmp_path / "dump" / "pc.ram.bin").read_bytes()
    wrong = [page for page in range(PAGES) if ram[page * PAGE : (page + 1) * PAGE] != expected[
        page * PAGE : (page + 1) * PAGE
    ]]  # fmt: skip
    assert not wrong, f"pages {wrong[:8]} hold an older version"
