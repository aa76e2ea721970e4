"""``qmig receive --preempt`` (8.0 variant) when the answer to a request reaches its preempt
channel only after the main channel has ended: the source sends a requested page there and
nowhere else, so the destination reads that channel on until every page it asked for is in
(QEMU's postcopy_ram_incoming_cleanup waits for its page_requested_count). Here qmig's own
source is made to hold every preempt write until its main stream is out, so the late
answer is certain; the vCPUs it blocked finish, and the dumped RAM equals the source's."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from processes import started

from qmig.errors import QmigError
from qmig.protocol.preempt import PreemptVariant
from qmig.protocol.source import Source
from qmig.protocol.states import SourceState
from qmig.runner.channels import PREEMPT, Channels
from qmig.runner.source import SourcePlan, SourceRunner
from qmig.runner.source_ram import GuestRam
from qmig.simulate import default_devices
from qmig.transport import Connection, connect

pytestmark = [pytest.mark.uffd, pytest.mark.timeout(180)]


class HeldWhilePostcopy(Connection):
    """A preempt channel whose writes wait, while the source is in postcopy, for release()."""

    def __init__(self, inner: Connection, source: Source) -> None:
        super().__init__(inner.name, sock=inner.socket)
        self.source = source
        self.held = bytearray()

    def sendall(self, data: bytes | bytearray | memoryview) -> None:
        if self.source.state is SourceState.POSTCOPY:
            self.held += data
            return
        self.release()
        super().sendall(data)

    def release(self) -> None:
        if self.held:
            super().sendall(bytes(self.held))
            self.held.clear()


def test_an_answer_that_comes_after_the_main_channel_ended_is_still_placed(
    tmp_path: Path,
) -> None:
    with started(
        "receive", "--listen", "tcp:127.0.0.1:0", "--preempt", "--qemu-version", "10.0",
        "--vcpus", "2", "--idle-timeout", "20", "--json", "--dump-ram", str(tmp_path / "dump"),
    ) as (process, first):  # fmt: skip
        uri = first.split()[-1]
        ram = GuestRam.generate([("pc.ram", 16 << 20), ("vga.vram", 1 << 20)], seed=5)
        source = Source(
            ram.blocks, version="10.0", devices=default_devices(5), preempt=PreemptVariant.V8_0
        )
        held: list[HeldWhilePostcopy] = []

        def open_preempt(timeout: float) -> Connection:
            held.append(HeldWhilePostcopy(connect(uri, timeout), source))
            return held[-1]

        channels = Channels(connect(uri), openers={PREEMPT: open_preempt})
        # Capped, so that the vCPUs (one from the middle of pc.ram) ask ahead of the sweep.
        plan = SourcePlan(postcopy_after=0, bandwidth=8 << 20)
        errors: list[QmigError] = []

        def run_source() -> None:
            try:
                SourceRunner(channels, source, plan).run()
            except QmigError as error:
                errors.append(error)

        thread = threading.Thread(target=run_source, daemon=True)
        thread.start()
        deadline = time.monotonic() + 60
        while source.state in (SourceState.IDLE, SourceState.PRECOPY, SourceState.POSTCOPY):
            assert time.monotonic() < deadline, "the source's main stream did not end"
            time.sleep(0.01)
        assert held and held[0].held, "no request was answered during postcopy"
        late = source.preempt_pages
        time.sleep(0.5)  # the destination reads the main channel's end first
        held[0].release()
        thread.join(timeout=60)
        stdout, stderr = process.communicate(timeout=60)
        channels.close_all()
    assert process.returncode == 0, stderr
    assert not errors
    summary = json.loads(stdout)
    assert summary["state"] == "END"
    assert summary["preempt_pages"]["preempt"] == late > 0
    for block in ram.blocks:
        dumped = (tmp_path / "dump" / f"{block.idstr}.bin").read_bytes()
        assert dumped == bytes(block.ram[: block.used_length]), block.idstr
