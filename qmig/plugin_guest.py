"""A generated guest for ``qmig_source``: one ``pc.ram`` block of known contents, migrated by
qmig's own source machine into a raw stream file (precopy, no return path), which ``qmig
replay`` then sends as it would a capture (in postcopy with ``postcopy_after``)."""

from __future__ import annotations

from pathlib import Path

from qmig.protocol import events as ev
from qmig.protocol.source import Source, SourceBlock
from qmig.protocol.states import SourceState
from qmig.qemu.guest import MIB, known_data

BLOCK = "pc.ram"


def generated_ram(ram_mib: int, seed: int) -> bytes:
    """The generated guest's RAM: what a destination must end up with."""
    return known_data(ram_mib * MIB, seed)


def write_generated_stream(path: Path, ram_mib: int, seed: int, version: str | None) -> Path:
    """The whole migration of the generated guest, as a stream file at ``path``."""
    size = ram_mib * MIB
    source = Source(
        [SourceBlock(BLOCK, size, generated_ram(ram_mib, seed))],
        version=version,
        postcopy_ram=False,
        return_path=False,
    )
    source.start()
    with path.open("wb") as file:
        while source.state is not SourceState.DONE:
            file.write(source.data_to_send())
            while isinstance(event := source.next_event(), ev.Event):
                if isinstance(event, ev.PassCompleted):
                    source.complete_precopy()  # a quiet guest: one pass says it all
        file.write(source.data_to_send())
    return path
