"""Device state decoding with VMDESCRIPTION, on real QEMU streams and hand-built payloads."""

from __future__ import annotations

import copy
import itertools
import json
import lzma
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qmig.wire.reader import MAX_DESCRIPTION, find_trailing_vmdesc
from qmig.wire.schema import schema_for
from qmig.wire.vmstate import (
    MAX_DEPTH,
    ZERO_SIZE_ALLOWANCE,
    DeviceDescription,
    VmDescription,
    VmstateError,
    decode_device,
)

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "vmstate"
PRECOPY_FIXTURE = FIXTURES / "precopy-16M.mig.xz"

SECTION_END = 0x03
SECTION_FULL = 0x04
CONFIGURATION = 0x07
FOOTER = 0x7E
EOF = 0x00

# RAM record flags in the low bits of each be64 header.
RAM_ZERO, RAM_MEM_SIZE, RAM_PAGE, RAM_EOS, RAM_CONTINUE = 0x02, 0x04, 0x08, 0x10, 0x20


# --- walking a real stream -------------------------------------------------------------------


@dataclass
class DeviceSection:
    start: int  # the 0x04 byte
    section_id: int
    idstr: str
    instance_id: int
    version_id: int
    payload_start: int
    payload_end: int
    tree: dict[str, object]


@dataclass
class WalkedStream:
    data: bytes
    description: VmDescription
    ram_end: int  # first byte after the RAM section's END footer
    eof: int
    devices: list[DeviceSection]


def be(data: bytes, pos: int, size: int) -> int:
    return int.from_bytes(data[pos : pos + size], "big")


def split_vmdescription(data: bytes) -> tuple[int, bytes]:
    """Return (position of the 0x06 byte, JSON) of the trailing VMDESCRIPTION record."""
    pos = len(data)
    while (pos := data.rfind(b"\x06", 0, pos)) >= 0:
        if be(data, pos + 1, 4) == len(data) - pos - 5:
            return pos, data[pos + 5 :]
    raise AssertionError("no VMDESCRIPTION at the end of the stream")


def skip_ram_records(data: bytes, pos: int, page_size: int) -> int:
    while True:
        header = be(data, pos, 8)
        pos += 8
        flags = header & (page_size - 1)
        if flags & RAM_MEM_SIZE:
            remaining = header & ~(page_size - 1)
            while remaining > 0:
                pos += 1 + data[pos]
                remaining -= be(data, pos, 8)
                pos += 8
        if flags & (RAM_ZERO | RAM_PAGE):
            if not flags & RAM_CONTINUE:
                pos += 1 + data[pos]
            pos += 1 if flags & RAM_ZERO else page_size
        if flags & RAM_EOS:
            return pos


def walk_stream(data: bytes) -> WalkedStream:
    """Walk a precopy stream, delimiting each device FULL section with :func:`decode_device`."""
    vmdesc_at, vmdesc_json = split_vmdescription(data)
    description = VmDescription.from_json(vmdesc_json)
    assert description.page_size is not None
    assert data[8] == CONFIGURATION
    pos = 9 + 4 + be(data, 9, 4)
    ram_end = -1
    devices: list[DeviceSection] = []
    while data[pos] != EOF:
        kind, section_id = data[pos], be(data, pos + 1, 4)
        if kind in (0x01, SECTION_FULL):
            name_length = data[pos + 5]
            idstr = data[pos + 6 : pos + 6 + name_length].decode()
            instance_id = be(data, pos + 6 + name_length, 4)
            version_id = be(data, pos + 10 + name_length, 4)
            body = pos + 14 + name_length
        else:
            idstr, body = "ram", pos + 5
        if idstr == "ram":
            footer = skip_ram_records(data, body, description.page_size)
            if kind == SECTION_END:
                ram_end = footer + 5
        else:
            assert kind == SECTION_FULL
            device = description.require(idstr, instance_id, pos)
            used, tree = decode_device(device, data, body, vmdesc_at)
            footer = body + used
            devices.append(
                DeviceSection(pos, section_id, idstr, instance_id, version_id, body, footer, tree)
            )
        assert data[footer] == FOOTER, f"no footer after section {idstr!r} at {footer}"
        assert be(data, footer + 1, 4) == section_id
        pos = footer + 5
    assert pos + 1 == vmdesc_at
    return WalkedStream(data, description, ram_end, pos, devices)


