"""qmig's pytest plugin (entry point ``pytest11``): peers that misbehave, for projects that
test their migration handling against a bad destination or source, and real QEMU.

- ``qmig_destination(**options)``: a ``qmig receive`` in the background on a free 127.0.0.1
  port (:class:`~qmig.plugin_peers.DestinationOptions`: version, recovery, page size, and
  the fault knobs ``reject``, ``stall_after``, ``stall_after_pages``, ``pause_after``,
  ``delay_requests_ms``, ``shut_status``; ``extra`` passes any other option through). It has
  ``uri``, ``wait()`` (the exit status, the ``--json`` report, the error line), ``ram()``
  and ``wait_paused()``.
- ``qmig_source(uri, capture=None, **options)``: ``qmig replay`` of a capture, or of a
  generated guest, into ``uri``, with ``cut_after_pages`` (and ``resume_to``),
  ``stall_after``, ``stall_for`` and ``corrupt``; ``postcopy_after``, ``bandwidth``.
- ``qemu(name, **MachineConfig fields)``: a real QEMU booting qmig's tiny test guest, with
  QMP (``machine.qmp("query-status")``, ``machine.migrate(uri)``, ...).

Everything started is stopped at the test's teardown. Importing the plugin imports nothing of
qmig: it costs nothing to the projects that have it installed and do not use it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from qmig.plugin_peers import QmigDestination, QmigSource
    from qmig.qemu.machine import Machine


@pytest.fixture
def qmig_destination(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., QmigDestination]]:
    """``qmig_destination(**options)`` starts a ``qmig receive`` and returns it, listening."""
    from qmig.plugin_peers import DestinationOptions, QmigDestination

    started: list[QmigDestination] = []

    def start(**options: Any) -> QmigDestination:
        workdir = tmp_path_factory.mktemp("qmig-destination")
        destination = QmigDestination(DestinationOptions(**options), workdir)
        started.append(destination)
        return destination

    yield start
    for destination in started:
        destination.stop()


@pytest.fixture
def qmig_source(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., QmigSource]]:
    """``qmig_source(uri, capture=None, **options)`` starts replaying ``capture`` into
    ``uri``; without a capture, a generated guest (``guest_mib`` MiB of ``pc.ram``, contents
    from ``seed``, its RAM in ``source.expected_ram``)."""
    from qmig.plugin_peers import QmigSource, SourceOptions

    started: list[QmigSource] = []

    def start(
        uri: str,
        capture: str | Path | None = None,
        *,
        guest_mib: int = 8,
        seed: int = 0,
        **options: Any,
    ) -> QmigSource:
        plan = SourceOptions(**options)
        expected = None
        if capture is None:
            from qmig.plugin_guest import generated_ram, write_generated_stream

            folder = tmp_path_factory.mktemp("qmig-guest")
            version = None if plan.qemu_version == "auto" else plan.qemu_version
            capture = write_generated_stream(folder / "stream.bin", guest_mib, seed, version)
            expected = generated_ram(guest_mib, seed)
        source = QmigSource(Path(capture), uri, plan)
        source.expected_ram = expected
        started.append(source)
        return source

    yield start
    for source in started:
        source.stop()


@pytest.fixture
def qemu(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Machine]]:
    """``qemu(name, **fields)`` starts a real QEMU (fields of
    :class:`~qmig.qemu.machine.MachineConfig`: ``memory_mib``, ``guest``, ``incoming``, ...)
    with the tiny test guest, QMP connected."""
    from qmig.qemu.machine import Machine, MachineConfig

    started: list[Machine] = []

    def start(name: str = "vm", **config: Any) -> Machine:
        machine = Machine(MachineConfig(name, **config), tmp_path_factory.mktemp(f"qemu-{name}"))
        started.append(machine)
        return machine.start()

    yield start
    for machine in started:
        machine.shutdown()
