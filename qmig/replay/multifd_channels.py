"""A multifd capture's RAM: the main channel's records and every channel's packets, merged.

A capture folder keeps each multifd connection as ``multifd-<K>.bin`` (see
``formats/capture.md``). The channels are not ordered against each other or against the main
channel, except at sync points: the destination applies every packet a channel sent before
its k-th SYNC before its main thread goes past the k-th sync point of the main channel (an
EOS when the source syncs per section, a MULTIFD_FLUSH when it syncs per round). So a page's
copies are ordered by the sync point they come after (their *epoch*), and the newest epoch
wins; within one epoch QEMU sends a page once.

The main channel is read first (by :class:`~qmig.replay.recording._Rebuilder`, which calls
:meth:`MultifdMerge.main_pages` for each page it writes), then each channel once, in chunks:
memory stays bounded by the guest's page count (one epoch number per target page).
"""

from __future__ import annotations

import mmap
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from qmig.errors import QmigError
from qmig.wire.multifd_reader import Handshake, MultifdChannelReader, Packet
from qmig.wire.reading.records import END, NEED_DATA

READ_CHUNK = 1 << 20
PREFIX = "multifd-"


def multifd_files(folder: Path) -> list[Path]:
    """The multifd channels of a capture folder, by channel number K."""
    found: dict[int, Path] = {}
    for path in folder.glob(f"{PREFIX}*.bin*"):
        number = path.name[len(PREFIX) :].split(".", 1)[0]
        if number.isdigit() and path.name.endswith((".bin", ".bin.xz")):
            found.setdefault(int(number), path)
    return [found[k] for k in sorted(found)]


class MultifdMerge:
    """Epochs of the main channel's pages, then the channels' packets laid over them."""

    def __init__(self, files: list[Path], version: str | None) -> None:
        self.files = files
        self.version = version
        self.eos = 0  # RAM EOS records read on the main channel so far
        self.flushes = 0  # MULTIFD_FLUSH records so far
        # Each distinct (eos, flushes) pair the main pages were written under: which one is
        # the epoch depends on the sync rule, known only once the whole channel is read.
        self._marks: list[tuple[int, int]] = [(0, 0)]
        self._epochs: dict[str, array[int]] = {}  # per block: an index into _marks per page
        self.packets = 0
        self.channel_pages = 0

    def blocks(self, lengths: dict[str, int], page_size: int) -> None:
        for name, length in lengths.items():
            self._epochs[name] = array("I", bytes(4 * -(-length // page_size)))

    def main_eos(self) -> None:
        self.eos += 1
        self._marks.append((self.eos, self.flushes))

    def main_flush(self) -> None:
        self.flushes += 1
        self._marks.append((self.eos, self.flushes))

    def main_pages(self, block: str, pages: Any) -> None:
        """Target pages of ``block`` the main channel wrote just now."""
        epochs = self._epochs[block]
        mark = len(self._marks) - 1
        for page in pages:
            epochs[page] = mark

    def apply(self, memories: dict[str, tuple[mmap.mmap, int]], page_size: int) -> None:
        """Lay every channel's pages over ``memories`` (block -> (memory, used length))."""
        per_round = self.flushes > 0
        main_epoch = array("I", (f if per_round else e for e, f in self._marks))
        epochs = {
            name: array("I", (main_epoch[i] for i in marks)) for name, marks in self._epochs.items()
        }
        lengths = {name: length for name, (_, length) in memories.items()}
        zero = bytes(page_size)
        for path in self.files:
            reader = MultifdChannelReader(self.version, page_size=page_size, blocks=lengths)
            epoch = 0
            for event in _events(reader, path):
                if isinstance(event, Handshake):
                    continue
                assert isinstance(event, Packet)
                self.packets += 1
                # QEMU's receiver places a packet's pages before it acts on its SYNC flag.
                self._place(event, memories, epochs, epoch, page_size, zero)
                if event.sync:
                    epoch += 1

    def _place(
        self,
        packet: Packet,
        memories: dict[str, tuple[mmap.mmap, int]],
        epochs: dict[str, array[int]],
        epoch: int,
        page_size: int,
        zero: bytes,
    ) -> None:
        if not packet.offsets:
            return
        memory, _ = memories[packet.header.ramblock]
        marks = epochs[packet.header.ramblock]
        for offset, page in zip(packet.normal_offsets, packet.pages, strict=True):
            index = offset // page_size
            if epoch >= marks[index]:
                memory[offset : offset + page_size] = page
                marks[index] = epoch
        for offset in packet.zero_offsets:
            index = offset // page_size
            if epoch >= marks[index]:
                memory[offset : offset + page_size] = zero
                marks[index] = epoch
        self.channel_pages += len(packet.offsets)


def _events(reader: MultifdChannelReader, path: Path) -> Iterator[object]:
    from qmig.capture.recording import open_capture_file

    try:
        with open_capture_file(path) as file:
            while chunk := file.read(READ_CHUNK):
                reader.feed(chunk)
                yield from _drain(reader)
        reader.feed_eof()
        yield from _drain(reader)
    except QmigError as error:
        # The same error, naming the channel's file (its offsets are that file's).
        error.what = f"{path.name}: {error.what}"
        Exception.__init__(error, error.one_line())
        raise


def _drain(reader: MultifdChannelReader) -> Iterator[object]:
    while True:
        event = reader.next_event()
        if event is NEED_DATA or event is END:
            return
        yield event