@pytest.fixture(scope="module")
def precopy() -> WalkedStream:
    return walk_stream(lzma.decompress(PRECOPY_FIXTURE.read_bytes()))


def section(stream: WalkedStream, idstr: str, instance_id: int = 0) -> DeviceSection:
    return next(s for s in stream.devices if (s.idstr, s.instance_id) == (idstr, instance_id))


def description_with(stream: WalkedStream, edit: Any) -> VmDescription:
    """The stream's VMDESCRIPTION after ``edit`` changed its JSON document in place."""
    document = json.loads(split_vmdescription(stream.data)[1])
    edit(document)
    return VmDescription.from_json(json.dumps(document).encode())


# --- the real stream -----------------------------------------------------------------------


def test_every_device_section_decodes_and_accounts_for_every_byte(precopy: WalkedStream) -> None:
    devices = precopy.devices
    assert len(devices) == len(precopy.description.devices) == 30
    assert [(s.idstr, s.instance_id) for s in devices] == [
        (d.name, d.instance_id) for d in precopy.description.devices
    ]
    assert precopy.ram_end == devices[0].start
    for before, after in itertools.pairwise(devices):
        assert before.payload_end + 5 == after.start
    assert devices[-1].payload_end + 5 == precopy.eof


def test_section_versions_match_the_description(precopy: WalkedStream) -> None:
    for device in precopy.devices:
        described = precopy.description.require(device.idstr, device.instance_id)
        assert described.version == device.version_id


def test_known_device_values(precopy: WalkedStream) -> None:
    timer = section(precopy, "timer").tree
    assert set(timer) == {"cpu_ticks_offset", "unused", "cpu_clock_offset"}
    assert timer["unused"] == "00" * 8

    cpu = section(precopy, "cpu").tree
    # The guest never ran: the CPU is in its reset state.
    assert cpu["env.eip"] == 0xFFF0
    segments = cpu["env.segs"]
    assert isinstance(segments, list) and len(segments) == 6
    assert segments[1] == {"selector": 0xF000, "base": 0xFFFF0000, "limit": 0xFFFF, "flags": 0x9B00}
    regs = cpu["env.regs"]
    assert isinstance(regs, list) and len(regs) == 16
    assert cpu["cpu/poll_control_msr"] == {"env.poll_control_msr": 0}

    hpet = section(precopy, "hpet").tree
    timers = hpet["timer"]
    assert isinstance(timers, list) and len(timers) == hpet["num_timers"] == 3
    assert [t["tn"] for t in timers if isinstance(t, dict)] == [0, 1, 2]

    fdc = section(precopy, "fdc").tree["state"]
    assert isinstance(fdc, dict)
    drives = fdc["drives"]
    assert isinstance(drives, list) and len(drives) == 2
    assert all("fdrive/media_rate" in drive for drive in drives if isinstance(drive, dict))

    fw_cfg = section(precopy, "fw_cfg").tree
    assert list(fw_cfg)[-2:] == ["fw_cfg/dma", "fw_cfg/acpi_mr"]
    assert fw_cfg["fw_cfg/acpi_mr"] == {
        "table_mr_size": 0x20000,
        "linker_mr_size": 0x1000,
        "rsdp_mr_size": 20,
    }

    pm = section(precopy, "0000:00:01.3/piix4_pm").tree
    hotplug_status = pm["acpi_pci_hotplug.acpi_pcihp_pci_status"]  # unrolled: one entry per slot
    assert isinstance(hotplug_status, list) and len(hotplug_status) == 256
    json.dumps([device.tree for device in precopy.devices])


