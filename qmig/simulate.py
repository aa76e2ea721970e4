"""``qmig simulate``: a qmig source and a qmig destination, in two processes, over TCP.

The source runs in this process on generated guest RAM that a dirtier keeps changing during
precopy. The destination runs in a child process (:mod:`qmig.runner.peer`) onto userfaultfd
RAM with a read-only guest workload, so every page it holds at the end must equal the
source's final copy: the child dumps its RAM once every page is in place, and this process
compares the dumps with the source's memory, page by page.
"""

from __future__ import annotations

import json
import mmap
import random
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qmig.errors import QmigError, VerificationError
from qmig.protocol.source import DeviceSnapshot, Source
from qmig.runner.source import SourcePlan, SourceRunner
from qmig.runner.source_ram import Dirtier, GuestRam
from qmig.transport import connect, listen

MiB = 1 << 20
TARGET_PAGE = 4096
PEER_TIMEOUT = 120.0


@dataclass
class SimulationConfig:
    blocks: list[tuple[str, int]] = field(
        default_factory=lambda: [("pc.ram", 224 * MiB), ("vga.vram", 32 * MiB)]
    )
    pattern: str = "random"
    vcpus: int = 2
    touches: int | None = None
    dirty_rate: float = 20000.0  # pages per second, on the source, until switchover
    postcopy_after: int | None = 1  # None: precopy only
    bandwidth: float | None = None  # bytes per second
    version: str | None = None
    seed: int = 1
    zero_fraction: float = 0.5


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
    config: SimulationConfig, on_progress: Callable[[str, int], None] | None = None
) -> dict[str, Any]:
    """Run one migration; return the summary (raises on failure or a verification error)."""
    ram = GuestRam.generate(config.blocks, zero_fraction=config.zero_fraction, seed=config.seed)
    with (
        tempfile.TemporaryDirectory(prefix="qmig-simulate-") as workdir,
        listen("tcp:127.0.0.1:0") as listener,
    ):
        dump_dir = Path(workdir) / "ram"
        assert listener.socket is not None
        command = [
            sys.executable,
            "-m",
            "qmig.runner.peer",
            "--fd",
            str(listener.socket.fileno()),
            "--pattern",
            config.pattern,
            "--vcpus",
            str(config.vcpus),
            "--dump-dir",
            str(dump_dir),
        ]
        if config.version:
            command += ["--qemu-version", config.version]
        if config.touches is not None:
            command += ["--touches", str(config.touches)]
        if config.postcopy_after is None:
            command.append("--precopy-only")
        peer = subprocess.Popen(
            command,
            pass_fds=(listener.socket.fileno(),),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            source_report, source = _run_source(config, ram, listener.uri, on_progress)
            destination, peer_error = _collect(peer)
        except QmigError as error:
            _, peer_error = _collect(peer, kill=True)
            if peer_error:
                raise QmigError(
                    "simulate", f"{error.one_line()}; destination: {peer_error}"
                ) from None
            raise
        finally:
            if peer.poll() is None:
                peer.kill()
                peer.wait()
        if peer_error or destination is None:
            raise QmigError("simulate", f"destination failed: {peer_error or 'no report'}")
        mismatches = verify(ram, dump_dir)
    summary = _summary(config, source, source_report, destination, mismatches)
    if mismatches:
        first = mismatches[0]
        raise VerificationError(
            "verify",
            f"{len(mismatches)} pages differ between source and destination; first: "
            f"{first[0]} page {first[1]:#x}",
        )
    return summary


def _run_source(
    config: SimulationConfig,
    ram: GuestRam,
    uri: str,
    on_progress: Callable[[str, int], None] | None,
) -> tuple[Any, Source]:
    source = Source(
        ram.blocks,
        version=config.version,
        postcopy_ram=config.postcopy_after is not None,
        devices=default_devices(config.seed),
    )
    dirtier = Dirtier(ram, config.dirty_rate, seed=config.seed + 1) if config.dirty_rate else None
    plan = SourcePlan(postcopy_after=config.postcopy_after, bandwidth=config.bandwidth)
    with connect(uri) as connection:
        runner = SourceRunner(connection, source, plan, dirtier=dirtier, on_progress=on_progress)
        report = runner.run()
    return report, source


def _collect(peer: subprocess.Popen[str], kill: bool = False) -> tuple[dict[str, Any] | None, str]:
    """The destination's report, or its one-line error."""
    try:
        stdout, stderr = peer.communicate(timeout=5.0 if kill else PEER_TIMEOUT)
    except subprocess.TimeoutExpired:
        peer.kill()
        stdout, stderr = peer.communicate()
        return None, "did not finish in time"
    error = " ".join(line.removeprefix("qmig: error: ") for line in stderr.splitlines() if line)
    if peer.returncode != 0:
        return None, error or f"exited with status {peer.returncode}"
    try:
        return json.loads(stdout), ""
    except ValueError:
        return None, f"unreadable report: {stdout[:200]!r}"


def verify(ram: GuestRam, dump_dir: Path) -> list[tuple[str, int]]:
    """Pages that differ between the source's memory and the destination's dump."""
    mismatches: list[tuple[str, int]] = []
    for block, memory in zip(ram.blocks, ram.maps, strict=True):
        path = dump_dir / (block.idstr.replace("/", "_") + ".bin")
        if not path.exists():
            raise VerificationError("verify", f"the destination did not dump {block.idstr!r}")
        with path.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as dump:
            if len(dump) < block.used_length:
                raise VerificationError(
                    "verify", f"{block.idstr!r}: dump has {len(dump)} of {block.used_length} bytes"
                )
            if dump[: block.used_length] == memory[: block.used_length]:
                continue
            step = 256 * TARGET_PAGE
            for chunk in range(0, block.used_length, step):
                if dump[chunk : chunk + step] == memory[chunk : chunk + step]:
                    continue
                for page in range(chunk, min(chunk + step, block.used_length), TARGET_PAGE):
                    if dump[page : page + TARGET_PAGE] != memory[page : page + TARGET_PAGE]:
                        mismatches.append((block.idstr, page))
    return mismatches


def _percentile(samples: list[int], fraction: float) -> int:
    if not samples:
        return 0
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def _summary(
    config: SimulationConfig,
    source: Source,
    report: Any,
    destination: dict[str, Any],
    mismatches: list[tuple[str, int]],
) -> dict[str, Any]:
    stats = source.stats
    faults = destination.get("faults") or {}
    latency = faults.get("latency_ns") or {}
    sent_ns = destination.get("request_sent_ns") or []
    downtime = None
    if report.stopped is not None and destination.get("running_at") is not None:
        downtime = (destination["running_at"] - report.stopped) * 1000
    total_pages = sum(size for _, size in config.blocks) // TARGET_PAGE
    return {
        "verified": not mismatches,
        "mismatched_pages": len(mismatches),
        "mode": "precopy" if config.postcopy_after is None else "postcopy",
        "qemu_version": source.profile.name,
        "ram_bytes": sum(size for _, size in config.blocks),
        "blocks": {name: size for name, size in config.blocks},
        "total_s": round(max(report.finished, destination["finished"]) - report.started, 3),
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
        "fault_latency_us": {
            "p50": round(latency.get("p50_ns", 0) / 1000, 1),
            "p99": round(latency.get("p99_ns", 0) / 1000, 1),
            "max": round(latency.get("max_ns", 0) / 1000, 1),
        },
        "request_sent_us": {
            "p50": round(_percentile(sent_ns, 0.5) / 1000, 1),
            "p99": round(_percentile(sent_ns, 0.99) / 1000, 1),
        },
        "blocktime_ms": round(faults.get("blocktime_ns", 0) / 1e6, 2),
        "pages_total": total_pages,
        "pongs": report.pongs,
        "workload": {"pattern": config.pattern, "vcpus": config.vcpus, "writes": False},
    }


def environment_check() -> None:
    """Fail early, in one line, where this host cannot run the destination."""
    from qmig.ram.uffd import probe

    probe()


__all__ = ["SimulationConfig", "run_simulation", "verify"]
