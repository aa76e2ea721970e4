"""The default limit on the RAM a source may claim: the host's memory."""

from __future__ import annotations

from pathlib import Path

from qmig.runner.destination import host_memory


def test_host_memory_reads_memtotal(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16318440 kB\nMemFree:         1000 kB\n")
    assert host_memory(meminfo) == 16318440 * 1024
    meminfo.write_text("MemFree: 1000 kB\n")
    assert host_memory(meminfo) is None
    assert host_memory(tmp_path / "missing") is None


def test_this_host_has_some() -> None:
    memory = host_memory()
    assert memory is not None and memory > 64 << 20
