"""qmig's own source driving a destination over TCP: a generated guest (16 MiB of pc.ram and
1 MiB of vga.vram, QEMU 7.2's devices), switched to postcopy at once, which cuts its channel
mid-postcopy and resumes."""

from __future__ import annotations

from qmig.protocol.source import Source
from qmig.runner.channels import Channels, CutPlan, connect_with_retries
from qmig.runner.source import SourcePlan, SourceReport, SourceRunner
from qmig.runner.source_ram import GuestRam
from qmig.simulate import default_devices
from qmig.transport import connect


def cut_and_resumed(
    uri: str, resume_uri: str, seed: int, cuts: CutPlan | None, recover_timeout: float
) -> tuple[GuestRam, SourceReport]:
    """Migrates a guest generated from ``seed`` to ``uri``, cut as ``cuts`` says (None: only
    where the destination cuts) and resumed on ``resume_uri`` each time; the guest's RAM and
    the source's report."""
    ram, report, _source = resumed_source(uri, resume_uri, seed, cuts, recover_timeout)
    return ram, report


def resumed_source(
    uri: str, resume_uri: str, seed: int, cuts: CutPlan | None, recover_timeout: float
) -> tuple[GuestRam, SourceReport, Source]:
    """As :func:`cut_and_resumed`, and the source's protocol machine too (its ``stats``)."""
    ram = GuestRam.generate([("pc.ram", 16 << 20), ("vga.vram", 1 << 20)], seed=seed)
    source = Source(ram.blocks, version="7.2", devices=default_devices(seed))
    plan = SourcePlan(
        postcopy_after=0, bandwidth=64 << 20, cuts=cuts, recover_timeout=recover_timeout
    )
    reopen = connect_with_retries(lambda timeout: connect(resume_uri, timeout), recover_timeout)
    channels = Channels(connect(uri), reopen)
    try:
        report = SourceRunner(channels, source, plan).run()
    finally:
        channels.close_main()
    return ram, report, source
