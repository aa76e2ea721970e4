"""Postcopy-preempt between the two sans-IO machines: requested pages on their own channel,
as bare RAM records that the main channel's schema reads; each variant's opening and end;
a page that comes on both channels is counted once; hostile preempt bytes fail in one line
naming the channel and the byte."""

from __future__ import annotations

import random

import pytest

from qmig.errors import MalformedError, QmigError
from qmig.protocol import events as ev
from qmig.protocol.destination import Destination
from qmig.protocol.preempt import PreemptVariant, machine_version, preempt_variant
from qmig.protocol.preempt_channel import PreemptChannel
from qmig.protocol.source import Source, SourceBlock
from qmig.protocol.states import DestinationState, SourceState
from qmig.wire import messages as m
from qmig.wire.profiles import load_profile
from qmig.wire.reader import END, NEED_DATA
from qmig.wire.schema import schema_for

PAGE = 4096
PAGES = 64


class Pair:
    """A source and a destination with postcopy-preempt, joined in memory."""

    def __init__(self, version: str, variant: PreemptVariant, seed: int = 3) -> None:
        rng = random.Random(seed)
        self.ram = {
            "pc.ram": bytearray(rng.randbytes(PAGES * PAGE)),
            "vga.vram": bytearray(rng.randbytes(8 * PAGE)),
        }
        blocks = [SourceBlock(name, len(ram), ram) for name, ram in self.ram.items()]
        self.source = Source(blocks, version=version, pages_per_section=8, preempt=variant)
        self.dest = Destination(version, preempt=variant)
        self.channel: PreemptChannel = self.dest.open_preempt_channel()
        self.memory: dict[tuple[str, int], bytes] = {}
        self.by_channel = {"main": 0, "preempt": 0}

    def _take(self, event: object, channel: str) -> None:
        if isinstance(event, ev.PagesReceived):
            self.by_channel[channel] += event.run.count
            for offset, zero, data in event.run.pages():
                self.memory[(event.run.block, offset)] = data * PAGE if zero else data

    def to_dest(self, data: bytes) -> None:
        self.dest.receive_data(data)
        while isinstance(event := self.dest.next_event(), ev.Event):
            self._take(event, "main")

    def to_preempt(self, data: bytes) -> object:
        if data:
            self.channel.receive_data(data)
        while isinstance(event := self.channel.next_event(), ev.Event):
            self._take(event, "preempt")
        return event

    def to_source(self) -> None:
        data = self.dest.data_to_send()
        if data:
            self.source.receive_data(data)
            while self.source.next_event() is not NEED_DATA:
                pass

    def switch_over(self) -> None:
        self.source.start()
        self.to_dest(self.source.data_to_send(8 * PAGE))
        self.to_source()
        self.source.start_postcopy()
        self.to_dest(self.source.data_to_send(0))
        self.to_source()
        assert self.dest.state is DestinationState.RUNNING

    def verify(self) -> None:
        for name, ram in self.ram.items():
            for page in range(len(ram) // PAGE):
                got = self.memory.get((name, page * PAGE))
                assert got == bytes(ram[page * PAGE : (page + 1) * PAGE]), (name, page)


@pytest.mark.parametrize(
    ("version", "variant"),
    [
        ("7.2", PreemptVariant.PRE_7_2),
        ("10.0", PreemptVariant.V8_0),
        ("10.0", PreemptVariant.PRE_7_2),
    ],
)
def test_requested_pages_go_on_the_preempt_channel(version: str, variant: PreemptVariant) -> None:
    pair = Pair(version, variant)
    pair.switch_over()
    source = pair.source
    pair.dest.page_fault("pc.ram", 40 * PAGE)
    pair.to_source()
    assert pair.source.requested_data() == b""  # not on the main channel
    urgent = source.preempt_data()
    pair.to_preempt(urgent)
    assert pair.memory[("pc.ram", 40 * PAGE)] == bytes(pair.ram["pc.ram"][40 * PAGE : 41 * PAGE])
    assert pair.by_channel["preempt"] == 1 and pair.channel.pages == 1
    # The sweep does not jump to the requested page, and never sends it again.
    while source.state is SourceState.POSTCOPY:
        pair.to_dest(source.data_to_send(8 * PAGE))
    pair.to_source()
    tail = source.preempt_data()
    assert (tail == schema_for(version).build_ram_flag("EOS")) is variant.ends_with_eos
    # Either the EOS ends it, or the load is over (the main channel's EOF).
    assert pair.to_preempt(tail) is END
    assert pair.channel.ended is variant.ends_with_eos
    assert source.stats.postcopy_pages + source.stats.precopy_pages == PAGES + 8
    assert source.preempt_pages == 1
    assert pair.by_channel["main"] + pair.by_channel["preempt"] == PAGES + 8
    assert source.state is SourceState.DONE
    pair.verify()


def test_the_preempt_channel_reads_with_the_main_channels_schema() -> None:
    pair = Pair("10.0", PreemptVariant.V8_0)
    pair.switch_over()
    pair.dest.page_fault("vga.vram", 3 * PAGE)
    pair.dest.page_fault("vga.vram", 5 * PAGE)
    pair.to_source()
    urgent = pair.source.preempt_data()
    schema = schema_for("10.0")
    first = schema.ram_record.parse(urgent)
    assert first.block == "vga.vram" and first.offset == 3 * PAGE
    assert first.body.data == bytes(pair.ram["vga.vram"][3 * PAGE : 4 * PAGE])
    rebuilt = schema.build_ram_page(m.RamPage("vga.vram", 3 * PAGE, False, first.body.data))
    assert urgent.startswith(rebuilt)
    size = len(rebuilt)
    second = schema.ram_record.parse(urgent[size:])
    assert second.block is None and second.offset == 5 * PAGE  # CONTINUE on this channel


def test_a_page_on_both_channels_is_counted_once() -> None:
    pair = Pair("10.0", PreemptVariant.V8_0)
    pair.switch_over()
    pair.dest.page_fault("pc.ram", 0)
    pair.to_source()
    urgent = pair.source.preempt_data()
    pair.to_preempt(urgent)
    pair.to_preempt(urgent[: len(urgent)])  # the same record again, on the same channel
    tracker = pair.dest.blocks["pc.ram"]
    assert tracker.host_page_present(0)
    assert pair.dest.pending_requests() == []
    assert pair.dest.page_fault("pc.ram", 0) is None  # here: nothing asked again


def test_preempt_bytes_wait_until_the_destination_listens() -> None:
    pair = Pair("7.2", PreemptVariant.PRE_7_2)
    schema = schema_for("7.2")
    pair.source.start()
    pair.to_dest(pair.source.data_to_send(8 * PAGE))
    record = schema.build_ram_page(m.RamPage("pc.ram", 0, False, bytes(range(256)) * 16))
    assert pair.to_preempt(record) is NEED_DATA
    assert pair.channel.pages == 0
    pair.to_source()
    pair.source.start_postcopy()
    pair.to_dest(pair.source.data_to_send(0))
    pair.to_preempt(b"")
    assert pair.channel.pages == 1


def _listening(version: str = "10.0") -> tuple[Pair, PreemptChannel]:
    pair = Pair(version, PreemptVariant.V8_0)
    pair.switch_over()
    return pair, pair.channel


def _fails(channel: PreemptChannel, data: bytes) -> MalformedError:
    channel.receive_data(data)
    with pytest.raises(MalformedError) as caught:
        while channel.next_event() is not NEED_DATA:
            pass
    return caught.value


def test_a_header_on_the_preempt_channel_is_refused() -> None:
    _pair, channel = _listening()
    schema = schema_for("10.0")
    error = _fails(channel, schema.header.build(m.StreamHeader(3)) + bytes(16))
    assert error.one_line() == (
        "preempt channel: a migration stream header: this channel carries bare RAM records, "
        "no header at byte 0"
    )


def test_a_record_that_is_not_a_page_is_refused() -> None:
    _pair, channel = _listening()
    schema = schema_for("10.0")
    page = schema.build_ram_page(m.RamPage("pc.ram", 0, False, bytes(range(256)) * 16))
    error = _fails(channel, page + schema.build_ram_flag("HOOK"))
    assert error.what == "preempt channel"
    assert error.offset == len(page)
    assert "unknown combination of migration flags 0x80 (postcopy mode)" in error.detail


def test_a_page_outside_its_block_is_refused() -> None:
    _pair, channel = _listening()
    schema = schema_for("10.0")
    page = schema.build_ram_page(m.RamPage("vga.vram", 8 * PAGE, False, bytes(range(256)) * 16))
    error = _fails(channel, page)
    assert error.what == "preempt channel RAM" and error.offset == 0
    assert "illegal RAM offset 0x8000 in block 'vga.vram'" in error.detail


def test_a_block_the_main_channel_did_not_announce_is_refused() -> None:
    _pair, channel = _listening()
    schema = schema_for("10.0")
    ok = schema.build_ram_page(m.RamPage("pc.ram", 0, False, bytes(range(256)) * 16))
    page = schema.build_ram_page(m.RamPage("pc.rom", 0, False, bytes(range(256)) * 16))
    error = _fails(channel, ok + page)
    assert error.one_line() == (
        f"preempt channel: block 'pc.rom' is not one the main channel announced at byte "
        f"{len(ok) + schema.ram_header_size}"
    )


def test_the_variant_follows_the_version_and_the_machine_type() -> None:
    assert machine_version("pc-i440fx-7.2") == (7, 2) and machine_version("q35") is None
    new, old = load_profile("10.0"), load_profile("7.2")
    assert preempt_variant(new, "pc-q35-10.0") is PreemptVariant.V8_0
    assert preempt_variant(new, "pc") is PreemptVariant.V8_0
    assert preempt_variant(new, "pc-i440fx-7.2") is PreemptVariant.PRE_7_2
    assert preempt_variant(new, "pc-i440fx-7.1") is PreemptVariant.PRE_7_2
    assert preempt_variant(old, "pc-i440fx-7.2") is PreemptVariant.PRE_7_2
    assert preempt_variant(new, "pc-i440fx-7.2", "8.0") is PreemptVariant.V8_0
    with pytest.raises(QmigError, match="has no postcopy-preempt"):
        preempt_variant(load_profile("2.9"))
    with pytest.raises(QmigError, match="--preempt-variant"):
        preempt_variant(new, None, "9.0")
