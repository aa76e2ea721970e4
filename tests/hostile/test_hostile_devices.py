"""Device state and VMDESCRIPTION that claim far more than they hold, through inspect and
receive: each ends with one error line naming the field, promptly, in bounded memory."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hostile_run import Outcome, inspect, machine, receive, sender
from hostile_streams import (
    described_device,
    device_section,
    field,
    nested_structs_description,
    precopy_end,
    small_opening,
)

from qmig.wire.vmstate import MAX_DEPTH

pytestmark = [pytest.mark.uffd, pytest.mark.timeout(120)]

Runner = Callable[[bytes, Path], Outcome]


def run_inspect(data: bytes, tmp_path: Path) -> Outcome:
    path = tmp_path / "hostile.mig"
    path.write_bytes(data)
    return inspect(path, "--extract", str(tmp_path / "out"))


def run_receive(data: bytes, tmp_path: Path) -> Outcome:
    return receive(sender(data))


def run_machine(data: bytes, tmp_path: Path) -> Outcome:
    path = tmp_path / "hostile.mig"
    path.write_bytes(data)
    return machine(path)


RUNNERS = [
    pytest.param(run_inspect, id="inspect"),
    pytest.param(run_receive, id="receive"),
    pytest.param(run_machine, id="machine"),
]
# Where the device's payload starts (after its SECTION_FULL header; a footer is 5 bytes): the
# first field's offset, and where the reader waits for the description.
PAYLOAD_AT = len(small_opening()) + len(device_section(b"")) - 5


def empty_struct(count: int) -> dict[str, object]:
    return field("s", "struct", 0, array_len=count, struct={"vmsd_name": "e", "fields": []})


# Each case: the stream, WHAT, a pattern of the detail, and where in the payload the error
# is (default: at its start).
CASES: dict[str, tuple[Any, ...]] = {
    # A field of 0 bytes repeated 2^40 times holds nothing: refused before any work.
    "zero-size buffer x 2^40": (
        described_device([field("buf", "buffer", 0, array_len=1 << 40)], b""),
        "SECTION_FULL",
        r"device 'dev' field 'buf': 1099511627776 elements of 0 bytes",
    ),
    "zero-size buffer x 10^7": (
        described_device([field("buf", "buffer", 0, array_len=10**7)], b""),
        "SECTION_FULL",
        r"field 'buf': 10000000 elements of 0 bytes",
    ),
    "empty struct x 2^40": (
        described_device([empty_struct(1 << 40)], b""),
        "SECTION_FULL",
        r"field 's': 1099511627776 elements of 0 bytes",
    ),
    "5000 nested structs": (
        small_opening() + device_section(b"\x01") + precopy_end(nested_structs_description(5000)),
        "VMDESCRIPTION",
        "JSON nested too deeply",
    ),
    "nested structs past the depth limit": (
        small_opening()
        + device_section(b"\x01")
        + precopy_end(nested_structs_description(MAX_DEPTH + 1)),
        "VMDESCRIPTION",
        f"structs nested more than {MAX_DEPTH} deep",
    ),
    "100,000 nested [": (
        small_opening() + device_section(b"\x01") + precopy_end(b"[" * 100_000),
        "VMDESCRIPTION",
        "JSON nested too deeply",
    ),
    "one field claiming 2^40 bytes": (
        described_device([field("buf", "buffer", 1 << 40)], b"\x01" * 64),
        "SECTION_FULL",
        r"field 'buf': needs 1099511627776 bytes, \d+ left",
    ),
    "uint32 array of 2^40": (
        described_device([field("regs", "uint32", 4, array_len=1 << 40)], bytes(64)),
        "SECTION_FULL",
        r"field 'regs': needs 4398046511104 bytes, \d+ left",
    ),
    "zero-size elements beyond a real array": (
        described_device(
            [field("a", "uint8", 1, array_len=4096), field("z", "buffer", 0, array_len=1 << 22)],
            bytes(4096),
        ),
        "SECTION_FULL",
        r"field 'z': 4194304 elements of 0 bytes: more than the \d+ values",
        4096,  # after field 'a'
    ),
    "device state never described": (
        small_opening() + device_section(bytes(9 << 20)),
        "SECTION_FULL",
        "record larger than qmig's 8388608 byte limit",
    ),
}


@pytest.mark.parametrize("runner", RUNNERS)
@pytest.mark.parametrize("case", list(CASES))
def test_hostile_device_state(case: str, runner: Runner, tmp_path: Path) -> None:
    data, what, detail, *field_at = CASES[case]
    outcome = runner(data, tmp_path)
    match = outcome.check_error(what, detail)
    assert int(match["offset"]) == PAYLOAD_AT + sum(field_at)
    outcome.check_bounded()


def test_depth_within_the_limit_decodes(tmp_path: Path) -> None:
    data = (
        small_opening()
        + device_section(b"\x07")
        + precopy_end(nested_structs_description(MAX_DEPTH))
    )
    path = tmp_path / "deep.mig"
    path.write_bytes(data)
    outcome = inspect(path, "--extract", str(tmp_path / "out"))
    assert outcome.status == 0, outcome.stderr
    text = (tmp_path / "out" / "devices.json").read_text()
    assert '"leaf": 7' in text
