"""A multifd capture folder written with qmig's own multifd source: ``stream.bin`` (the main
channel) and ``multifd-<K>.bin`` per channel, as a relay records a multifd migration.

Some pages first go out with wrong contents and are sent again, right, in a later pass: a
reader that does not apply the channels in sync order (newest copy wins) rebuilds them wrong.
"""

from __future__ import annotations

import json
from pathlib import Path

from qmig.protocol.multifd_source import MultifdSendOptions, PacketOut
from qmig.protocol.source import Source
from qmig.replay import load_recording

PAGE = 4096


def write_multifd_folder(
    capture: Path, folder: Path, version: str, channels: int, stale_pages: range
) -> bytes:
    """The recording of ``capture`` sent again with multifd into ``folder``, pages
    ``stale_pages`` of pc.ram first sent wrong; returns the right pc.ram."""
    recording = load_recording(capture, version)
    try:
        blocks = recording.source_blocks()
        ram = next(block for block in blocks if block.idstr == "pc.ram")
        truth = bytes(ram.ram[: ram.used_length])
        memory = ram.ram
        for page in stale_pages:
            memory[page * PAGE : page * PAGE + 8] = b"STALE!!!"
        source = Source(
            blocks, version=version, configuration=recording.configuration,
            devices=recording.devices, postcopy_ram=False, return_path=False,
            vmdescription=recording.vmdescription, multifd=MultifdSendOptions(channels),
        )  # fmt: skip
        assert source.multifd is not None
        folder.mkdir(parents=True, exist_ok=True)
        main = (folder / "stream.bin").open("wb")
        files = [(folder / f"multifd-{k}.bin").open("wb") for k in range(channels)]
        for file, hello in zip(files, source.multifd.handshakes(), strict=True):
            file.write(hello)

        def write(data: bytes) -> None:
            for step in source.take_multifd_steps():
                if isinstance(step, PacketOut):
                    out = files[step.channel]
                    out.write(step.header)
                    for start, length in step.runs:
                        out.write(memoryview(step.ram)[start : start + length])
                else:
                    main.write(step)
            main.write(data)

        source.start()
        write(source.data_to_send(0))
        while not source.pass_complete:
            write(source.data_to_send(1 << 20))
        memory[: ram.used_length] = truth  # the guest wrote them again: resent in pass 2
        source.sync_dirty("pc.ram", stale_pages)
        source.begin_pass()
        while not source.pass_complete:
            write(source.data_to_send(1 << 20))
        source.complete_precopy()
        write(source.data_to_send(1 << 20))
        for file in (main, *files):
            file.close()
        meta = {"multifd_channels": [f"multifd-{k}" for k in range(channels)]}
        (folder / "meta.json").write_text(json.dumps(meta))
        return truth
    finally:
        recording.close()
