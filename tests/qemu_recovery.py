"""The steps of a postcopy recovery with real QEMU that the recovery tests share.

A real source: capped so that the pause lands mid-postcopy, paused (``migrate-pause``) and
resumed (``migrate`` with ``resume: true``) into ``qmig receive`` or ``qmig capture``. A real
destination: fed the recorded postcopy capture by ``qmig replay``, which cuts its channel,
and told ``migrate-recover`` where the replay reconnects."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from processes import qmig
from qemu_helpers import POSTCOPY, TIMEOUT, MachineFactory, free_port

from qmig.qemu.guest import MIB
from qmig.qemu.machine import Machine

PAUSED_LINE = "qmig receive: postcopy paused; waiting for the resumed source on "


def start_postcopy(
    source: Machine,
    uri: str,
    *,
    timeout: float = TIMEOUT,
    settle: float | None = None,
    destination_pauses: bool = False,
    **capabilities: bool,
) -> None:
    """Migrate ``source`` to ``uri`` with postcopy (and ``capabilities``) on; returns once
    it has been in postcopy-active for ``settle`` seconds (precopy ran as long before the
    switch). ``destination_pauses``: the destination cuts the channel a few pages into
    postcopy (``--pause-after``), which can come before a look at the source's state finds
    it in postcopy-active: postcopy-paused then shows it got there. ``settle``: by default
    half a second, or a tenth with postcopy-preempt: from QEMU 8.0 the requested pages go
    past the postcopy cap, so a guest that faults on everything can end postcopy within a
    second of the switch (0.3-1.1 s after half a second's settle, 1.2 s after a tenth's,
    10.0's preempt variant into ``qmig capture``), and a pause must come before that."""
    if settle is None:
        settle = 0.1 if capabilities.get("postcopy_preempt") else 0.5
    source.wait_serial(1)
    source.set_capabilities(postcopy_ram=True, **capabilities)
    # Precopy cannot converge and postcopy is slow: the pause lands mid-postcopy (as QEMU's
    # own recovery tests do with a low max-postcopy-bandwidth).
    source.set_parameters(max_bandwidth=32 * MIB, max_postcopy_bandwidth=4 * MIB)
    source.migrate(uri)
    time.sleep(settle)
    source.start_postcopy()
    reached = ("postcopy-active", "postcopy-paused") if destination_pauses else ("postcopy-active",)
    source.wait_migration(until=reached, timeout=timeout)
    time.sleep(settle)


def wait_paused_line(process: subprocess.Popen[str]) -> str:
    """``qmig receive``'s line saying it paused; the URI it waits on."""
    assert process.stderr is not None
    line = process.stderr.readline()
    assert line.startswith(PAUSED_LINE), line
    return line.split()[-1]


def resume(source: Machine, uri: str) -> dict[str, Any]:
    """Once the source is paused, resume it into ``uri``; its query-migrate at the end."""
    source.wait_migration(until=("postcopy-paused",), timeout=TIMEOUT)
    # The bandwidth cap goes, so the rest arrives quickly after the resume.
    source.set_parameters(max_postcopy_bandwidth=0)
    source.qmp("migrate", uri=uri, resume=True)
    return source.wait_migration(timeout=TIMEOUT)


def pause_and_resume(source: Machine, receive: subprocess.Popen[str], uri: str) -> dict[str, Any]:
    """``migrate-pause`` the source; ``receive`` must say it waits on ``uri``, where the
    source is resumed. The source's query-migrate at the end."""
    source.qmp("migrate-pause")
    assert wait_paused_line(receive) == uri
    return resume(source, uri)


def replay_destination(
    machines: MachineFactory,
    version: str | None,
    *,
    preempt: bool = False,
    blocktime: bool = False,
    extra_args: tuple[str, ...] = (),
) -> tuple[Machine, str]:
    """A QEMU ``version`` destination for the POSTCOPY capture, listening on a free port;
    returns it and its URI."""
    _capture, memory_mib, spec = POSTCOPY
    dest = machines(
        "destination",
        memory_mib=memory_mib,
        guest=spec,
        incoming="defer",
        extra_args=extra_args,
        qemu_version=version,
        machine_type="pc-i440fx-7.2",  # the capture's (10.0 reads 7.2's machine type)
    )
    capabilities = {"postcopy_ram": True, "postcopy_preempt": preempt}
    if blocktime:
        capabilities["postcopy_blocktime"] = True
    dest.set_capabilities(**capabilities)
    dest.migrate_incoming("tcp:127.0.0.1:0")
    return dest, f"tcp:127.0.0.1:{dest.incoming_port()}"


@contextmanager
def replaying(uri: str, wire: str, *args: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """``qmig replay`` of the POSTCOPY capture to ``uri``, capped, cutting its channel after
    300 postcopy pages (``args`` may say otherwise: the last ``--pause-after`` counts) and
    reconnecting to a free port; yields it and that port's URI (for ``migrate-recover``).
    The replay is killed on the way out."""
    resume_to = f"tcp:127.0.0.1:{free_port()}"
    process = subprocess.Popen(
        qmig("replay", str(POSTCOPY[0]), "--to", uri, "--qemu-version", wire, "--json",
             "--bandwidth", "16", "--pause-after", "300", "--resume-to", resume_to,
             "--resume-timeout", "30", *args),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        yield process, resume_to
    finally:
        process.kill()
        process.wait()


def replayed(process: subprocess.Popen[str]) -> dict[str, Any]:
    """The replay ended with 0; its JSON summary."""
    stdout, stderr = process.communicate(timeout=TIMEOUT)
    assert process.returncode == 0, stderr
    summary: dict[str, Any] = json.loads(stdout)
    return summary


def recover(dest: Machine, resume_to: str) -> None:
    """Wait for the destination to pause, then tell it where to listen."""
    dest.wait_migration(until=("postcopy-paused",), timeout=TIMEOUT)
    dest.qmp("migrate-recover", uri=resume_to)
