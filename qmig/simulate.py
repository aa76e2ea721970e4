"""``qmig simulate``: a qmig source and a qmig destination, in two processes, over TCP.

The source runs in this process on generated guest RAM that a dirtier keeps changing during
precopy. The destination runs in a child process (:mod:`qmig.runner.peer`) onto userfaultfd
RAM with a read-only guest workload, so every page it holds at the end must equal the
source's final copy: once every page is in place the child holds its RAM, and this process
compares it with the source's memory page by page, reading it out of the child.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from qmig import simulate_multifd
from qmig.errors import QmigError, VerificationError
from qmig.latency import (
    RequestSplit,
    percentile_us,
    request_split,
    vcpu_blocktime_ms,
    vcpu_run_ms,
)
from qmig.protocol.preempt import PreemptVariant, preempt_variant
from qmig.protocol.source import DeviceSnapshot, Source
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
from qmig.runner.pauses import Pause, pauses_json
from qmig.runner.peer import Peer
from qmig.runner.source import SEND_BUFFER, SourcePlan, SourceRunner
from qmig.runner.source_ram import DIRTY_PATTERNS, Dirtier, GuestRam
from qmig.transport import connect, limit_buffers, listen
from qmig.wire.profiles import target_page_size

MiB = 1 << 20
TARGET_PAGE = target_page_size()  # the default profile's; simulate's guests use it
PEER_TIMEOUT = 120.0
RECOVER_TIMEOUT = 60.0  # a paused end waits this long for the other's new channel
# The destination's SO_RCVBUF. Unset, Linux lets a loopback receive buffer grow to
# net.ipv4.tcp_rmem's maximum (32 MiB here), and a requested page waits behind all of it.
# Smaller, and the stream goes a window at a time, each a wake-up of both ends, so the guest
# catches up with it more often; larger, and a requested page waits behind more. Default
# simulate on a 2-CPU host, 165 alternated runs each (bench/simulate_runs_bench.py), 128 KiB
# against 64 KiB: fault p50 median 90.6 against 96.5 µs (under 100 µs in 97 runs both),
# blocktime 117 against 155 ms; 512 KiB (30 runs): p50 112 µs, blocktime 114 ms.
# --receive-buffer chooses.
RECEIVE_BUFFER = 128 << 10


@dataclass
class SimulationConfig:
    blocks: list[tuple[str, int]] = field(
        default_factory=lambda: [("pc.ram", 224 * MiB), ("vga.vram", 32 * MiB)]
    )
    pattern: str = "random"
    vcpus: int = 2
    touches: int | None = None
    dirty_rate: float = 20000.0  # pages per second, on the source, until switchover
    working_set: int | None = None  # bytes at the start of RAM the source dirties; None: all
    dirty_pattern: str = "random"  # or "sequential" (see qmig.runner.source_ram.Dirtier)
    postcopy_after: int | None = 1  # None: precopy only
    bandwidth: float | None = None  # bytes per second
    version: str | None = None
    seed: int = 1
    zero_fraction: float = 0.5
    # Socket buffers (bytes, doubled by the kernel); None leaves Linux's autotuning on.
    send_buffer: int | None = SEND_BUFFER
    receive_buffer: int | None = RECEIVE_BUFFER
    # Postcopy recovery: cut the link after this many postcopy pages, ``pauses`` times.
    pause_after: int | None = None
    pauses: int = 1
    pause_during_recovery: bool = False  # and cut the first recovery's handshake once
    # Postcopy-preempt on both ends; its variant follows the version and the machine type
    # (the CONFIGURATION's), unless ``preempt_variant`` names one.
    preempt: bool = False
    preempt_variant: str | None = None
    machine_type: str | None = None  # None: the version's own (the profile's)
    # Multifd: precopy RAM in packets over this many extra connections (None: none), and
    # where zero pages go (None: the version's default for the machine type).
    multifd: int | None = None
    zero_page_detection: str | None = None
    fast_path: bool = True  # the destination's C receive thread after RUN (qmig.runner.fastpath)
    fast_answer: bool = True  # the source's C answer thread (qmig.runner.answer)
    fast_sweep: bool = True  # and postcopy's background pages from C beside it

    def variant(self) -> PreemptVariant | None:
        """The preempt variant this run uses, or None without --preempt."""
        if not self.preempt:
            return None
        from qmig.wire.profiles import load_profile

        profile = load_profile(self.version)
        machine = self.machine_type or profile.default_machine_type
        return preempt_variant(profile, machine, self.preempt_variant)

    @property
    def recovers(self) -> bool:
        return self.pause_after is not None

    def check(self) -> None:
        """Refuse, in one line naming the option, what would fail later in the other process."""
        from qmig.wire.schema import schema_for

        if not self.blocks:
            raise QmigError("--blocks", "no RAM blocks")
        seen: set[str] = set()
        for name, size in self.blocks:
            if name in seen:
                raise QmigError("--blocks", f"block {name!r} is given twice")
            seen.add(name)
            if not 0 < len(name.encode()) <= 255:
                raise QmigError("--blocks", f"block name {name!r} must be 1 to 255 bytes")
            if size <= 0 or size % TARGET_PAGE:
                raise QmigError(
                    "--blocks", f"{name}: size {size} is not a positive multiple of 4 KiB"
                )
        if self.vcpus < 1:
            raise QmigError("--vcpus", f"must be at least 1, not {self.vcpus}")
        if self.touches is not None and self.touches < 0:
            raise QmigError("--touches", f"must not be negative, not {self.touches}")
        if self.dirty_rate < 0:
            raise QmigError("--dirty-rate", f"must not be negative, not {self.dirty_rate:g}")
        if self.working_set is not None and self.working_set < 0:
            raise QmigError("--working-set", "must not be negative")
        if self.dirty_pattern not in DIRTY_PATTERNS:
            raise QmigError(
                "--dirty-pattern",
                f"{self.dirty_pattern!r} is not one of {', '.join(DIRTY_PATTERNS)}",
            )
        if self.postcopy_after is not None and self.postcopy_after < 0:
            raise QmigError("--postcopy-after", f"must be 0 or more, not {self.postcopy_after}")
        if self.pause_after is not None and self.pause_after < 1:
            # 0 would cut the switchover itself: before RUN nothing can recover.
            raise QmigError("--pause-after", f"must be at least 1, not {self.pause_after}")
        if self.pause_after is not None and self.postcopy_after is None:
            raise QmigError("--pause-after", "postcopy recovery needs postcopy (not precopy only)")
        if self.pauses < 1:
            raise QmigError("--pauses", f"must be at least 1, not {self.pauses}")
        if self.pause_during_recovery and self.pause_after is None:
            raise QmigError("--pause-during-recovery", "needs --pause-after")
        if self.bandwidth is not None and self.bandwidth <= 0:
            raise QmigError("--bandwidth", f"must be positive, not {self.bandwidth / MiB:g}")
        schema_for(self.version)  # an unknown --qemu-version, before a process is started
        if self.preempt_variant is not None and not self.preempt:
            raise QmigError("--preempt-variant", "needs --preempt")
        if self.preempt and self.postcopy_after is None:
            raise QmigError(
                "--preempt", "postcopy-preempt requires postcopy-ram (not precopy only)"
            )
        self.variant()  # a version without the capability, an unknown variant
        simulate_multifd.check(
            self.multifd,
            self.zero_page_detection,
            preempt=self.preempt,
            version=self.version,
            machine_type=self.machine_type,
            postcopy=self.postcopy_after is not None,
        )


def default_devices(seed: int) -> list[DeviceSnapshot]:
    """A few opaque device states, so that PACKAGED and VMDESCRIPTION carry something."""
    rng = random.Random(seed)
    return [
        DeviceSnapshot("timer", 0, 2, rng.randbytes(24)),
        DeviceSnapshot("cpu", 0, 12, rng.randbytes(1851)),
        DeviceSnapshot("apic", 0, 3, rng.randbytes(181)),
        DeviceSnapshot("globalstate", 0, 1, rng.randbytes(104)),
    ]


def run_simulation(
    config: SimulationConfig,
    on_progress: Callable[[str, int], None] | None = None,
    recorder: Recorder | None = None,
) -> dict[str, Any]:
    """Run one migration; return the summary (raises on failure or a verification error).
    ``recorder``: counts the connection's bytes over time, and keeps both sides' reports."""
    config.check()
    ram = GuestRam.generate(config.blocks, zero_fraction=config.zero_fraction, seed=config.seed)
    with listen("tcp:127.0.0.1:0") as listener:
        assert listener.socket is not None
        if config.receive_buffer is not None:
            # Before the source connects: the accepted socket inherits it, window scale too.
            limit_buffers(listener.socket, receive=config.receive_buffer)
        arguments = ["--pattern", config.pattern, "--vcpus", str(config.vcpus), "--hold"]
        if config.version:
            arguments += ["--qemu-version", config.version]
        if config.touches is not None:
            arguments += ["--touches", str(config.touches)]
        if config.postcopy_after is None:
            arguments.append("--precopy-only")
        if not config.fast_path:
            arguments.append("--no-fast-path")
        if config.recovers:
            arguments += ["--recover-timeout", str(RECOVER_TIMEOUT)]
        variant = config.variant()
        if variant is not None:
            arguments += ["--preempt", variant.value]
        if config.multifd:
            arguments += ["--multifd", str(config.multifd)]
        # The destination has the same RAM as the source, as two QEMUs started alike.
        arguments += ["--blocks", ",".join(f"{name}:{size}" for name, size in config.blocks)]
        peer = Peer(arguments, listener.socket)
        try:
            peer.wait_until_ready(PEER_TIMEOUT)
            source_report, source = _run_source(config, ram, listener.uri, on_progress, recorder)
            destination = peer.report(PEER_TIMEOUT)
            if recorder is not None:
                recorder.runs.update(source=source_report, destination=destination)
            # Every page the destination holds against the source's final copy, read out of
            # the destination's memory while it waits (see qmig.runner.peer).
            blocks = [(block.idstr, block.ram) for block in ram.blocks]
            differ, first = (0, []) if destination is None else peer.compare(blocks, destination)
            peer_error = peer.finish(PEER_TIMEOUT).removeprefix("qmig: error: ")
        except QmigError as error:
            # Its own account of what went wrong, if it gives one within a few seconds.
            peer_error = peer.finish(5.0).removeprefix("qmig: error: ")
            if peer_error:
                raise QmigError(
                    "simulate", f"{error.one_line()}; destination: {peer_error}"
                ) from None
            raise
        finally:
            peer.kill()
        if peer_error or destination is None:
            raise QmigError("simulate", f"destination failed: {peer_error or 'no report'}")
    summary = _summary(config, source, source_report, destination, differ)
    if differ:
        block, offset = first[0]
        raise VerificationError(
            "verify",
            f"{differ} pages differ between source and destination; first: "
            f"{block} page {offset:#x}",
        )
    return summary


def _run_source(
    config: SimulationConfig,
    ram: GuestRam,
    uri: str,
    on_progress: Callable[[str, int], None] | None,
    recorder: Recorder | None = None,
) -> tuple[Any, Source]:
    source = Source(
        ram.blocks,
        version=config.version,
        postcopy_ram=config.postcopy_after is not None,
        devices=default_devices(config.seed),
        machine_type=config.machine_type,
        preempt=config.variant(),
        multifd=simulate_multifd.source_options(config.multifd, config.zero_page_detection),
    )
    dirtier = (
        Dirtier(
            ram,
            config.dirty_rate,
            seed=config.seed + 1,
            working_set=None if config.working_set is None else config.working_set // TARGET_PAGE,
            pattern=config.dirty_pattern,
        )
        if config.dirty_rate
        else None
    )
    cuts = None
    if config.pause_after is not None:
        cuts = CutPlan(config.pause_after, config.pauses, config.pause_during_recovery)
    plan = SourcePlan(
        postcopy_after=config.postcopy_after,
        bandwidth=config.bandwidth,
        send_buffer=config.send_buffer,
        cuts=cuts,
        recover_timeout=RECOVER_TIMEOUT,
        fast_answer=config.fast_answer,
        fast_sweep=config.fast_sweep,
    )

    # A new main channel (the first, or one after a recovery), counted for the report.
    opened = partial(counted, recorder, sends=STREAM, receives=RETURN_PATH)

    reopen = None
    if config.recovers:
        reopen = connect_with_retries(
            lambda timeout: opened(connect(uri, timeout)), RECOVER_TIMEOUT
        )
    openers = (
        {
            PREEMPT: lambda timeout: counted(
                recorder, connect(uri, timeout), sends=PREEMPT_SERIES, receives=PREEMPT_BACK
            )
        }
        if config.preempt
        else {}
    )
    openers.update(
        counted_multifd(recorder, simulate_multifd.openers(uri, config.multifd), sending=True)
    )
    channels = Channels(opened(connect(uri)), reopen, openers)
    if recorder is not None:  # its time starts with the migration, as total_s does
        recorder.start = time.monotonic()
    try:
        runner = SourceRunner(channels, source, plan, dirtier=dirtier, on_progress=on_progress)
        report = runner.run()
    finally:
        channels.close_all()
    return report, source


def _summary(
    config: SimulationConfig,
    source: Source,
    report: Any,
    destination: dict[str, Any],
    mismatches: int,
) -> dict[str, Any]:
    stats = source.stats
    faults = destination.get("faults") or {}
    latency = faults.get("latency_ns") or {}
    placed_ns = sorted(destination.get("fast_path_wait_ns") or [])
    split = _split(report, destination)
    downtime = None
    if report.stopped is not None and destination.get("running_at") is not None:
        downtime = (destination["running_at"] - report.stopped) * 1000
    total_pages = sum(size for _, size in config.blocks) // TARGET_PAGE
    return {
        "verified": not mismatches,
        "mismatched_pages": mismatches,
        "mode": "precopy" if config.postcopy_after is None else "postcopy",
        "qemu_version": source.profile.name,
        "ram_bytes": sum(size for _, size in config.blocks),
        "blocks": {name: size for name, size in config.blocks},
        # Migration start → the source has the destination's SHUT, i.e. the destination has
        # consumed the whole stream (QEMU's source-side total-time ends at the same point).
        # The destination's own end adds the workload's finish (its vCPUs joined).
        "total_s": round(report.finished - report.started, 3),
        "destination_done_s": round(destination["finished"] - report.started, 3),
        "downtime_ms": None if downtime is None else round(downtime, 2),
        "precopy_passes": report.passes,
        "precopy": {
            "bytes": stats.precopy_bytes,
            "pages": stats.precopy_pages,
            "zero_pages": stats.precopy_zero_pages,
        },
        "postcopy": {
            "bytes": stats.postcopy_bytes,
            "pages": stats.postcopy_pages,
            "zero_pages": stats.postcopy_zero_pages,
            "requested_pages": stats.requested_pages,
        },
        "discard_commands": stats.discard_commands,
        "discarded_pages": stats.discarded_pages,
        "postcopy_requests": destination.get("requests", 0),
        "source_requests": stats.requests,
        "faults": faults.get("faults", 0),
        # Read after their page was placed (the placement woke the vCPU): not in the latency.
        "late_faults": faults.get("late_faults", 0),
        "fault_latency_us": {
            "p50": round(latency.get("p50_ns", 0) / 1000, 1),
            "p99": round(latency.get("p99_ns", 0) / 1000, 1),
            "max": round(latency.get("max_ns", 0) / 1000, 1),
        },
        # A fault's latency by its legs: on the destination, fault → REQ_PAGES sent; REQ_PAGES
        # sent → read by the source (on the wire, and waiting for the source's loop to look);
        # on the source, read → its pages written into the socket; the page written → placed
        # (queued behind the bytes sent before it, then read and placed; pages placed before
        # the answer was written, because the sweep had sent them already, are left out).
        # Then the same requests' fault latency (fault → placed, as the destination measured
        # it: fault → REQ_PAGES sent, then sent → placed), split by what each found on the
        # source when it was read: page_already_sent, its pages sent already (on the wire or
        # in the socket, so the fault waited for less than a round trip; QEMU 7.2's source
        # traces get_queued_page_not_dirty), or page_sent_for_request (get_queued_page).
        # Requests paired by block and offset, as the legs are; the counts sum to the pairs.
        **split().as_json(),
        # The destination's C receive thread: data pages it placed, recv() → placed.
        "page_placed_us": {
            "p50": percentile_us(placed_ns, 0.5),
            "p99": percentile_us(placed_ns, 0.99),
        },
        "fast_path": destination.get("fast_path") or {},
        "fast_answer": report.fast_answer,
        "blocktime_ms": round(faults.get("blocktime_ns", 0) / 1e6, 2),
        # QEMU 10.1's query-migrate figures: the fault latency's mean and power-of-two
        # distribution, and each vCPU's blocktime.
        "postcopy_latency_ns": faults.get("postcopy_latency_ns", 0),
        "postcopy_latency_dist": faults.get("postcopy_latency_dist", []),
        "postcopy_vcpu_blocktime_ms": vcpu_blocktime_ms(faults, destination.get("workload") or []),
        "vcpu_run_ms": vcpu_run_ms(destination.get("workload") or []),
        # The destination's placing rate: target pages placed per second spent placing them,
        # written straight into memory before RUN, with userfaultfd after.
        "placement_mib_s": {
            phase: _rate(
                (destination.get("placed_pages") or {}).get(phase, 0),
                (destination.get("placing_ns") or {}).get(phase, 0),
            )
            for phase in ("precopy", "postcopy")
        },
        "switchover_ms": _switchover(report, destination),
        "pages_total": total_pages,
        "pongs": report.pongs,
        # Postcopy recovery: completed recoveries, and the time spent paused (the cut →
        # RESUME_ACK, on the source).
        "recoveries": report.recoveries,
        "destination_recoveries": destination.get("recoveries", 0),
        "paused_ms": round(report.paused_s * 1000, 2),
        **_after_last_recovery(report, destination),
        # Each pause as each end saw it: when (s from the start), why, stream bytes and
        # postcopy pages by then (sent / placed), and how long until it resumed.
        "pauses": pauses_json(report.pauses, report.started),
        "destination_pauses": pauses_json(
            [Pause(**pause) for pause in destination.get("pauses") or []], report.started
        ),
        "channels": report.channels,
        "resent_pages": stats.resent_pages,
        # Postcopy-preempt: target pages on each channel, as each end counted them.
        "preempt": None
        if source.preempt is None
        else {
            "variant": source.preempt.value,
            "machine_type": source.machine_type,
        },
        "preempt_pages": {
            "sent": {
                "main": stats.precopy_pages + stats.postcopy_pages - source.preempt_pages,
                "preempt": source.preempt_pages,
            },
            "received": {
                "main": sum((destination.get("placed_pages") or {}).values())
                - destination.get("preempt_pages", 0),
                "preempt": destination.get("preempt_pages", 0),
            },
        },
        **simulate_multifd.summary(source, report.multifd_bytes, destination),
        "workload": {"pattern": config.pattern, "vcpus": config.vcpus, "writes": False},
        "source_guest": {"dirty_rate": config.dirty_rate, "dirty_pattern": config.dirty_pattern},
    }


def _after_last_recovery(report: Any, destination: dict[str, Any]) -> dict[str, Any]:
    """after_last_recovery: from when (s from the start), the requests the destination sent
    from then on, their legs and their fault latency by what each found on the source;
    nothing without a recovery."""
    since = last_resume(destination)
    if since is None:
        return {}
    legs = _split(report, destination)(since=since)
    return {
        "after_last_recovery": {
            "since_s": round(since - report.started, 6),
            "requests": len(legs.sent),
            **legs.as_json(),
        }
    }


def last_resume(destination: dict[str, Any]) -> float | None:
    """When the destination (its report) last resumed after a pause (monotonic s), or None.
    It resumes on POSTCOPY_RESUME, before it sends anything on the new channel: every
    request sent from then on, and read by the source from then on, is the last recovery's."""
    resumed = [pause.get("resumed_at") for pause in destination.get("pauses") or []]
    return max((at for at in resumed if at is not None), default=None)


