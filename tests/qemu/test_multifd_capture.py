"""``qmig capture --multifd 2`` between two real QEMUs (10.0, two channels): the relay takes the
main connection and both multifd channels, the destination's RAM equals the source's, and
``qmig inspect DIR`` reads every byte of the folder, the channels on one timeline with the
stream's sync points, pages per channel adding up to what each file carried. The same folder
(captured once for the module) is then replayed over two multifd channels into a fresh real
QEMU, whose RAM must equal the captured source's, and exported as pcapng for tshark with
qmig's dissector, whose handshake, packet, page and sync counts must equal inspect's. A QEMU
7.2 multifd migration is captured and inspected the same way, with 7.2's own rules."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from qemu_helpers import need
from test_receive_real import MachineFactory

from qmig.capture import read_capture
from qmig.capture.recording import Direction, read_index
from qmig.qemu.guest import MIB, GuestSpec
from qmig.qemu.machine import Machine, MachineConfig

VERSION = "10.0"
MEMORY_MIB = 32
SPEC = GuestSpec(end=8 * MIB)
TIMEOUT = 300


def qmig(*args: str) -> list[str]:
    return [sys.executable, "-m", "qmig", *args]


@dataclass(frozen=True)
class Captured:
    """A real multifd migration's capture folder, with what came with it."""

    folder: Path
    summary: dict[str, object]  # capture --json
    source_ram: bytes  # the stopped source's RAM above 1 MiB
    destination_ram: bytes  # the (paused) destination's, after the migration


def _machine(folder: Path, name: str, **config: object) -> Machine:
    return Machine(MachineConfig(name, **config), folder)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def captured(tmp_path_factory: pytest.TempPathFactory) -> Captured:
    """One real QEMU 10.0 → QEMU 10.0 multifd migration through ``qmig capture``, for every
    test of the module; both QEMUs are stopped before the first test runs."""
    return capture_migration(tmp_path_factory.mktemp("multifd-capture"), VERSION)


