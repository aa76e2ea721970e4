"""What the benchmarks that migrate real QEMUs share: a QEMU 10.0 machine, a QEMU destination
waiting for an incoming migration (behind a ``qmig capture`` relay when asked), ``qmig
receive`` as the destination, and ``qmig inspect --json`` of a capture folder.

Each bench keeps its own source set-up (capabilities, caps, when to switch to postcopy): that
is what it measures. Every QEMU started here is shut down when its ``with`` block ends, the
receiver is killed whatever happens.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from qmig.capture import Relay
from qmig.qemu.guest import GuestSpec
from qmig.qemu.machine import Machine, MachineConfig

QEMU = "10.0"
LOCAL = "tcp:127.0.0.1:0"

T = TypeVar("T")


def machine(name: str, ram_mib: int, spec: GuestSpec | None, workdir: Path, **kw: Any) -> Machine:
    """A QEMU 10.0, not started yet: ``with machine(...) as m`` starts it and shuts it down."""
    return Machine(MachineConfig(name, ram_mib, spec, qemu_version=QEMU, **kw), workdir)


@dataclass
class Incoming:
    """A destination QEMU listening; ``uri`` is where the source migrates to (the relay's when
    the migration is captured)."""

    destination: Machine
    uri: str
    relay: Relay | None


@contextmanager
def qemu_destination(
    ram_mib: int,
    workdir: Path,
    timeout: float,
    *,
    name: str = "destination",
    spec: GuestSpec | None = None,
    capabilities: Mapping[str, bool],
    parameters: Mapping[str, Any] | None = None,
    capture: Path | None = None,
    relay: Mapping[str, Any] | None = None,
    extra_args: Sequence[str] = (),
) -> Iterator[Incoming]:
    """A QEMU 10.0 destination (``incoming=defer``; with ``spec``, the test guest's disk as
    the source has it), its migration ``capabilities`` and ``parameters`` set, listening on a
    free local port; with ``capture``, a ``Relay(**relay)`` in front of it recording into
    that folder, joined once the block is done; ``extra_args`` go on QEMU's command line."""
    with machine(
        name, ram_mib, spec, workdir, incoming="defer", extra_args=tuple(extra_args)
    ) as destination:
        if capabilities:
            destination.set_capabilities(**capabilities)
        if parameters:
            destination.set_parameters(**parameters)
        destination.migrate_incoming(LOCAL)
        uri = f"tcp:127.0.0.1:{destination.incoming_port()}"
        relaying = None if capture is None else Relay(uri, capture, **(relay or {})).start()
        yield Incoming(destination, uri if relaying is None else relaying.listen_uri, relaying)
        if relaying is not None:
            relaying.join(timeout)


def qmig_receive(
    args: Sequence[str], migrate: Callable[[str], T], timeout: float
) -> tuple[T, dict[str, Any]]:
    """``qmig receive --listen ... --json *args`` as the destination: ``migrate(uri)`` runs
    the source into it. Returns what ``migrate`` returned, and receive's summary."""
    receiver = subprocess.Popen(
        [sys.executable, "-m", "qmig", "receive", "--listen", LOCAL, "--json", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert receiver.stderr is not None
        result = migrate(receiver.stderr.readline().split()[-1])
        stdout, stderr = receiver.communicate(timeout=timeout)
    finally:
        receiver.kill()
        receiver.wait()
    if receiver.returncode:
        raise SystemExit(f"qmig receive failed: {stderr.strip()}")
    return result, json.loads(stdout)


def inspect_json(folder: Path, timeout: float) -> dict[str, Any]:
    """``qmig inspect FOLDER --json`` of a capture."""
    inspected = subprocess.run(
        [sys.executable, "-m", "qmig", "inspect", str(folder), "--json"],
        capture_output=True, text=True, timeout=timeout, check=True,
    )  # fmt: skip
    result: dict[str, Any] = json.loads(inspected.stdout)
    return result
