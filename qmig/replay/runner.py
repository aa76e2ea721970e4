"""Replay a rebuilt recording into a real QEMU destination, with qmig's Source machine.

The guest does not run on the replaying side: its RAM is the recording's final copy of every
page. So after the precopy passes nothing is dirty any more; to switch over as the captured
source did, the pages it discarded at its switch (changed after they were sent, or never
sent) are marked dirty again just before the switch. The replay then discards them too,
hands over the captured device state in PACKAGED, and serves them in postcopy, requested
pages first.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from qmig.errors import QmigError
from qmig.latency import percentiles_us
from qmig.protocol.multifd_source import UUID_SIZE, MultifdSendOptions
from qmig.protocol.preempt import preempt_variant
from qmig.protocol.source import Source
from qmig.protocol.states import SourceState
from qmig.replay.recording import Recording
from qmig.report.recorder import PREEMPT as PREEMPT_SERIES
from qmig.report.recorder import (
    PREEMPT_BACK,
    RETURN_PATH,
    STREAM,
    Recorder,
    counted,
    counted_multifd,
)
from qmig.runner.channels import PREEMPT, Channels, CutPlan, connect_with_retries
from qmig.runner.multifd_send import channel_kind
from qmig.runner.pauses import pauses_json
from qmig.runner.source import SourcePlan, SourceReport, SourceRunner
from qmig.transport import Connection, connect
from qmig.wire.profiles import load_profile

CONNECT_TIMEOUT = 30.0
# A destination with another machine type or RAM size refuses the stream as soon as it reads
# CONFIGURATION or the RAM block list: a failure this soon after connecting suggests that.
EARLY_FAILURE_S = 2.0
SENDING = (
    SourceState.PRECOPY,
    SourceState.PASS_COMPLETE,
    SourceState.POSTCOPY,
    SourceState.COMPLETING,
)


@dataclass(frozen=True)
class ReplayPlan:
    # Precopy passes before the switch; 0 switches right after setup; None: as captured
    # (a capture that never switched stays precopy).
    postcopy_after: int | None = None
    bandwidth: float | None = None  # bytes per second; None: unlimited
    version: str | None = None
    # SO_SNDBUF from the switch to postcopy on; None: the kernel's autotuning throughout.
    # Measured replaying fixtures/postcopy-tcp into QEMU 7.2, uncapped: 32 KiB for the whole
    # migration made precopy take 21 s instead of 0.06 s (QEMU reads in small pieces and a
    # tiny buffer leaves the stream waiting for its ACKs). In postcopy only, 32 KiB is no
    # such cliff but still no gain: postcopy 0.23-0.30 s against 0.14-0.20 s autotuned, and
    # QEMU's postcopy blocktime 113-143 ms against 16-81 ms (the slower stream leaves the
    # guest more pages to fault on); under a 32 MiB/s cap both take the same time.
    send_buffer: int | None = None
    # Postcopy recovery: cut the channel after this many postcopy pages, then resume on
    # ``resume_to`` (the destination listens there once told migrate-recover), connecting
    # again and again for up to ``resume_timeout`` seconds.
    pause_after: int | None = None
    resume_to: str | None = None
    resume_timeout: float = 60.0
    pauses: int = 1
    pause_during_recovery: bool = False
    # Postcopy-preempt (the destination QEMU must have it on too); the variant follows the
    # version and the captured machine type unless ``preempt_variant`` names one.
    preempt: bool = False
    preempt_variant: str | None = None
    # Multifd: precopy RAM over this many extra channels (the destination QEMU must have the
    # multifd capability and multifd-channels set to the same number); zero-page detection
    # as named, or the version's default for the captured machine type.
    multifd: int | None = None
    zero_page_detection: str | None = None
    uuid: bytes | None = None  # the destination's -uuid, in every channel's handshake
    # Page requests answered by the source's C thread as it reads them (qmig.runner.answer);
    # False: by the Python loop.
    fast_answer: bool = True
    fast_sweep: bool = True  # postcopy's background pages from C beside it (SourcePlan's)


@dataclass
class ReplayResult:
    recording: Recording
    postcopy_after: int | None
    report: SourceReport
    source: Source

    def summary(self) -> dict[str, Any]:
        report, stats, recording = self.report, self.source.stats, self.recording
        return {
            "completed": True,
            "mode": "precopy" if self.postcopy_after is None else "postcopy",
            "machine_type": recording.machine_type,
            "ram_mib": recording.ram_mib,
            "blocks": {block.idstr: block.used_length for block in recording.blocks},
            "devices": len(recording.devices),
            "postcopy_after": self.postcopy_after,
            "passes": stats.passes,
            "total_s": round(report.finished - report.started, 3),
            "precopy_pages": stats.precopy_pages,
            "precopy_bytes": stats.precopy_bytes,
            "postcopy_pages": stats.postcopy_pages,
            "postcopy_bytes": stats.postcopy_bytes,
            "discard_commands": stats.discard_commands,
            "discarded_pages": stats.discarded_pages,
            "requests": stats.requests,
            "requested_pages": stats.requested_pages,
            # Read from the return path → its page written into the socket.
            "request_to_sent_us": percentiles_us(report.served_ns),
            # The source's C answer thread: target pages it wrote, requests it left to Python.
            "fast_answer": report.fast_answer,
            "pongs": report.pongs,
            "recoveries": report.recoveries,
            "paused_ms": round(report.paused_s * 1000, 2),
            # Each pause: when, why, bytes and postcopy pages sent by then, until RESUME_ACK.
            "pauses": pauses_json(report.pauses, report.started),
            "channels": report.channels,
            "preempt": None if self.source.preempt is None else self.source.preempt.value,
            # Target pages sent on each channel.
            "preempt_pages": {
                "main": stats.precopy_pages + stats.postcopy_pages - self.source.preempt_pages,
                "preempt": self.source.preempt_pages,
            },
            "multifd": self._multifd(),
        }

    def _multifd(self) -> dict[str, Any] | None:
        plan = self.source.multifd
        if plan is None:
            return None
        return {**plan.summary(), "channel_bytes": list(self.report.multifd_bytes)}


class ReplayRunner(SourceRunner):
    """A SourceRunner whose switchover re-dirties what the captured source discarded."""

    def __init__(self, *args: Any, discards: dict[str, list[tuple[int, int]]], **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.discards = discards

    def _switch_over(self) -> None:
        page = self.source.target_page_size
        for block, spans in self.discards.items():
            if block not in self.source.by_name:
                continue
            for start, length in spans:
                self.source.sync_dirty(block, range(start // page, -(-(start + length) // page)))
        super()._switch_over()


def replay(
    recording: Recording,
    to: str,
    plan: ReplayPlan,
    *,
    on_progress: Callable[[str, int], None] | None = None,
    recorder: Recorder | None = None,
    misbehave: Callable[[Connection], Connection] | None = None,
) -> ReplayResult:
    """Migrate ``recording`` into the QEMU listening at ``to``; raise QmigError on failure.
    ``recorder``: counts the connection's bytes over time, for a report. ``misbehave``: wraps
    the first channel (the fault knobs of :mod:`qmig.runner.misbehave_source`)."""
    postcopy_after = plan.postcopy_after
    if postcopy_after is None and recording.switched:
        postcopy_after = recording.passes_before_switch
    postcopy = postcopy_after is not None
    variant = None
    if plan.preempt:
        if not postcopy:
            raise QmigError(
                "--preempt", "postcopy-preempt requires postcopy (the capture is precopy)"
            )
        variant = preempt_variant(
            load_profile(plan.version), recording.machine_type, plan.preempt_variant
        )
    elif plan.preempt_variant is not None:
        raise QmigError("--preempt-variant", "needs --preempt")
    multifd = None
    if plan.multifd is not None:
        uuid = plan.uuid if plan.uuid is not None else bytes(UUID_SIZE)  # QEMU's default
        multifd = MultifdSendOptions(plan.multifd, plan.zero_page_detection, uuid)
    elif plan.zero_page_detection is not None:
        raise QmigError("--zero-page-detection", "needs --multifd")
    elif plan.uuid is not None:
        raise QmigError("--uuid", "needs --multifd")
    source = Source(
        recording.source_blocks(),
        version=plan.version,
        configuration=recording.configuration,
        devices=recording.devices,
        postcopy_ram=recording.postcopy_ram or postcopy,
        return_path=recording.return_path or postcopy,
        # QEMU's destination skips it, but tools reading the replayed stream may not.
        vmdescription=recording.vmdescription,
        preempt=variant,
        multifd=multifd,
    )
    cuts = None
    if plan.pause_after is not None:
        cuts = CutPlan(plan.pause_after, plan.pauses, plan.pause_during_recovery)
    source_plan = SourcePlan(
        postcopy_after=postcopy_after,
        bandwidth=plan.bandwidth,
        send_buffer=plan.send_buffer,
        cuts=cuts,
        recover_timeout=plan.resume_timeout,
        fast_answer=plan.fast_answer,
        fast_sweep=plan.fast_sweep,
    )

    # A new main channel (the first, or one after a recovery), counted for the report.
    opened = partial(counted, recorder, sends=STREAM, receives=RETURN_PATH)

    reopen = None
    if plan.resume_to is not None:
        resume_to = plan.resume_to
        reopen = connect_with_retries(
            lambda timeout: opened(connect(resume_to, timeout=timeout)), plan.resume_timeout
        )
    sent = [0]

    def progress(phase: str, count: int) -> None:
        sent[0] += count
        if on_progress is not None:
            on_progress(phase, count)

    # The preempt channel connects to the same address: QEMU takes it as the next connection.
    # After a recovery the destination listens where it was told migrate-recover.
    openers: dict[str, Callable[[float], Connection]] = {}
    first = opened(connect(to, timeout=CONNECT_TIMEOUT))
    channels = Channels(first if misbehave is None else misbehave(first), reopen, openers)
    if variant is not None:
        openers[PREEMPT] = lambda timeout: counted(
            recorder,
            connect(
                plan.resume_to if plan.resume_to and channels.opened > 1 else to, timeout=timeout
            ),
            sends=PREEMPT_SERIES,
            receives=PREEMPT_BACK,
        )
        channels.openers = openers
    # Multifd channels connect to the same address, right after the main one.
    multifd_openers = {
        channel_kind(channel): lambda timeout: connect(to, timeout=timeout)
        for channel in range(plan.multifd or 0)
    }
    openers.update(counted_multifd(recorder, multifd_openers, sending=True))
    channels.openers = openers
    connected = time.monotonic()
    if recorder is not None:
        recorder.start = connected
    try:
        runner = ReplayRunner(
            channels, source, source_plan, discards=recording.discards, on_progress=progress
        )
        try:
            report = runner.run()
        except QmigError as error:
            early = time.monotonic() - connected < EARLY_FAILURE_S
            raise _explained(error, source, recording, sent[0], early) from None
    finally:
        channels.close_all()
    return ReplayResult(recording, postcopy_after, report, source)


def _explained(
    error: QmigError, source: Source, recording: Recording, sent: int, early: bool
) -> QmigError:
    """Anchor a transport error at the stream bytes sent so far; and since a destination that
    gives up at once most often runs another machine type or RAM size than the capture (it
    fails on CONFIGURATION or on the RAM block list), say so."""
    clone = type(error).__new__(type(error))
    clone.__dict__.update(error.__dict__)
    if clone.offset is None:
        clone.offset = sent
        if source.state in SENDING:
            phase = "precopy" if source.state is SourceState.PASS_COMPLETE else source.state.value
            clone.detail = f"{clone.detail} during {phase}"
    early = (
        early
        and not clone.what.startswith("multifd")  # its own hint says what to check
        and source.state in (SourceState.PRECOPY, SourceState.PASS_COMPLETE, SourceState.FAILED)
        and source.stats.passes <= 1
        and source.stats.discard_commands == 0
    )
    if not early:
        Exception.__init__(clone, clone.one_line())
        return clone
    clone.detail = (
        f"{clone.detail} (is the destination running machine type {recording.machine_type} "
        f"with -m {recording.ram_mib:g}M, as captured?)"
    )
    Exception.__init__(clone, clone.one_line())
    return clone
