"""A real QEMU → QEMU postcopy migration of the test guest, optionally through the relay.

Used by the real-QEMU tests and by scripts/make_fixtures.py, so both exercise exactly the same
sequence: destination listening first, source guest running and dirtying, capped bandwidth so
precopy cannot converge, a switch to postcopy, completion, then the oracle on the destination.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qmig.capture import CaptureSummary, start_relay
from qmig.qemu.guest import MIB, GuestSpec, highest_safe_end
from qmig.qemu.machine import Machine, MachineConfig
from qmig.qemu.oracle import CounterPicture, verify_counters
from qmig.qemu.qmp import QemuError

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class PostcopyPlan:
    memory_mib: int = 128
    guest: GuestSpec = field(default_factory=GuestSpec)
    max_bandwidth: int = 16 * MIB  # bytes/s; low enough that precopy never converges
    max_postcopy_bandwidth: int = 16 * MIB  # capped so the destination has to ask for pages
    downtime_limit_ms: int = 1  # precopy must not finish on its own: postcopy is the point
    precopy_seconds: float = 2.0  # how long precopy runs before migrate-start-postcopy
    capture_dir: Path | None = None  # relay and record when set; direct TCP otherwise
    timeout: float = 120.0

    @property
    def capabilities(self) -> dict[str, bool]:
        return {"postcopy_ram": True, "postcopy_blocktime": True}

    @property
    def source_parameters(self) -> dict[str, int]:
        return {
            "max_bandwidth": self.max_bandwidth,
            "max_postcopy_bandwidth": self.max_postcopy_bandwidth,
            "downtime_limit": self.downtime_limit_ms,
        }


@dataclass
class PostcopyResult:
    source_info: dict[str, Any]
    destination_info: dict[str, Any]
    picture: CounterPicture
    source_command: list[str]
    destination_command: list[str]
    capture: CaptureSummary | None
    destination_serial_after: int  # markers the destination guest printed after migrating
    dump_path: Path  # the destination's guest range [start, end), dumped after it was stopped
    seconds: float


def run_postcopy(plan: PostcopyPlan, workdir: Path) -> PostcopyResult:
    """Migrate with postcopy; raise QemuError / VerificationError / TransportError on failure.

    Both QEMUs are gone when this returns or raises. The destination's memory dump is left in
    ``workdir`` (``result.dump_path``) for further checks.
    """
    started = time.monotonic()
    spec = plan.guest
    _check_fits(spec, plan.memory_mib)
    destination = Machine(
        MachineConfig("destination", plan.memory_mib, spec, incoming="defer"), workdir
    )
    source = Machine(MachineConfig("source", plan.memory_mib, spec), workdir)
    relay = None
    with destination.start(), source.start():
        destination.set_capabilities(**plan.capabilities)
        destination.migrate_incoming(f"tcp:{LOOPBACK}:0")
        target = f"tcp:{LOOPBACK}:{destination.incoming_port()}"
        if plan.capture_dir is not None:
            relay = start_relay(target, plan.capture_dir)
            target = relay.listen_uri
        try:
            source.wait_serial(1)  # the guest is up and dirtying before migration starts
            source.set_capabilities(**plan.capabilities)
            source.set_parameters(**plan.source_parameters)
            source.migrate(target)
            _run_precopy(source, plan.precopy_seconds)
            source.start_postcopy()
            source_info = source.wait_migration(timeout=plan.timeout)
            destination_info = destination.wait_migration(timeout=plan.timeout)
            capture = relay.join(timeout=30) if relay is not None else None
        finally:
            if relay is not None:
                relay.stop()
        destination.wait_runstate("running")
        markers_at_end = destination.serial_output().count(b"*")
        destination.wait_serial(markers_at_end + 2)
        destination.stop()
        dump_path = workdir / "destination.ram"
        dump = destination.pmemsave(spec.start, spec.end - spec.start, dump_path)
        picture = verify_counters(dump, spec.start, spec)
        return PostcopyResult(
            source_info=source_info,
            destination_info=destination_info,
            picture=picture,
            source_command=source.command_line(),
            destination_command=destination.command_line(),
            capture=capture,
            destination_serial_after=destination.serial_output().count(b"*") - markers_at_end,
            dump_path=dump_path,
            seconds=time.monotonic() - started,
        )


def _check_fits(spec: GuestSpec, memory_mib: int) -> None:
    if spec.end > highest_safe_end(memory_mib):
        raise ValueError(
            f"guest range ends at {spec.end:#x}, above {highest_safe_end(memory_mib):#x} "
            f"(firmware data in a {memory_mib} MiB guest)"
        )


def _run_precopy(source: Machine, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        status = source.query_migrate().get("status")
        if status not in ("setup", "active"):
            raise QemuError("source: migration", f"{status} before postcopy could start")
        time.sleep(0.05)


@dataclass(frozen=True)
class FilePlan:
    memory_mib: int = 32
    guest: GuestSpec = field(default_factory=lambda: GuestSpec(end=8 * MIB))
    # Generous, so precopy of the running, dirtying guest converges after a pass or two.
    downtime_limit_ms: int = 2000
    timeout: float = 120.0


@dataclass
class FileResult:
    source_info: dict[str, Any]
    destination_info: dict[str, Any]
    picture: CounterPicture
    source_command: list[str]
    destination_command: list[str]
    migrate_uri: str
    incoming_uri: str
    seconds: float


def run_precopy_to_file(plan: FilePlan, stream_path: Path, workdir: Path) -> FileResult:
    """Migrate the running guest into ``stream_path`` ("exec:cat > FILE"), then load that file
    into a fresh destination and check its memory with the oracle."""
    started = time.monotonic()
    spec = plan.guest
    _check_fits(spec, plan.memory_mib)
    stream_path.unlink(missing_ok=True)
    migrate_uri = f"exec:cat > {stream_path}"
    incoming_uri = f"exec:cat {stream_path}"
    with Machine(MachineConfig("source", plan.memory_mib, spec), workdir).start() as source:
        source.wait_serial(1)
        source.set_parameters(downtime_limit=plan.downtime_limit_ms)
        source.migrate(migrate_uri)
        source_info = source.wait_migration(timeout=plan.timeout)
        source_command = source.command_line()
    destination = Machine(
        MachineConfig("destination", plan.memory_mib, spec, incoming="defer"), workdir
    )
    with destination.start():
        destination.migrate_incoming(incoming_uri)
        destination_info = destination.wait_migration(timeout=plan.timeout)
        destination.stop()
        dump_path = workdir / "destination.ram"
        dump = destination.pmemsave(spec.start, spec.end - spec.start, dump_path)
        dump_path.unlink()
        picture = verify_counters(dump, spec.start, spec)
        return FileResult(
            source_info=source_info,
            destination_info=destination_info,
            picture=picture,
            source_command=source_command,
            destination_command=destination.command_line(),
            migrate_uri=migrate_uri,
            incoming_uri=incoming_uri,
            seconds=time.monotonic() - started,
        )
