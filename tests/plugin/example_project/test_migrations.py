"""An outside project's migration tests, written with qmig's pytest plugin only: a real QEMU
migrates into a qmig destination that misbehaves, and a qmig source migrates into a real QEMU.

(No conftest.py: the fixtures come from the installed plugin. QMIG_EXAMPLE_CAPTURE names a
capture of the test guest to replay, 64 MiB of RAM, counters up to 40 MiB.)
"""

from __future__ import annotations

import os
import time

import pytest

from qmig.qemu.guest import MIB, GuestSpec
from qmig.qemu.machine import QemuError
from qmig.qemu.oracle import verify_counters

MEMORY_MIB = 64
SPEC = GuestSpec(end=24 * MIB)


def start_source(qemu, uri, *, postcopy_bandwidth=0):
    source = qemu("source", memory_mib=MEMORY_MIB, guest=SPEC)
    source.wait_serial(1)
    source.set_capabilities(postcopy_ram=True)
    source.set_parameters(max_bandwidth=32 * MIB, max_postcopy_bandwidth=postcopy_bandwidth)
    source.migrate(uri)
    return source


def test_a_refused_postcopy_advise_fails_the_migration(qemu, qmig_destination):
    destination = qmig_destination(qemu_version="7.2", reject="POSTCOPY_ADVISE")
    source = start_source(qemu, destination.uri)
    with pytest.raises(QemuError, match="failed"):
        source.wait_migration(timeout=60)
    result = destination.wait()
    assert result.returncode != 0
    # QEMU's refusal, at the command's offset in the stream.
    assert "POSTCOPY_ADVISE" in result.error and "wrong postcopy state" in result.error
    assert "at byte" in result.error
    assert source.status() == "running"  # the source goes on, as after any failed migration


def test_a_channel_cut_in_postcopy_recovers(qemu, qmig_destination, tmp_path):
    destination = qmig_destination(qemu_version="7.2", recovery=True, pause_after=64)
    source = start_source(qemu, destination.uri, postcopy_bandwidth=4 * MIB)
    time.sleep(0.5)
    source.start_postcopy()
    resume_to = destination.wait_paused(timeout=60)
    source.wait_migration(until=("postcopy-paused",), timeout=60)
    source.set_parameters(max_postcopy_bandwidth=0)
    source.qmp("migrate", uri=resume_to, resume=True)
    source.wait_migration(timeout=60)
    report = destination.wait().report
    assert report["mode"] == "postcopy" and report["recoveries"] == 1
    received = destination.ram("pc.ram")
    expected = source.pmemsave(MIB, (MEMORY_MIB - 1) * MIB, tmp_path / "source.ram")
    assert received[MIB:] == expected


def test_a_stalled_destination_holds_the_source_back(qemu, qmig_destination):
    destination = qmig_destination(qemu_version="7.2", stall_after=4 * MIB, stall_for=4)
    source = start_source(qemu, destination.uri)
    time.sleep(1.5)  # the socket buffers fill up past the stall point
    before = source.query_migrate()["ram"]["transferred"]
    time.sleep(1.0)
    assert source.query_migrate()["ram"]["transferred"] == before  # nothing moves
    source.set_parameters(downtime_limit=2000)
    source.wait_migration(timeout=60)  # the stall ends, and the migration with it
    report = destination.wait().report
    assert report["mode"] == "precopy" and report["bytes"] > before


def test_a_replayed_migration_runs_in_real_qemu(qemu, qmig_source, tmp_path):
    guest = GuestSpec(end=40 * MIB)
    destination = qemu("destination", memory_mib=64, guest=guest, incoming="defer")
    destination.set_capabilities(postcopy_ram=True)
    destination.migrate_incoming("tcp:127.0.0.1:0")
    uri = f"tcp:127.0.0.1:{destination.incoming_port()}"
    source = qmig_source(uri, os.environ["QMIG_EXAMPLE_CAPTURE"], qemu_version="7.2")
    assert source.wait().returncode == 0, source.stderr
    destination.wait_migration(timeout=60)
    destination.wait_runstate("running")
    markers = destination.serial_output().count(b"*")
    destination.wait_serial(markers + 2)
    destination.stop()
    dump = destination.pmemsave(guest.start, guest.end - guest.start, tmp_path / "dest.ram")
    verify_counters(dump, guest.start, guest)


def test_a_corrupted_command_fails_the_real_destination(qemu, qmig_source):
    destination = qemu("destination", memory_mib=64, guest=None, incoming="defer")
    destination.set_capabilities(postcopy_ram=True)
    destination.migrate_incoming("tcp:127.0.0.1:0")
    uri = f"tcp:127.0.0.1:{destination.incoming_port()}"
    source = qmig_source(
        uri, os.environ["QMIG_EXAMPLE_CAPTURE"], qemu_version="7.2", corrupt="POSTCOPY_ADVISE"
    )
    assert source.wait().returncode != 0
    destination.process.wait(30)  # a failed incoming migration ends QEMU
    assert "CMD_POSTCOPY_ADVISE invalid length (1)" in destination.log_tail(20)