def test_payload_cut_short_reports_the_field_that_does_not_fit(precopy: WalkedStream) -> None:
    cpu = section(precopy, "cpu")
    desc = precopy.description.require("cpu", 0)
    with pytest.raises(VmstateError) as caught:
        decode_device(desc, precopy.data, cpu.payload_start, cpu.payload_start + 20)
    assert caught.value.detail == "device 'cpu' field 'env.regs': needs 128 bytes, 20 left"
    assert caught.value.offset == cpu.payload_start
    assert caught.value.short


def test_every_cut_of_every_device_is_reported_within_the_bytes_given(
    precopy: WalkedStream,
) -> None:
    for device in precopy.devices:
        desc = precopy.description.require(device.idstr, device.instance_id)
        for cut in range(device.payload_start, device.payload_end):
            with pytest.raises(VmstateError) as caught:
                decode_device(desc, precopy.data, device.payload_start, cut)
            error = caught.value
            assert error.short, error.detail
            assert error.detail.startswith(f"device {device.idstr!r} ")
            assert error.offset is not None
            assert device.payload_start <= error.offset <= cut


def test_decoding_stops_at_end_even_when_the_buffer_does(precopy: WalkedStream) -> None:
    cpu = section(precopy, "cpu")
    desc = precopy.description.require("cpu", 0)
    exact = memoryview(precopy.data)[: cpu.payload_end]
    used, tree = decode_device(desc, exact, cpu.payload_start, len(precopy.data))
    assert used == cpu.payload_end - cpu.payload_start
    assert tree == cpu.tree


def test_over_long_array_is_reported_at_the_array(precopy: WalkedStream) -> None:
    def lengthen_mce_banks(document: dict[str, Any]) -> None:
        cpu = next(d for d in document["devices"] if d["name"] == "cpu")
        banks = next(f for f in cpu["fields"] if f["name"] == "env.mce_banks")
        banks["array_len"] = 4000

    description = description_with(precopy, lengthen_mce_banks)
    desc = description.require("cpu", 0)
    cpu = section(precopy, "cpu")
    fields = [f.name for f in desc.fields]
    before = desc.fields[: fields.index("env.mce_banks")]
    array_at = cpu.payload_start + sum(f.wire_size for f in before)
    with pytest.raises(VmstateError) as caught:
        decode_device(desc, precopy.data, cpu.payload_start, cpu.payload_end)
    left = cpu.payload_end - array_at
    assert caught.value.detail == (
        f"device 'cpu' field 'env.mce_banks': needs 32000 bytes, {left} left"
    )
    assert caught.value.offset == array_at


def test_section_without_description(precopy: WalkedStream) -> None:
    assert precopy.description.find("xyz", 0) is None
    with pytest.raises(VmstateError) as caught:
        precopy.description.require("xyz", 0, 1234)
    assert caught.value.detail == "no description for section 'xyz' instance 0 in VMDESCRIPTION"
    assert caught.value.offset == 1234


@pytest.mark.qemu
@pytest.mark.timeout(60)
@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs QEMU")
def test_fresh_stream_with_more_devices(tmp_path: Path) -> None:
    output = tmp_path / "devices.mig"
    devices = [
        "e1000",
        "virtio-net-pci",
        "VGA",
        "qemu-xhci",
        "usb-tablet",
        "virtio-balloon",
        "virtio-serial",
        "ich9-intel-hda",
        "hda-duplex",
    ]
    extra = [argument for device in devices for argument in ("-device", device)]
    saved = subprocess.run(
        [sys.executable, str(FIXTURES / "make_precopy.py"), str(output), *extra],
        timeout=20,
        capture_output=True,
        text=True,
    )
    assert saved.returncode == 0, saved.stderr
    stream = walk_stream(output.read_bytes())
    assert len(stream.devices) == len(stream.description.devices)
    assert stream.devices[-1].payload_end + 5 == stream.eof
    names = {device.idstr.rsplit("/", 1)[-1] for device in stream.devices}
    assert {"e1000", "virtio-net", "vga", "xhci", "virtio-balloon", "intel-hda"} <= names