def after_last_recovery(source_report: Any, destination: dict[str, Any]) -> RequestSplit | None:
    """The legs of the requests made after the last recovery, from both ends' reports (the
    source's :class:`~qmig.runner.source.SourceReport`, the destination's as the peer sends
    it); None without a recovery."""
    since = last_resume(destination)
    if since is None:
        return None
    return _split(source_report, destination)(since=since)


def _split(source_report: Any, destination: dict[str, Any]) -> Callable[..., RequestSplit]:
    """:func:`~qmig.latency.request_split` over both ends' reports, given ``since``."""
    return partial(
        request_split,
        source_report.requests,
        source_report.served_ns,
        source_report.already_sent,
        destination.get("request_log") or [],
        destination.get("request_sent_ns") or [],
        destination.get("request_sent_at_ns") or [],
    )


def _rate(pages: int, ns: int) -> float | None:
    """MiB/s for ``pages`` target pages placed in ``ns`` nanoseconds; None: none placed."""
    if not pages or ns <= 0:
        return None
    return round(pages * TARGET_PAGE / MiB / (ns / 1e9), 1)


def _switchover(report: Any, destination: dict[str, Any]) -> dict[str, float | None]:
    """Where the downtime went, in ms (CLOCK_MONOTONIC is shared by both processes): the
    source's stop to the destination's first discard (building the discards, and the stream
    ahead of them), the discards to LISTEN, LISTEN (registering RAM) to RUN; and the first
    discard to RUN in all. None where a step did not happen (no discards, precopy only)."""
    stopped = report.stopped
    first = destination.get("first_discard_at")
    listen = destination.get("listen_at")
    running = destination.get("running_at")

    def span(start: float | None, end: float | None) -> float | None:
        return None if start is None or end is None else round((end - start) * 1000, 2)

    return {
        "stop_to_first_discard": span(stopped, first),
        "discards_to_listen": span(first, listen),
        "listen_to_run": span(listen, running),
        "first_discard_to_run": span(first, running),
    }


def environment_check() -> None:
    """Fail early, in one line, where this host cannot run the destination."""
    from qmig.ram.uffd import probe

    probe()


__all__ = ["SimulationConfig", "after_last_recovery", "run_simulation"]
