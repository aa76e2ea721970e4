"""Drive a multifd :class:`Source` in memory and read what it made back with qmig's readers.

The main channel goes through :class:`StreamReader`, every channel through
:class:`MultifdChannelReader`; the result is the destination's view: the RAM rebuilt, and
the order of the sync points (each main-channel EOS or MULTIFD_FLUSH, and each channel's
SYNC packets) as one timeline.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from qmig.protocol.multifd_source import MultifdSendOptions, PacketOut
from qmig.protocol.source import Source, SourceBlock
from qmig.wire import messages as m
from qmig.wire.multifd_reader import Handshake, MultifdChannelReader, Packet
from qmig.wire.reader import StreamReader


@dataclass
class Received:
    main: bytes
    channels: list[bytes]
    ram: dict[str, bytearray]
    # ("main", "EOS" | "MULTIFD_FLUSH") and ("sync", channel), in the order written
    timeline: list[tuple[str, object]] = field(default_factory=list)
    packets: list[Packet] = field(default_factory=list)
    main_pages: int = 0


def drive(
    blocks: list[SourceBlock],
    version: str,
    options: MultifdSendOptions,
    *,
    machine_type: str = "pc-i440fx-7.2",
    passes: int = 1,
    dirty_between: list[tuple[str, list[int]]] | None = None,
    budget: int = 1 << 20,
    between: Callable[[int], list[tuple[str, list[int]]]] | None = None,
) -> tuple[Source, Received]:
    """Precopy only: ``passes`` passes (``dirty_between`` re-dirtied before each next one;
    ``between(pass)``, if given, may change the guest and says what it dirtied), then
    completion."""
    source = Source(
        blocks, version=version, machine_type=machine_type, postcopy_ram=False,
        return_path=False, multifd=options,
    )  # fmt: skip
    plan = source.multifd
    assert plan is not None
    main = bytearray()
    channels = [bytearray(hello) for hello in plan.handshakes()]
    order: list[bytes | tuple[int, bytes]] = []

    def take(data: bytes) -> None:
        # A packet's pages are read when it is written, as a runner writes it: now, before
        # the guest changes again.
        for step in source.take_multifd_steps():
            if isinstance(step, PacketOut):
                ram = memoryview(step.ram)
                pages = b"".join(bytes(ram[a : a + n]) for a, n in step.runs)
                order.append((step.channel, step.header + pages))
            else:
                order.append(step)
        order.append(data)

    source.start()
    take(source.data_to_send(0))
    for number in range(passes):
        while not source.pass_complete:
            take(source.data_to_send(budget))
        if number + 1 < passes:
            for name, pages in (dirty_between or []) + (between(number) if between else []):
                source.sync_dirty(name, pages)
            source.begin_pass()
    source.complete_precopy()
    take(source.data_to_send(budget))
    received = Received(b"", [], {b.idstr: bytearray(b.used_length) for b in blocks})
    reader = StreamReader(version)
    channel_readers = [
        MultifdChannelReader(
            version,
            channels=options.channels,
            uuid=options.uuid,
            blocks={b.idstr: b.used_length for b in blocks},
        )
        for _ in channels
    ]
    for chan, hello in zip(channel_readers, channels, strict=True):
        chan.feed(hello)
    for step in order:
        if isinstance(step, tuple):
            channel, data = step
            channels[channel] += data
            chan = channel_readers[channel]
            chan.feed(data)
            for event in chan:
                if isinstance(event, Handshake):
                    continue
                assert isinstance(event, Packet)
                received.packets.append(event)
                if event.sync:
                    received.timeline.append(("sync", channel))
                ram = received.ram[event.header.ramblock] if event.offsets else None
                for offset, page in zip(event.normal_offsets, event.pages, strict=True):
                    assert ram is not None
                    ram[offset : offset + len(page)] = page
                for offset in event.zero_offsets:
                    assert ram is not None
                    ram[offset : offset + 4096] = bytes(4096)
        else:
            main += step
            reader.feed(step)
            for record in reader:
                _main_record(record.message, received)
    reader.feed_eof()
    for record in reader:
        _main_record(record.message, received)
    for chan in channel_readers:
        chan.feed_eof()
        assert list(chan) == []
    received.main = bytes(main)
    received.channels = [bytes(c) for c in channels]
    return source, received


def _main_record(message: object, received: Received) -> None:
    if isinstance(message, m.RamEos):
        received.timeline.append(("main", "EOS"))
    elif isinstance(message, m.RamMultifdFlush):
        received.timeline.append(("main", "MULTIFD_FLUSH"))
    elif isinstance(message, m.RamPageRun):
        ram = received.ram[message.block]
        size = message.target_page_size
        mask = size - 1
        for header, body in zip(message.headers, message.bodies, strict=True):
            offset = header & ~mask
            at = body - message.data_base
            if header & message.page_flag:
                ram[offset : offset + size] = message.data[at : at + size]
            else:
                ram[offset : offset + size] = bytes([message.data[at]]) * size
        received.main_pages += len(message.headers)


def sync_points(timeline: list[tuple[str, object]], channels: int) -> list[str]:
    """The main channel's EOS/FLUSH records, each with whether every channel had synced
    once since the previous one ("EOS+sync") or not at all ("EOS")."""
    out: list[str] = []
    synced: list[int] = []
    for kind, what in timeline:
        if kind == "sync":
            assert isinstance(what, int)
            synced.append(what)
        else:
            if synced:
                assert sorted(synced) == list(range(channels)), synced
                out.append(f"{what}+sync")
            else:
                out.append(str(what))
            synced = []
    assert not synced, "a sync round with no main-channel record after it"
    return out