# --- hand-built payloads -------------------------------------------------------------------


def subsection_header(name: str, version: int) -> bytes:
    return bytes([0x05, len(name)]) + name.encode() + version.to_bytes(4, "big")


def leaf(name: str, kind: str, size: int, **extra: Any) -> dict[str, Any]:
    return {"name": name, "type": kind, "size": size, **extra}


QUEUE_SIZE = 1 + len(subsection_header("queue/tail", 2)) + 1
QUEUE = {
    "vmsd_name": "queue",
    "version": 1,
    "fields": [leaf("head", "uint8", 1)],
    "subsections": [
        {"vmsd_name": "queue/tail", "version": 2, "fields": [leaf("tail", "uint8", 1)]}
    ],
}
POINT = {
    "vmsd_name": "point",
    "version": 1,
    "fields": [leaf("x", "int8", 1), leaf("y", "uint16", 2)],
}
TOY_DOCUMENT: dict[str, Any] = {
    "page_size": 4096,
    "devices": [
        {
            "name": "toy",
            "instance_id": 1,
            "vmsd_name": "toy",
            "version": 3,
            "fields": [
                leaf("flag", "bool", 1),
                leaf("delta", "int16", 2),
                leaf("regs", "uint32", 4, array_len=3),
                leaf("blob", "buffer", 4),
                leaf("deadline", "timer", 8),
                leaf("ratio", "float64", 8),
                leaf("points", "struct", 3, array_len=2, struct=POINT),
                leaf("queues", "struct", QUEUE_SIZE, index=0, struct=QUEUE),
                leaf("queues", "struct", QUEUE_SIZE, index=1, struct=QUEUE),
                leaf(
                    "tmp",
                    "tmp",
                    8,
                    vmsd_name="toy_tmp",
                    version=0,
                    fields=[leaf("packed", "uint64", 8)],
                ),
                leaf("unused", "unused_buffer", 2),
                leaf("unused", "unused_buffer", 1),
                leaf("slot", "uint32", 1),  # a NULL element of a pointer array
            ],
            "subsections": [
                {
                    "vmsd_name": "toy/extra",
                    "version": 1,
                    "fields": [leaf("count", "int64", 8)],
                    "subsections": [
                        {
                            "vmsd_name": "toy/extra/more",
                            "version": 1,
                            "fields": [leaf("more", "uint8 equal", 1)],
                        }
                    ],
                }
            ],
        }
    ],
}
TOY_PREFIX = b"junk!"  # so that offsets are absolute, not payload-relative
TOY_PAYLOAD = b"".join(
    [
        b"\x01",
        struct.pack(">h", -2),
        struct.pack(">3I", 1, 2, 0xFFFFFFFF),
        bytes.fromhex("deadbeef"),
        b"\xff" * 8,
        struct.pack(">d", 1.5),
        struct.pack(">bH", -1, 0x0102) + struct.pack(">bH", 5, 0xFFFF),
        b"\x07" + subsection_header("queue/tail", 2) + b"\x08",
        b"\x09" + subsection_header("queue/tail", 2) + b"\x0a",
        struct.pack(">Q", 0x0102030405060708),
        b"\x00\x00",
        b"\x00",
        b"0",
        subsection_header("toy/extra", 1) + struct.pack(">q", -5),
        subsection_header("toy/extra/more", 1) + b"\x04",
    ]
)
TOY_TREE = {
    "flag": True,
    "delta": -2,
    "regs": [1, 2, 0xFFFFFFFF],
    "blob": "deadbeef",
    "deadline": -1,
    "ratio": 1.5,
    "points": [{"x": -1, "y": 0x0102}, {"x": 5, "y": 0xFFFF}],
    "queues": [{"head": 7, "queue/tail": {"tail": 8}}, {"head": 9, "queue/tail": {"tail": 10}}],
    "tmp": {"packed": 0x0102030405060708},
    "unused": ["0000", "00"],
    "slot": None,
    "toy/extra": {"count": -5, "toy/extra/more": {"more": 4}},
}


