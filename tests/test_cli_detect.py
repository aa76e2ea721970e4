"""``--qemu-version auto``: the wire profile chosen from what a stream shows.

Each shipped fixture is a real QEMU stream whose ``meta.json`` names the QEMU that wrote it;
detection must say the same. Streams for the other profiles are built with qmig's schemas
from each profile's own numbers (its commands, its PING inside PACKAGED).
"""

from __future__ import annotations

import json
import lzma
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from processes import started

from qmig.cli import main
from qmig.transport import Connection
from qmig.wire import messages as m
from qmig.wire.detect import PREFIX_BYTES, detect
from qmig.wire.profiles import DEFAULT_VERSION, available_versions, load_profile
from qmig.wire.schema import schema_for

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = sorted(path.parent for path in (ROOT / "fixtures").glob("*/meta.json"))


def fixture_version(folder: Path) -> str:
    text = json.loads((folder / "meta.json").read_text())["qemu_version"]
    match = re.search(r"version (\d+)\.(\d+)", text)
    assert match is not None, text
    return f"{match.group(1)}.{match.group(2)}"


def fixture_prefix(folder: Path) -> bytes:
    with lzma.open(folder / "stream.bin.xz") as file:
        return file.read(PREFIX_BYTES)


def only_in(version: str) -> tuple[str, int]:
    """A command that ``version``'s profile has and no other profile numbers the same."""
    profile = load_profile(version)
    others = [load_profile(v) for v in available_versions() if v != version]
    for name, number in profile.commands.items():
        if all(number not in other.command_names for other in others):
            return name, number
    pytest.skip(f"no command only {version} knows")


def build_stream(
    version: str,
    machine_type: str | None,
    *,
    switchover: bool = False,
    package_ping: int | None = None,
) -> bytes:
    schema = schema_for(version)
    profile = schema.profile
    out = bytearray(schema.header.build(m.StreamHeader(profile.stream_version)))
    if machine_type is not None:
        out += schema.configuration.build(m.Configuration(machine_type))
    block = m.RamBlockInfo("pc.ram", 16 * schema.target_page_size)
    out += schema.build_ram_setup(2, (block,))
    if package_ping is not None:
        # As QEMU packages it: ... PING, RUN (RUN ends the package's load).
        inner = schema.build_command(m.Ping(package_ping)) + schema.build_command(m.PostcopyRun())
        out += schema.build_packaged(inner)
    if switchover:
        out += schema.build_command(m.SwitchoverStart())
    out += bytes([profile.section_types["EOF"]])
    return bytes(out)


def inspect_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    assert main(["inspect", "--json", *args]) == 0
    report: dict[str, Any] = json.loads(capsys.readouterr().out)
    return report


@pytest.mark.parametrize("folder", FIXTURES, ids=lambda folder: folder.name)
def test_each_fixture_is_detected_as_the_qemu_that_wrote_it(folder: Path) -> None:
    detection = detect(fixture_prefix(folder))
    assert detection.version == fixture_version(folder)
    assert "machine type pc-i440fx-" in detection.evidence