def capture_migration(work: Path, version: str) -> Captured:
    """A real QEMU ``version`` → QEMU ``version`` migration over two multifd channels through
    ``qmig capture --multifd 2``; both QEMUs stopped when it returns."""
    qemu_version = need(version)
    started: list[Machine] = []
    relay: subprocess.Popen[str] | None = None
    try:
        destination = _machine(
            work, "destination", memory_mib=MEMORY_MIB, guest=SPEC, incoming="defer",
            paused=True, qemu_version=qemu_version,
        )  # fmt: skip
        started.append(destination)
        destination.start()
        destination.set_capabilities(multifd=True)
        destination.set_parameters(multifd_channels=2)
        destination.migrate_incoming("tcp:127.0.0.1:0")
        out = work / "capture"
        relay = subprocess.Popen(
            qmig("capture", "--listen", "tcp:127.0.0.1:0", "--multifd", "2",
                 "--connect", f"tcp:127.0.0.1:{destination.incoming_port()}",
                 "--out", str(out), "--json"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert relay.stderr is not None
        listening = relay.stderr.readline().strip()
        source = _machine(
            work, "source", memory_mib=MEMORY_MIB, guest=SPEC, qemu_version=qemu_version
        )
        started.append(source)
        source.start()
        source.wait_serial(1)
        source.set_capabilities(multifd=True)
        source.set_parameters(multifd_channels=2, downtime_limit=2000)
        source.migrate(listening.rsplit(" ", 1)[1])
        source.wait_migration(timeout=60)
        destination.wait_migration(timeout=60)
        stdout, stderr = relay.communicate(timeout=60)
        assert relay.returncode == 0, stderr
        expected = source.pmemsave(MIB, (MEMORY_MIB - 1) * MIB, work / "source.ram")
        received = destination.pmemsave(MIB, (MEMORY_MIB - 1) * MIB, work / "dest.ram")
    finally:
        if relay is not None:
            relay.kill()
            relay.wait()
        for machine in started:
            machine.shutdown()
    return Captured(out, json.loads(stdout), expected, received)


@pytest.mark.qemu
def test_capture_and_inspect_a_real_multifd_migration(captured: Captured) -> None:
    summary = captured.summary
    assert summary["clean"] is True
    multifd_ends = summary["multifd"]
    assert isinstance(multifd_ends, list)
    assert [channel["end"] for channel in multifd_ends] == ["eof", "eof"]
    # The destination (kept paused) holds what the stopped source holds.
    assert captured.destination_ram == captured.source_ram
    out = captured.folder

    # The folder: both multifd files beside the stream, in the index and meta.json.
    files = [out / "multifd-0.bin", out / "multifd-1.bin"]
    sizes = [path.stat().st_size for path in files]
    assert all(size > 0 for size in sizes)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["multifd"]["files"] == ["multifd-0.bin", "multifd-1.bin"]
    assert [meta["directions"][f"multifd-{k}"]["bytes"] for k in range(2)] == sizes
    directions = {chunk.direction for chunk in read_index(out / "index.tsv")}
    assert {Direction("multifd-0"), Direction("multifd-1"), Direction.STREAM} <= directions
    capture = read_capture(out)

    result = subprocess.run(
        qmig("inspect", str(out), "--json"), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["bytes"] == len(capture.stream)
    multifd = report["multifd"]
    assert [channel["bytes"] for channel in multifd["channels"]] == sizes  # every byte
    assert sorted(channel["id"] for channel in multifd["channels"]) == [0, 1]
    assert multifd["syncs_match"] and len(multifd["sync_points"]) >= 3
    assert multifd["flush_after_each_section"] is False  # pc = pc-i440fx-10.0: MULTIFD_FLUSH
    assert {point["name"] for point in multifd["sync_points"]} == {"MULTIFD_FLUSH"}
    # Pages: normal pages in packets fill each file with their data; zero pages are listed.
    page = 4096
    for channel, size in zip(multifd["channels"], sizes, strict=True):
        packets = channel["packets"]
        assert size == 64 + packets * (320 + 8 * 128) + channel["pages"] * page
    pages = multifd["pages"]
    total = sum(pages.values())
    # Every page of guest RAM went once at least; the main channel carries none (10.0 lists
    # zero pages in packets).
    assert pages["main"] == 0 and total >= MEMORY_MIB * MIB // page

    text = subprocess.run(qmig("inspect", str(out)), capture_output=True, text=True, timeout=120)
    assert text.returncode == 0, text.stderr
    assert "multifd-1" in text.stdout and "MULTIFD_PACKET SYNC" in text.stdout
    assert "MULTIFD_FLUSH" in text.stdout


def inspect_multifd(folder: Path) -> dict[str, object]:
    result = subprocess.run(
        qmig("inspect", str(folder), "--json"), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    multifd: dict[str, object] = json.loads(result.stdout)["multifd"]
    return multifd


@pytest.mark.qemu
def test_a_real_multifd_capture_replays_into_a_real_destination(
    captured: Captured, machines: MachineFactory
) -> None:
    """The folder's main channel and both multifd channels, merged in sync order, migrate
    over two multifd channels into a fresh QEMU 10.0: its RAM is the captured source's."""
    destination = machines(
        "replayed", memory_mib=MEMORY_MIB, guest=SPEC, incoming="defer", paused=True,
        qemu_version=VERSION,
    )  # fmt: skip
    destination.set_capabilities(multifd=True)
    destination.set_parameters(multifd_channels=2)
    destination.migrate_incoming("tcp:127.0.0.1:0")
    result = subprocess.run(
        qmig("replay", str(captured.folder), "--to",
             f"tcp:127.0.0.1:{destination.incoming_port()}", "--qemu-version", VERSION,
             "--multifd", "2", "--json"),
        capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["mode"] == "precopy"
    sent = summary["multifd"]
    assert sent["channels"] == 2 and all(pages > 0 for pages in sent["pages_per_channel"])
    # The captured source's machine type (pc-i440fx-10.0) lists zero pages in the packets.
    assert sent["zero_page_detection"] == "multifd" and sent["zero_pages"] > 0
    destination.wait_migration(timeout=60)
    folder = captured.folder.parent
    ram = destination.pmemsave(MIB, (MEMORY_MIB - 1) * MIB, folder / "replayed.ram")
    assert ram == captured.source_ram


@pytest.mark.qemu
def test_tshark_dissects_a_real_multifd_capture_as_inspect_counts_it(
    captured: Captured, tmp_path: Path
) -> None:
    """``qmig export-pcap`` of the real folder, read by tshark with the generated dissector:
    one handshake per channel, and as many packets, normal and zero pages and SYNCs as
    ``qmig inspect --json`` counts in the channel files."""
    tshark = shutil.which("tshark")
    if tshark is None:
        if os.environ.get("CI"):  # scripts/setup installs it there
            pytest.fail("tshark is not installed: run scripts/setup")
        pytest.skip("tshark is not installed (scripts/setup installs it)")
    lua, pcapng = tmp_path / "qmig.lua", tmp_path / "capture.pcapng"
    for args in (
        ("export-pcap", "--lua", str(lua), "--qemu-version", VERSION),
        ("export-pcap", str(captured.folder), str(pcapng)),
    ):
        done = subprocess.run(qmig(*args), capture_output=True, text=True, timeout=TIMEOUT)
        assert done.returncode == 0, done.stderr
    fields = [
        "qmig.channel", "qmig.record", "qmig.multifd.normal_pages", "qmig.multifd.zero_pages",
        "qmig.multifd.sync", "qmig.undecoded",
    ]  # fmt: skip
    done = subprocess.run(
        [tshark, "-n", "-X", f"lua_script:{lua}", "-r", str(pcapng), "-T", "fields",
         "-E", "occurrence=a", "-E", "aggregator=\x1f",
         *(arg for field in fields for arg in ("-e", field))],
        capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "Lua" not in done.stderr, done.stderr  # a script error is only a warning line
    # Per field, every value it took in a multifd connection's frames.
    values: list[list[str]] = [[] for _ in fields]
    for line in done.stdout.splitlines():
        cells = [[v for v in cell.split("\x1f") if v] for cell in line.split("\t")]
        if cells and cells[0][:1] == ["multifd"]:
            for index, cell in enumerate(cells):
                values[index] += cell
    records, normal, zero, syncs, undecoded = values[1:]
    assert undecoded == []
    multifd = inspect_multifd(captured.folder)
    channels = multifd["channels"]
    assert isinstance(channels, list) and len(channels) == 2
    assert records.count("MULTIFD_INIT") == len(channels)
    assert records.count("MULTIFD_PACKET") == sum(c["packets"] for c in channels)
    assert sum(map(int, normal)) == sum(c["pages"] for c in channels) > 0
    assert sum(map(int, zero)) == sum(c["zero_pages"] for c in channels) > 0
    assert sum(v in ("1", "True") for v in syncs) == sum(c["syncs"] for c in channels) > 0


@pytest.mark.qemu
def test_report_of_a_real_multifd_capture(captured: Captured, tmp_path: Path) -> None:
    """``qmig inspect DIR --report`` of the real folder, drawn in headless Chromium: a line
    with points for each channel inspect counts, carrying that channel's bytes, and a mark for
    each of the stream's MULTIFD_FLUSH sync points."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if os.environ.get("CI"):  # scripts/setup installs it there
            pytest.fail("chromium is not installed: run scripts/setup")
        pytest.skip("chromium is not installed (scripts/setup installs it)")
    sys.path.insert(0, str(Path(__file__).parents[1] / "report"))
    from report_page import check_drawn, multifd_drawn, render  # the report tests' reader

    page = tmp_path / "capture.html"
    done = subprocess.run(
        qmig("inspect", str(captured.folder), "--json", "--report", str(page)),
        capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    multifd = json.loads(done.stdout)["multifd"]
    drawn = render(chromium, page, tmp_path / "profile")
    check_drawn(drawn)
    lines = multifd_drawn(drawn)
    assert len(lines) == len(multifd["channels"]) == 2
    assert all(vertices > 0 for vertices in lines.values()), lines
    series = {s["name"]: s["bytes"] for s in drawn.document["series"]}
    assert [series[c["direction"]] for c in multifd["channels"]] == [
        c["bytes"] for c in multifd["channels"]
    ]
    assert len(drawn.document["syncs"]) == len(multifd["sync_points"]) >= 3


@pytest.mark.qemu
def test_capture_and_inspect_a_real_qemu_7_2_multifd_migration(tmp_path: Path) -> None:
    """QEMU 7.2's multifd through the relay: zero pages as ZERO records on the main channel,
    the channels synced at each RAM section's EOS (7.2 has no MULTIFD_FLUSH)."""
    captured = capture_migration(tmp_path, "7.2")
    assert captured.summary["clean"] is True
    assert captured.destination_ram == captured.source_ram
    out = captured.folder
    sizes = [(out / f"multifd-{k}.bin").stat().st_size for k in range(2)]
    assert all(size > 0 for size in sizes)
    multifd = inspect_multifd(out)
    channels = multifd["channels"]
    assert isinstance(channels, list)
    assert [channel["bytes"] for channel in channels] == sizes  # every byte accounted for
    assert multifd["syncs_match"] and multifd["flush_after_each_section"] is True
    points = multifd["sync_points"]
    assert isinstance(points, list) and len(points) >= 3
    assert {point["name"] for point in points} == {"EOS"}
    pages = multifd["pages"]
    assert isinstance(pages, dict)
    assert pages["main"] > 0  # 7.2's zero pages
    assert sum(pages.values()) >= MEMORY_MIB * MIB // 4096