def toy_device(edit: Any = None) -> DeviceDescription:
    document = copy.deepcopy(TOY_DOCUMENT)
    if edit is not None:
        edit(document["devices"][0])
    description = VmDescription.from_json(json.dumps(document).encode())
    device = description.find("toy", 1)
    assert device is not None
    return device


def toy_error(payload: bytes, device: DeviceDescription | None = None) -> VmstateError:
    data = TOY_PREFIX + payload + b"\x7e"
    with pytest.raises(VmstateError) as caught:
        decode_device(device or toy_device(), data, len(TOY_PREFIX), len(data) - 1)
    return caught.value


def offset_of(needle: bytes, occurrence: int = 0) -> int:
    pos = -1
    for _ in range(occurrence + 1):
        pos = TOY_PAYLOAD.index(needle, pos + 1)
    return len(TOY_PREFIX) + pos


def test_hand_built_payload_decodes() -> None:
    device = toy_device()
    assert (device.name, device.instance_id, device.vmsd_name, device.version) == (
        "toy",
        1,
        "toy",
        3,
    )
    data = TOY_PREFIX + TOY_PAYLOAD + b"\x7e\x00\x00\x00\x09"
    used, tree = decode_device(device, data, len(TOY_PREFIX), len(data))
    assert used == len(TOY_PAYLOAD)
    assert tree == TOY_TREE
    assert list(tree) == list(TOY_TREE)
    json.dumps(tree)


def test_hand_built_over_long_array() -> None:
    def lengthen(device: dict[str, Any]) -> None:
        device["fields"][2]["array_len"] = 1000

    error = toy_error(TOY_PAYLOAD, toy_device(lengthen))
    assert (
        error.detail == f"device 'toy' field 'regs': needs 4000 bytes, {len(TOY_PAYLOAD) - 3} left"
    )
    assert error.offset == len(TOY_PREFIX) + 3
    assert error.short


def test_struct_element_larger_than_described() -> None:
    def widen_points(device: dict[str, Any]) -> None:
        device["fields"][6]["size"] = 4

    error = toy_error(TOY_PAYLOAD, toy_device(widen_points))
    assert (
        error.detail
        == "device 'toy' field 'points[0]': struct 'point' took 3 bytes, description says 4"
    )
    assert error.offset == len(TOY_PREFIX) + 1 + 2 + 12 + 4 + 8 + 8
    assert not error.short


def test_wrong_subsection_name_inside_an_array_element() -> None:
    second = offset_of(subsection_header("queue/tail", 2), occurrence=1) - len(TOY_PREFIX)
    payload = TOY_PAYLOAD[: second + 2] + b"queue/tall" + TOY_PAYLOAD[second + 12 :]
    error = toy_error(payload)
    assert error.detail == (
        "device 'toy' field 'queues[1]' subsection 'queue/tail': "
        "found subsection 'queue/tall' on the wire"
    )
    assert error.offset == len(TOY_PREFIX) + second + 1


def test_described_subsection_missing_from_the_wire() -> None:
    extra = offset_of(subsection_header("toy/extra", 1))
    data = TOY_PREFIX + TOY_PAYLOAD[: extra - len(TOY_PREFIX)] + b"\x7e\x00\x00\x00\x09"
    with pytest.raises(VmstateError) as caught:
        decode_device(toy_device(), data, len(TOY_PREFIX), len(data))
    error = caught.value
    assert (
        error.detail
        == "device 'toy' subsection 'toy/extra': expected a subsection (0x05), found 0x7e"
    )
    assert error.offset == extra
    assert not error.short


def test_subsection_version_mismatch() -> None:
    header = subsection_header("toy/extra/more", 1)
    payload = TOY_PAYLOAD.replace(header, subsection_header("toy/extra/more", 7))
    error = toy_error(payload)
    assert error.detail == (
        "device 'toy' subsection 'toy/extra' subsection 'toy/extra/more': "
        "version 7 on the wire, description says 1"
    )
    assert error.offset == offset_of(header)