@pytest.mark.parametrize("folder", FIXTURES, ids=lambda folder: folder.name)
def test_inspect_detects_by_default_and_with_auto(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stream = tmp_path / "stream.bin"
    with lzma.open(folder / "stream.bin.xz") as file:
        stream.write_bytes(file.read())
    for args in ([], ["--qemu-version", "auto"]):
        report = inspect_json(capsys, *args, str(stream))
        assert report["qemu_version"] == fixture_version(folder)
        assert report["qemu_version_evidence"].startswith("detected: machine type")
    given = inspect_json(capsys, "--qemu-version", "10.0", str(stream))
    assert given["qemu_version"] == "10.0"
    assert given["qemu_version_evidence"] == "given with --qemu-version"


def test_a_command_only_one_version_knows_decides() -> None:
    name, _ = only_in("10.0")
    assert name == "SWITCHOVER_START"
    # Even under an older machine type: the older profiles cannot read the stream.
    detection = detect(build_stream("10.0", "pc-i440fx-7.2", switchover=True), complete=True)
    assert detection.version == "10.0"
    assert detection.evidence.startswith("only 10.0 reads its first bytes (7.2: unknown command")


@pytest.mark.parametrize(
    ("machine_type", "expected"),
    [
        ("pc-q35-10.0", "10.0"),
        ("pc-i440fx-10.1", "10.0"),
        ("pc-i440fx-9.2", "7.2"),
        ("pc-i440fx-7.2", "7.2"),
        ("pc-q35-2.12", "2.9"),
        ("pc-i440fx-2.9", "2.9"),
        ("pc-i440fx-1.4", "2.9"),  # older than every profile: the oldest
        ("microvm", DEFAULT_VERSION),  # no version in the name
    ],
)
def test_the_machine_type_picks_the_newest_profile_not_newer(
    machine_type: str, expected: str
) -> None:
    detection = detect(build_stream("7.2", machine_type), complete=True)
    assert (detection.version, detection.readers) == (expected, available_versions())


def test_no_configuration_leaves_the_versions_where_it_is_optional() -> None:
    optional = [v for v in available_versions() if load_profile(v).configuration == "optional"]
    detection = detect(build_stream(optional[0], None), complete=True)
    assert detection.readers == optional and detection.version == optional[-1]


def test_the_ping_inside_packaged_names_its_version() -> None:
    pinging = [v for v in available_versions() if load_profile(v).package_loaded_ping is not None]
    version = pinging[-1]
    ping = load_profile(version).package_loaded_ping
    assert ping is not None
    stream = build_stream(version, "pc-i440fx-7.2", package_ping=ping)
    assert detect(stream, complete=True).version == version
    assert detect(build_stream(version, "pc-i440fx-7.2", package_ping=3)).version == "7.2"


def test_a_contradicted_version_gets_a_hint_naming_the_one_that_reads(tmp_path: Path) -> None:
    stream = tmp_path / "ten.bin"
    stream.write_bytes(build_stream("10.0", "pc-q35-10.0", switchover=True))
    result = subprocess.run(
        [sys.executable, "-m", "qmig", "inspect", "--qemu-version", "7.2", str(stream)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    match = re.fullmatch(
        r"qmig: error: unknown command: MIG_CMD 0xb \(len 0x0\) at byte (\d+); "
        r"--qemu-version 10.0 reads this stream past byte (\d+)",
        line,
    )
    assert match is not None, line
    assert match.group(1) == match.group(2)
    # auto reads it.
    assert (
        subprocess.run(
            [sys.executable, "-m", "qmig", "inspect", "--json", str(stream)],
            capture_output=True,
            timeout=60,
            cwd=ROOT,
        ).returncode
        == 0
    )


def test_no_hint_when_no_profile_reads_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = lzma.decompress((ROOT / "fixtures/precopy-known/stream.bin.xz").read_bytes())
    stream = tmp_path / "cut.bin"
    stream.write_bytes(data[: len(data) // 2])
    assert main(["inspect", "--json", "--qemu-version", "7.2", str(stream)]) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert "unexpected end of stream" in line and "--qemu-version" not in line


def test_a_live_source_is_peeked_without_consuming(tmp_path: Path) -> None:
    from qmig.cli.versions import peek_connection

    prefix = fixture_prefix(FIXTURES[0])
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(prefix)
        connection = Connection("test", ours)
        peeked = peek_connection(connection, timeout=5)
        assert detect(peeked).version == fixture_version(FIXTURES[0])
        assert connection.recv_exactly(len(peeked)) == peeked  # still there to read


def test_replay_reads_a_capture_with_its_detected_version() -> None:
    import argparse

    from qmig.cli.commands.replay import recorded_version

    folder = ROOT / "fixtures/postcopy-tcp"
    choice = recorded_version(argparse.Namespace(capture=folder, qemu_version="auto"))
    assert choice.version == fixture_version(folder) and not choice.given
    given = recorded_version(argparse.Namespace(capture=folder, qemu_version="10.0"))
    assert given.version == "10.0" and given.given


def test_commands_that_write_use_the_default() -> None:
    from qmig.cli.versions import default_choice

    assert default_choice("auto").version is None
    assert default_choice("7.2").version == "7.2"


def test_capture_records_the_detected_version_in_meta_json(tmp_path: Path) -> None:
    import threading

    from qmig.capture import Relay

    destination = socket.create_server(("127.0.0.1", 0))

    def sink() -> None:
        peer, _ = destination.accept()
        with peer:
            while peer.recv(1 << 20):
                pass

    threading.Thread(target=sink, daemon=True).start()
    folder = FIXTURES[0]
    stream = lzma.decompress((folder / "stream.bin.xz").read_bytes())
    out = tmp_path / "capture"
    with destination, Relay(f"tcp:127.0.0.1:{destination.getsockname()[1]}", out) as relay:
        relay.start()
        with socket.create_connection(("127.0.0.1", relay.port)) as source:
            source.sendall(stream)
            source.shutdown(socket.SHUT_WR)
            while source.recv(1 << 16):
                pass
        summary = relay.join(60)
    meta = json.loads((out / "meta.json").read_text())
    assert summary.qemu_version == meta["qemu_version"] == fixture_version(folder)
    assert meta["qemu_version_evidence"].startswith("machine type pc-i440fx-")


def test_receive_hints_from_the_first_bytes_it_peeked() -> None:
    with started(
        "receive", "--listen", "tcp:127.0.0.1:0", "--qemu-version", "7.2",
        "--workload", "none", "--accept-timeout", "30", "--idle-timeout", "30", cwd=ROOT,
    ) as (receiver, first):  # fmt: skip
        port = int(first.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as source:
            source.sendall(build_stream("10.0", "pc-q35-10.0", switchover=True))
            _, stderr = receiver.communicate(timeout=60)
    assert receiver.returncode == 1
    (line,) = stderr.splitlines()
    assert line.startswith("qmig: error: unknown command: MIG_CMD 0xb"), line
    assert line.endswith("; --qemu-version 10.0 reads this stream past byte 77"), line
