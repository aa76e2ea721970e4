"""The generated dissector carries each profile's numbers, and differs where the profiles do."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from dissecting import FIXTURES, dissected_counts, export, inspect_json, qmig, qmig_ok

from qmig.wire.profiles import available_versions, load_profile
from qmig.wireshark.dissector import profile_table, render


def test_each_profile_s_numbers_are_in_its_dissector() -> None:
    for version in available_versions():
        profile = load_profile(version)
        table = profile_table(profile)
        assert {spec["name"]: number for number, spec in table["commands"].items()} == (
            profile.commands
        )
        assert {spec["name"]: number for number, spec in table["rp_messages"].items()} == (
            profile.rp_messages
        )
        assert table["ram_flags"] == profile.ram_flags
        assert table["section_types"] == profile.section_types
        assert f'name = "{version}"' in render(version)


def profile_text(version: str) -> str:
    """The generated PROFILE table of a version's dissector (the rest is the same code)."""
    text = render(version)
    start = text.index("local PROFILE = {")
    return text[start : text.index("\n}\n", start)]


def test_the_dissectors_differ_where_the_profiles_do() -> None:
    newest, v72, v29 = profile_text("10.0"), profile_text("7.2"), profile_text("2.9")
    assert "SWITCHOVER_START" in newest and "SWITCHOVER_START" not in v72
    assert "SWITCHOVER_ACK" in newest and "SWITCHOVER_ACK" not in v72
    assert "MULTIFD_FLUSH = 0x200" in newest and "MULTIFD_FLUSH" not in v72
    assert "COMPRESS_PAGE = 0x100" in v72 and "COMPRESS_PAGE" not in newest
    assert "POSTCOPY_RESUME" in v72 and "POSTCOPY_RESUME" not in v29
    assert profile_table(load_profile("2.9"))["commands"][3]["lengths"] == [16]
    assert profile_table(load_profile("7.2"))["commands"][3]["lengths"] == [0, 16]
    assert profile_table(load_profile("2.9"))["packaged_max"] == 0x1000000
    assert profile_table(load_profile("2.9"))["configuration_required"] is False


def test_export_pcap_writes_the_dissector_of_the_chosen_version(tmp_path: Path) -> None:
    qmig_ok("export-pcap", "--lua", str(tmp_path / "d.lua"), "--qemu-version", "2.9")
    assert (tmp_path / "d.lua").read_text() == render("2.9")
    result = qmig("export-pcap", "--lua", str(tmp_path / "x.lua"), "--qemu-version", "1.0")
    assert result.returncode == 1
    assert result.stderr.startswith("qmig: error: --qemu-version: unknown QEMU version '1.0'")
    assert "Traceback" not in result.stderr


def test_the_oldest_profile_s_dissector_reads_a_stream_it_can(
    tshark: str, lua_for: Callable[[str], Path], tmp_path: Path
) -> None:
    """QEMU 2.9's dissector (always-16-byte ADVISE, optional CONFIGURATION) on 7.2's stream."""
    pcapng = export(FIXTURES / "postcopy-tcp", tmp_path / "p.pcapng")
    stream, return_path, undecoded = dissected_counts(tshark, lua_for("2.9"), pcapng)
    expected = inspect_json(FIXTURES / "postcopy-tcp", "2.9")
    assert undecoded == []
    assert stream == expected["counts"]
    assert return_path == expected["return_path"]["counts"]


@pytest.mark.parametrize("command", [[], ["fixtures/postcopy-tcp"]])
def test_export_pcap_says_what_is_missing(command: list[str]) -> None:
    result = qmig("export-pcap", *command)
    assert result.returncode == 1
    assert result.stderr.startswith("qmig: error: export-pcap: ")