def test_truncated_unrolled_array_element_is_named_by_index() -> None:
    second_queue = offset_of(b"\x09" + subsection_header("queue/tail", 2))
    error = toy_error(TOY_PAYLOAD[: second_queue - len(TOY_PREFIX) + 3])
    assert error.detail == f"device 'toy' field 'queues[1]': needs {QUEUE_SIZE} bytes, 3 left"
    assert error.offset == second_queue
    assert error.short


def test_truncated_nested_subsection() -> None:
    error = toy_error(TOY_PAYLOAD[:-1])
    assert error.detail == (
        "device 'toy' subsection 'toy/extra' subsection 'toy/extra/more' field 'more': "
        "needs 1 bytes, 0 left"
    )
    assert error.offset == len(TOY_PREFIX) + len(TOY_PAYLOAD) - 1
    assert error.short


def test_null_pointer_placeholder_is_checked() -> None:
    slot = offset_of(subsection_header("toy/extra", 1)) - len(TOY_PREFIX) - 1
    payload = TOY_PAYLOAD[:slot] + b"\x00" + TOY_PAYLOAD[slot + 1 :]
    error = toy_error(payload)
    assert error.detail == (
        "device 'toy' field 'slot': expected the NULL-pointer placeholder 0x30, found 0x00"
    )
    assert error.offset == len(TOY_PREFIX) + slot


def test_start_outside_the_buffer() -> None:
    with pytest.raises(VmstateError):
        decode_device(toy_device(), TOY_PAYLOAD, len(TOY_PAYLOAD) + 1, len(TOY_PAYLOAD) + 10)


@pytest.mark.parametrize(
    ("document", "message"),
    [
        (b"{not json", "JSON does not parse"),
        (b"[]", "JSON is not an object"),
        (b'{"page_size": 4096}', "JSON: 'devices' must be a list, got None"),
        (b'{"devices": [{"instance_id": 0, "fields": []}]}', "device #0: 'name' must be a string"),
        (b'{"devices": [{"name": "a", "instance_id": true, "fields": []}]}', "'instance_id' must"),
        (b'{"devices": [{"name": "a", "instance_id": 0}]}', "device #0 ('a'): 'fields' must be"),
        (
            b'{"devices": [{"name": "a", "instance_id": 0, "fields": '
            b'[{"name": "f", "type": "uint8", "size": -1}]}]}',
            "device #0 ('a') field 'f': 'size' must be a non-negative integer, got -1",
        ),
        (
            b'{"devices": [{"name": "a", "instance_id": 0, "fields": '
            b'[{"name": "f", "type": "uint32", "size": 2}]}]}',
            "device #0 ('a') field 'f': type 'uint32' is 4 bytes, description says 2",
        ),
        (
            b'{"devices": [{"name": "a", "instance_id": 0, "fields": '
            b'[{"name": "f", "type": "struct", "size": 2, "struct": []}]}]}',
            "device #0 ('a') field 'f': 'struct' must be an object",
        ),
        (
            b'{"devices": [{"name": "a", "instance_id": 0, "fields": [], '
            b'"subsections": [{"fields": []}]}]}',
            "device #0 ('a'): a subsection has no 'vmsd_name'",
        ),
    ],
)
def test_malformed_descriptions(document: bytes, message: str) -> None:
    with pytest.raises(VmstateError) as caught:
        VmDescription.from_json(document)
    assert message in caught.value.detail
    assert caught.value.offset is None


def test_device_saved_without_a_vmsd() -> None:
    document = {
        "devices": [
            {
                "name": "legacy",
                "instance_id": 0,
                "size": 3,
                "fields": [leaf("data", "buffer", 3)],
            }
        ]
    }
    device = VmDescription.from_json(json.dumps(document).encode()).require("legacy", 0)
    assert decode_device(device, b"\x01\x02\x03\x7e", 0, 4) == (3, {"data": "010203"})


