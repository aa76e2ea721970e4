"""A mapped-ram file as a replay's recording: RAM from its pages and bitmaps, the device state
and CONFIGURATION from its stream part.

The replay sends an ordinary stream (RAM as page records), which a mapped-ram destination
would not read: so the recording's CONFIGURATION drops the mapped-ram capability, as a source
without it sends none.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

from qmig.mapped_ram.file import CAPABILITY, MappedRamFile
from qmig.replay.recording import READ_CHUNK, Recording, _Rebuilder


class _MappedRamRebuilder(_Rebuilder):
    def __init__(self, mapped: MappedRamFile, version: str | None) -> None:
        super().__init__(mapped.path, version)
        self.mapped = mapped

    def chunks(self) -> Iterator[bytes]:
        stream = self.mapped.stream()
        while chunk := stream.read(READ_CHUNK):
            yield chunk


def load_mapped_ram(path: Path, version: str | None = None) -> Recording:
    with MappedRamFile(path, version) as mapped:
        recording = _MappedRamRebuilder(mapped, version).run()
        try:
            by_name = {block.idstr: block for block in recording.blocks}
            for block in mapped.blocks:
                memory = by_name[block.layout.name].memory
                page = block.layout.header.page_size
                for first, count in mapped.page_runs(block):
                    at = first * page
                    for chunk in mapped.read_pages(block, first, count):
                        memory[at : at + len(chunk)] = chunk
                        at += len(chunk)
                recording.pages += sum(count for _, count in mapped.page_runs(block))
        except BaseException:
            recording.close()
            raise
    capabilities = tuple(
        name for name in recording.configuration.capabilities or () if name != CAPABILITY
    )
    recording.configuration = dataclasses.replace(
        recording.configuration, capabilities=capabilities or None
    )
    return recording


def is_mapped_ram(path: Path, version: str | None) -> bool:
    from qmig.mapped_ram.inspect import other_form

    return path.suffix != ".xz" and other_form(path, version) == "mapped-ram"
