"""Differential fuzzing against real QEMU 7.2 and 10.0: a bounded campaign, and each quirk on
its own, for each version.

Every case goes to a fresh ``qemu-system-x86_64 -incoming`` of that version (started with the
machine type the stream names) and to qmig's destination with the same ``--qemu-version``.
The campaign must end with no disagreement that a quirk of ``formats/qemu-VERSION.toml`` does
not explain; each quirk is then shown to be real with a case built for it (see
``formats/quirks.md``). QEMU 10.0 comes from scripts/fetch-qemu-10.0: where it is missing its
tests fail under CI and are skipped elsewhere.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from qmig.fuzz import differential as d
from qmig.qemu.machine import QEMU_BINARY, qemu_install, running_qemu_pids
from qmig.qemu.qmp import QemuError

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.timeout(240),
    pytest.mark.skipif(
        shutil.which(QEMU_BINARY) is None and not os.environ.get("CI"),
        reason=f"{QEMU_BINARY} is not installed",
    ),
]

VERSIONS = ["7.2", "10.0"]

PAGE = 4096
CAMPAIGN_CASES = 32
CAMPAIGN_SEED = 20261126


@pytest.fixture(params=VERSIONS)
def version(request: pytest.FixtureRequest) -> str:
    """The QEMU version a test runs against (both the QEMU started and qmig's profile)."""
    try:
        qemu_install(request.param)
    except QemuError as error:
        if os.environ.get("CI"):
            pytest.fail(str(error))
        pytest.skip(str(error))
    return str(request.param)


@pytest.fixture(autouse=True)
def no_qemu_left(tmp_path: Path) -> object:
    before = set(running_qemu_pids(parent=os.getpid()))
    yield
    assert set(running_qemu_pids(parent=os.getpid())) <= before


def test_a_bounded_campaign_has_no_unexplained_disagreement(version: str) -> None:
    started = time.monotonic()
    report = d.campaign(CAMPAIGN_CASES, version, CAMPAIGN_SEED, jobs=3)
    assert len(report.results) == CAMPAIGN_CASES
    unexplained = [
        f"case {r.case.number}: QEMU {r.qemu} ({r.qemu_detail}), qmig {r.qmig} "
        f"({r.qmig_detail}): {' '.join(r.case.steps)}"
        for r in report.unexplained
    ]
    assert not unexplained, "\n".join(unexplained)
    # Most cases agree outright: the quirks are the exception, not the rule.
    assert sum(r.agree for r in report.results) >= CAMPAIGN_CASES // 2
    assert time.monotonic() - started < 120


# --- each quirk, on a case built for it ------------------------------------------------------


def builder(version: str) -> d.CaseBuilder:
    import random

    return d.CaseBuilder(version, random.Random(0))


def run_one(version: str, steps: list[str | tuple[str, list[str]]]) -> d.Result:
    """A case from step names (a tuple is PACKAGED with its inner steps)."""
    b = builder(version)
    parts = []
    for step in steps:
        if isinstance(step, tuple):
            parts.append(b.packaged([b.step(inner) for inner in step[1]]))
        elif step == "RAM setup":
            parts.append(("RAM setup", b.ram_setup(), set()))
        elif step == "RAM end":
            parts.append(("RAM end", b.ram_end(), set()))
        else:
            parts.append(b.step(step))
    case = b._assemble(0, parts, None)
    [result] = d.run_cases([case], version, jobs=1)
    return result


NORMAL = ["OPEN_RETURN_PATH", "PING", "ADVISE", "RAM setup"]


def test_a_normal_postcopy_sequence_is_accepted_by_both(version: str) -> None:
    result = run_one(
        version,
        [*NORMAL, "DISCARD", "PING", ("PACKAGED", ["LISTEN", "PING", "RUN"]), "PING", "RAM end",
         "EOF"],
    )  # fmt: skip
    assert (result.qemu, result.qmig) == ("accepted", "accepted"), result


def test_quirk_listen_without_discard(version: str) -> None:
    result = run_one(version, [*NORMAL, ("PACKAGED", ["LISTEN", "RUN"]), "RAM end", "EOF"])
    assert result.qemu == "rejected POSTCOPY_RUN", result
    assert "wrong postcopy state (2)" in result.qemu_detail
    assert result.qmig == "accepted"
    assert result.quirk == "listen-without-discard"


def test_quirk_discard_payload_from_the_outer_stream(version: str) -> None:
    result = run_one(
        version,
        [*NORMAL, "DISCARD", ("PACKAGED", ["DISCARD", "LISTEN", "RUN"]), "PING", "RAM end", "EOF"],
    )
    # QEMU read the version byte of the discard from the outer stream: the PING's 0x08.
    assert result.qemu == "rejected POSTCOPY_RAM_DISCARD", result
    assert "invalid version (8)" in result.qemu_detail
    assert result.qmig == "accepted"
    assert result.quirk == "payload-from-outer-stream"


def test_quirk_a_wrapping_discard_range_crashes_qemu(version: str) -> None:
    result = run_one(
        version, [*NORMAL, "DISCARD_WRAP", "PING", ("PACKAGED", ["LISTEN", "RUN"]), "EOF"]
    )
    assert result.qemu in ("crashed", "end of stream"), result  # SIGSEGV in every run seen
    assert result.qmig == "rejected POSTCOPY_RAM_DISCARD"
    assert result.quirk == "discard-range-wraps"


def name_past_command(version: str, start: int, length: int) -> d.Result:
    """A discard whose name-length byte (200) runs past its 25-byte command: QEMU reads the
    name on into the stream, then takes its one range from bytes that follow the command."""
    b = builder(version)
    payload = bytes([0, 200]) + b"pc.ram" + bytes(17)  # strlen(name) = 6: 16 bytes of range
    command = b._raw("POSTCOPY_RAM_DISCARD", payload)
    trailer = bytes(177) + b"\x00" + start.to_bytes(8, "big") + length.to_bytes(8, "big")
    parts = [
        b.step("OPEN_RETURN_PATH"),
        b.step("ADVISE"),
        ("RAM setup", b.ram_setup(), set()),
        ("DISCARD_NAME_PAST_COMMAND", command + trailer, {"discard-name-length"}),
        b.step("EOF"),
    ]
    [result] = d.run_cases([b._assemble(0, parts, None)], version, jobs=1)
    assert result.qmig == "rejected POSTCOPY_RAM_DISCARD", result
    assert "runs past the end of the command" in result.qmig_detail
    return result


def test_quirk_a_discard_name_past_the_command_clears_the_bitmap_past_its_end(
    version: str,
) -> None:
    # The range comes from past the command and lies past the block: QEMU clears 32 KiB of
    # received-bitmap bits past the end of its 2 KiB bitmap, then its range check fails.
    result = name_past_command(version, 64 << 20, 1 << 30)
    assert result.qemu == "rejected POSTCOPY_RAM_DISCARD", result
    assert "Overrun block" in result.qemu_detail


def test_quirk_a_discard_name_past_the_command_can_crash_qemu(version: str) -> None:
    result = name_past_command(version, 1 << 62, PAGE)
    # It clears a bit 2^47 bytes past its bitmap: mostly SIGSEGV; never a clean refusal.
    assert result.qemu in ("crashed", "end of stream"), result
    assert result.quirk == "discard-name-past-command"


def test_quirk_eof_after_discards_leaves_qemu_waiting(version: str) -> None:
    result = run_one(version, [*NORMAL, "DISCARD", "RAM end", "EOF"])
    assert result.qemu == "end of stream", result  # still "active" when the verdict is taken
    assert result.qmig == "accepted"
    assert result.quirk == "eof-in-discard"


def test_trailing_bytes_after_a_postcopy_eof_are_ignored_by_both(version: str) -> None:
    # Found by this fuzzer: qmig used to refuse them ("expected VMDESCRIPTION").
    result = run_one(
        version, [*NORMAL, "DISCARD", ("PACKAGED", ["LISTEN", "RUN"]), "RAM end", "EOF", "PING"]
    )
    assert (result.qemu, result.qmig) == ("accepted", "accepted"), result


def test_a_precopy_eof_without_vmdescription_completes_on_both(version: str) -> None:
    result = run_one(version, [*NORMAL[:3], "RAM setup", "RAM end", "EOF"])
    assert (result.qemu, result.qmig) == ("accepted", "accepted"), result


@pytest.mark.parametrize("profile_version", VERSIONS)
def test_the_quirks_table_is_documented(profile_version: str) -> None:
    from qmig.wire.profiles import load_profile

    quirks = load_profile(profile_version).quirks
    text = (Path(__file__).parents[2] / "formats" / "quirks.md").read_text()
    assert quirks
    for name, quirk in quirks.items():
        assert f"`{name}`" in text, name
        assert {"tag", "qemu", "qmig", "summary"} <= set(quirk), name


def test_qemu_error_lines_name_the_command() -> None:
    cases = {
        "qemu-system-x86_64: CMD_POSTCOPY_LISTEN in wrong postcopy state (3)": (
            "rejected POSTCOPY_LISTEN"
        ),
        "qemu-system-x86_64: MIG_CMD 0xb unknown (len 0x0)": "rejected unknown command",
        "qemu-system-x86_64: CMD_PING received with bad length - expecting 4, got 3": (
            "rejected PING"
        ),
        "qemu-system-x86_64: Illegal RAM offset 4000000": "rejected RAM",
        "qemu-system-x86_64: load of migration failed: Input/output error": "end of stream",
    }
    for line, verdict in cases.items():
        assert d.classify_qemu_log(line + "\n", False, None)[0] == verdict, line
    assert d.classify_qemu_log("", False, 11)[0] == "crashed"
    # An abort after the load already failed is not the verdict: the failure is.
    failed = "qemu-system-x86_64: load of migration failed: Input/output error\n"
    assert d.classify_qemu_log(failed, False, 6)[0] == "end of stream"
    listen = "qemu-system-x86_64: CMD_POSTCOPY_LISTEN in wrong postcopy state (3)\n"
    assert d.classify_qemu_log(listen, False, 11)[0] == "rejected POSTCOPY_LISTEN"
    assert d.classify_qemu_log("", True, None)[0] == "accepted"


@pytest.mark.parametrize("profile_version", VERSIONS)
def test_a_state_change_from_the_listen_thread_is_a_race_not_a_finding(
    profile_version: str,
) -> None:
    """Seen on 7.2: an ADVISE after the package, read by QEMU's listen thread, sets the shared
    postcopy state to ADVISE before the main thread reaches the package's RUN, which then
    fails in state 1; qmig runs RUN first and rejects the ADVISE (quirks.md)."""
    b = builder(profile_version)
    parts = [
        *(b.step(name) for name in ["OPEN_RETURN_PATH", "PING", "ADVISE"]),
        ("RAM setup", b.ram_setup(), set()),
        b.step("DISCARD"),
        b.packaged([b.step(name) for name in ["LISTEN", "PING", "RUN"]]),
        b.step("ADVISE0"),
        ("RAM end", b.ram_end(), set()),
        b.step("EOF"),
    ]
    case = b._assemble(0, parts, None)
    ours = d.qmig_verdict(case.data, profile_version, d.fixture_blocks())
    assert ours.verdict == "rejected POSTCOPY_ADVISE"
    result = d.Result(case, "rejected POSTCOPY_RUN", ours.verdict, qmig_offset=ours.offset)
    assert d.explain(result, profile_version) == "listen-thread-race"
    # Without a LISTEN inside the package there are no two threads: a finding.
    parts[5] = b.packaged([b.step("PING")])
    case = b._assemble(0, parts, None)
    ours = d.qmig_verdict(case.data, profile_version, d.fixture_blocks())
    result = d.Result(case, "rejected POSTCOPY_RUN", ours.verdict, qmig_offset=ours.offset)
    assert d.explain(result, profile_version) is None


PACKAGE_WITHOUT_RUN = [*NORMAL, "DISCARD", "PING", ("PACKAGED", ["PING"]), "RUN", "PING", "RAM end"]


def test_qemu_fails_a_package_that_ends_without_run(version: str) -> None:
    # Only RUN (LOADVM_QUIT) or an EOF ends the load of a package: past its last command QEMU
    # reads beyond the blob and the load fails with an I/O error (10.0, seed 23, case 277).
    result = run_one(version, [*PACKAGE_WITHOUT_RUN, "EOF"])
    assert result.qemu == "end of stream", result
    assert "Input/output error" in result.qemu_detail


def test_qmig_fails_a_package_that_ends_without_run_as_qemu_does(version: str) -> None:
    result = run_one(version, [*PACKAGE_WITHOUT_RUN, "EOF"])
    assert result.qmig == result.qemu, result