# --- bounds: what a description can make the decoder do -----------------------------------


def one_device(fields: list[dict[str, Any]]) -> DeviceDescription:
    document = {"devices": [{"name": "d", "instance_id": 0, "fields": fields}]}
    return VmDescription.from_json(json.dumps(document).encode()).require("d", 0)


def nested(depth: int) -> dict[str, Any]:
    entry = leaf("x", "uint8", 1)
    for level in range(depth):
        entry = leaf(f"s{level}", "struct", 1, struct={"vmsd_name": "s", "fields": [entry]})
    return entry


@pytest.mark.parametrize(
    "entry",
    [
        leaf("buf", "buffer", 0, array_len=1 << 40),
        leaf("s", "struct", 0, array_len=1 << 40, struct={"vmsd_name": "e", "fields": []}),
        leaf("u", "uint8", 1, array_len=1 << 40),  # too long for the bytes given, as before
    ],
    ids=["zero-size buffer", "empty struct", "uint8"],
)
def test_arrays_longer_than_the_payload_can_fill_are_refused_at_once(entry: dict[str, Any]) -> None:
    payload = b"\x05" * 64
    started = time.monotonic()
    with pytest.raises(VmstateError) as caught:
        decode_device(one_device([entry]), payload, 0, len(payload))
    assert time.monotonic() - started < 0.5
    assert caught.value.offset == 0
    assert f"field '{entry['name']}'" in caught.value.detail


def test_zero_size_elements_within_the_allowance_decode() -> None:
    count = ZERO_SIZE_ALLOWANCE // 2
    used, tree = decode_device(one_device([leaf("pad", "buffer", 0, array_len=count)]), b"", 0, 0)
    assert used == 0 and tree == {"pad": [""] * count}


def test_values_are_bounded_by_the_payload_size() -> None:
    # 4 KiB of payload holds at most 4 Ki one-byte values; a million elements of nothing
    # beside them would be decoded from nothing.
    entries = [leaf("a", "uint8", 1, array_len=4096), leaf("z", "buffer", 0, array_len=1 << 20)]
    with pytest.raises(VmstateError) as caught:
        decode_device(one_device(entries), bytes(4096), 0, 4096)
    assert "field 'z': 1048576 elements of 0 bytes" in caught.value.detail
    assert caught.value.offset == 4096


def test_nesting_deeper_than_the_limit_is_a_bad_description() -> None:
    one_device([nested(MAX_DEPTH)])
    with pytest.raises(VmstateError, match=f"nested more than {MAX_DEPTH} deep"):
        one_device([nested(MAX_DEPTH + 1)])
    assert decode_device(one_device([nested(MAX_DEPTH)]), b"\x09", 0, 1)[0] == 1


def test_json_too_deep_to_parse_is_a_bad_description() -> None:
    with pytest.raises(VmstateError, match="JSON nested too deeply"):
        VmDescription.from_json(b"[" * 100_000)


def framed(json_text: bytes) -> bytes:
    return b"\x00\x06" + len(json_text).to_bytes(4, "big") + json_text


@pytest.mark.parametrize(
    "text", [b'{"devices": []}', b"[" * 100_000, b"x" * (1 << 22), b"\x06" * 300]
)
def test_trailing_description_is_found_by_its_framing_alone(text: bytes) -> None:
    schema = schema_for("7.2")
    data = b"\x04device\x00\x06\x00" + framed(text)
    assert find_trailing_vmdesc(data, 0, len(data), schema) == text
    assert find_trailing_vmdesc(data, 0, len(data) - 1, schema) is None


def test_a_trailing_description_past_the_limit_is_not_taken() -> None:
    data = b"\x04device" + framed(b"x" * (MAX_DESCRIPTION + 1))
    assert find_trailing_vmdesc(data, 0, len(data), schema_for("7.2")) is None


# --- generated layouts -----------------------------------------------------------------------

Draw = Callable[[st.SearchStrategy[Any]], Any]
GENERATED_INTEGERS = {
    "uint8": (1, False),
    "int16": (2, True),
    "uint32": (4, False),
    "int64": (8, True),
}
GENERATED_LEAVES = [*GENERATED_INTEGERS, "bool", "buffer"]


def layout_size(layout: dict[str, Any]) -> int:
    fields = sum(entry["size"] * entry.get("array_len", 1) for entry in layout["fields"])
    subsections = sum(
        len(subsection_header(sub["vmsd_name"], sub["version"])) + layout_size(sub)
        for sub in layout.get("subsections", [])
    )
    return fields + subsections


@st.composite
def struct_layouts(draw: st.DrawFn, name: str, depth: int) -> dict[str, Any]:
    fields = []
    for number in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(GENERATED_LEAVES + (["struct"] if depth else [])))
        entry: dict[str, Any] = {"name": f"f{number}", "type": kind}
        if kind == "struct":
            nested = draw(struct_layouts(f"{name}.f{number}", depth - 1))
            entry |= {"struct": nested, "size": layout_size(nested)}
        elif kind == "buffer":
            entry["size"] = draw(st.integers(0, 5))
        else:
            entry["size"] = GENERATED_INTEGERS.get(kind, (1, False))[0]
        if draw(st.booleans()):
            entry["array_len"] = draw(st.integers(2, 4))
        fields.append(entry)
    layout: dict[str, Any] = {
        "vmsd_name": name,
        "version": draw(st.integers(0, 5)),
        "fields": fields,
    }
    if depth:
        count = draw(st.integers(0, 2))
        subsections = [draw(struct_layouts(f"{name}/s{n}", depth - 1)) for n in range(count)]
        if subsections:
            layout["subsections"] = subsections
    return layout


def draw_payload(draw: Draw, layout: dict[str, Any]) -> tuple[bytes, dict[str, object]]:
    chunks: list[bytes] = []
    tree: dict[str, object] = {}
    for entry in layout["fields"]:
        elements = [draw_element(draw, entry) for _ in range(entry.get("array_len", 1))]
        chunks += [raw for raw, _ in elements]
        values = [value for _, value in elements]
        tree[entry["name"]] = values if "array_len" in entry else values[0]
    for sub in layout.get("subsections", []):
        raw, value = draw_payload(draw, sub)
        chunks.append(subsection_header(sub["vmsd_name"], sub["version"]) + raw)
        tree[sub["vmsd_name"]] = value
    return b"".join(chunks), tree


def draw_element(draw: Draw, entry: dict[str, Any]) -> tuple[bytes, object]:
    kind, size = entry["type"], entry["size"]
    if kind == "struct":
        return draw_payload(draw, entry["struct"])
    if kind == "bool":
        flag = draw(st.booleans())
        return bytes([flag]), flag
    if kind == "buffer":
        raw = draw(st.binary(min_size=size, max_size=size))
        return raw, raw.hex()
    signed = GENERATED_INTEGERS[kind][1]
    bound = 1 << (8 * size - (1 if signed else 0))
    number = draw(st.integers(-bound if signed else 0, bound - 1))
    return number.to_bytes(size, "big", signed=signed), number


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_generated_layouts_decode_and_every_cut_is_short(data: st.DataObject) -> None:
    layout = data.draw(struct_layouts("gen", 2))
    payload, tree = draw_payload(data.draw, layout)
    document = {"devices": [{"name": "gen", "instance_id": 0, **layout}]}
    device = VmDescription.from_json(json.dumps(document).encode()).require("gen", 0)
    buffer = b"\xaa" + payload + b"\x7e"
    assert decode_device(device, buffer, 1, len(buffer)) == (len(payload), tree)
    for cut in range(1, len(payload) + 1):
        with pytest.raises(VmstateError) as caught:
            decode_device(device, buffer, 1, cut)
        assert caught.value.short
        assert caught.value.offset is not None and 1 <= caught.value.offset <= cut
