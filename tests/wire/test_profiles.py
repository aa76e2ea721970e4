"""A profile is checked as it is loaded: each kind of mistake is one line naming the file and
the dotted key, and every shipped profile loads."""

from __future__ import annotations

import importlib.resources
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qmig.errors import QmigError
from qmig.wire.profiles import (
    FORMATS_ENV,
    available_versions,
    formats_dir,
    load_profile,
    read_profile,
)

SHIPPED = importlib.resources.files("qmig.formats")
REPO_FORMATS = Path(__file__).resolve().parents[2] / "formats"


def edited(tmp_path: Path, old: str, new: str, version: str = "7.2") -> Path:
    """The shipped profile of ``version`` with its one occurrence of ``old`` made ``new``."""
    text = (SHIPPED / f"qemu-{version}.toml").read_text()
    assert text.count(old) == 1, old
    path = tmp_path / f"qemu-{version}.toml"
    path.write_text(text.replace(old, new))
    return path


def error_line(path: Path, version: str = "7.2") -> str:
    with pytest.raises(QmigError) as caught:
        read_profile(path, version)
    line = str(caught.value)
    assert "\n" not in line
    return line


MISTAKES = [
    # unknown keys, at the top level and nested (a table, an inline table, a quirk)
    ('name = "7.2"', 'name = "7.2"\ncolour = "blue"', "colour: unknown key"),
    ("section_version = 4", "section_version = 4\npage_order = 1", "ram.page_order: unknown key"),
    (
        "PING = { number = 2, length = 4 }",
        "PING = { number = 2, length = 4, min_length = 1 }",
        "commands.PING.min_length: unknown key",
    ),
    (
        'tag = "eof-in-discard"',
        'tag = "eof-in-discard"\ntags = ["x"]',
        "quirks.eof-in-discard.tags: unknown key",
    ),
    # missing keys
    ("reject_second_listen = false\n", "", "postcopy.reject_second_listen: missing"),
    ("max_length = 512 ", "", "return_path.max_length: missing"),
    ("[packaged]\nmax_length = 0xffffffff", "", "packaged: missing"),
    ("PAGE = 0x08\n", "", "ram.flags.PAGE: missing"),
    # wrong types and values out of range
    (
        "version = 3\nobsolete",
        'version = "3"\nobsolete',
        "stream.version: expected an integer, got '3'",
    ),
    (
        "section_footer = true",
        "section_footer = 1",
        "stream.section_footer: expected true or false, got 1",
    ),
    (
        "default_target_page_bits = 12",
        "default_target_page_bits = true",
        "stream.default_target_page_bits: expected an integer, got true",
    ),
    (
        "default_target_page_bits = 12",
        "default_target_page_bits = 40",
        "stream.default_target_page_bits: 40 is out of range 9..16",
    ),
    (
        "PING = { number = 2,",
        "PING = { number = 0x10000,",
        "commands.PING.number: 65536 is out of range 0..65535",
    ),
    ("PING = { number = 2, length = 4 }", "PING = 2", "commands.PING: expected a table, got 2"),
    # rule names
    (
        'request_range_check = "last-byte"',
        'request_range_check = "last-bite"',
        "ram.request_range_check: 'last-bite' is not one of 'last-byte', 'end'",
    ),
    (
        'configuration = "required"',
        'configuration = "sometimes"',
        "stream.configuration: 'sometimes' is not one of 'required', 'optional'",
    ),
    (
        'mem_size_page_size = "postcopy-advised-and-differs"',
        'mem_size_page_size = "always"',
        "ram.mem_size_page_size: 'always' is not one of 'postcopy-advised-and-differs'",
    ),
    (
        'mem_size_mr_addr = "x-ignore-shared"',
        "mem_size_mr_addr = 1",
        "ram.mem_size_mr_addr: 1 is not one of 'x-ignore-shared', 'never'",
    ),
    (
        'postcopy_host_page_order = "same-host-page"',
        'postcopy_host_page_order = "any"',
        "ram.postcopy_host_page_order: 'any' is not one of 'same-host-page', 'sequential'",
    ),
    (
        'max_xbzrle_length = "target-page"',
        'max_xbzrle_length = "host-page"',
        "ram.max_xbzrle_length: 'host-page' is not one of 'target-page'",
    ),
    # tables of the wrong shape
    (
        "SECTION_FOOTER = 0x7e",
        "SECTION_FOOTER = 0x07",
        "section_types.SECTION_FOOTER: 0x7 is already CONFIGURATION",
    ),
    ("EOF = 0x00\n", "", "section_types.EOF: missing"),
    ("HOOK = 0x80", "HOOK = 0x81", "ram.flags.HOOK: 0x81 is not a single bit"),
    ("HOOK = 0x80", "HOOK = 0x80\nHOOKS = 0x400", "ram.flags.HOOKS: unknown name"),
    ("PING = { number = 2,", "PONG = { number = 2,", "commands.PONG: unknown message"),
    (
        "PING = { number = 2,",
        "PING = { number = 1,",
        "commands.PING.number: 1 is already OPEN_RETURN_PATH",
    ),
    (
        "PING = { number = 2, length = 4 }",
        'PING = { number = 2, length = "any" }',
        "commands.PING.length: expected a number, a list of numbers or 'variable', got 'any'",
    ),
    (
        'configuration_subsections = ["target-page-bits", "capabilities", "uuid"]',
        'configuration_subsections = ["target-page-bits", "caps"]',
        "stream.configuration_subsections[1]: 'caps' is not one of",
    ),
    # quirk tables
    (
        'qemu = ["rejected POSTCOPY_RUN"]',
        'qemu = "rejected POSTCOPY_RUN"',
        "quirks.listen-without-discard.qemu: expected a list of strings, got 'rejected",
    ),
    (
        'qemu = ["rejected POSTCOPY_RUN"]',
        'qemu = ["refused POSTCOPY_RUN"]',
        "quirks.listen-without-discard.qemu[0]: 'refused POSTCOPY_RUN' is not a verdict",
    ),
    (
        'qmig = ["accepted"]',
        "qmig = []",
        "quirks.eof-in-discard.qmig: expected at least one verdict",
    ),
    (
        'summary = "a stream that ends (EOF)',
        'summery = "a stream that ends (EOF)',
        "quirks.eof-in-discard.summary: missing",
    ),
    (
        "[quirks.eof-in-discard]\n",
        "[quirks]\neof-in-discard = 3\n[unused]\n",
        "quirks.eof-in-discard: expected a table, got 3",
    ),
    # the file names its own version
    ('name = "7.2"', 'name = "7.3"', "name: '7.3' is not the file's version '7.2'"),
]


@pytest.mark.parametrize(("old", "new", "expected"), MISTAKES, ids=[m[2][:50] for m in MISTAKES])
def test_a_mistake_is_one_line_naming_the_file_and_key(
    tmp_path: Path, old: str, new: str, expected: str
) -> None:
    path = edited(tmp_path, old, new)
    line = error_line(path)
    assert line.startswith(f"{path}: {expected}"), line


def test_not_toml_is_one_line(tmp_path: Path) -> None:
    path = edited(tmp_path, 'name = "7.2"', 'name = "7.2')
    assert error_line(path).startswith(f"{path}: not TOML: ")


@pytest.mark.parametrize("version", ["2.9", "7.2", "10.0"])
def test_every_shipped_profile_loads(version: str) -> None:
    assert version in available_versions()
    profile = read_profile(SHIPPED / f"qemu-{version}.toml", version)
    assert profile == load_profile(version)
    assert profile.name == version
    assert {"PING", "POSTCOPY_RUN"} <= set(profile.commands)


def test_shipped_profiles_are_the_repository_formats() -> None:
    """The package's profiles are formats/ (mapped, not copied) in an editable install, and
    the versions offered are exactly the files there."""
    shipped = sorted(p.name for p in REPO_FORMATS.glob("qemu-*.toml"))
    assert [f"qemu-{v}.toml" for v in available_versions()] == sorted(
        shipped, key=lambda n: tuple(int(x) for x in n[5:-5].split("."))
    )
    for name in shipped:
        assert (SHIPPED / name).read_bytes() == (REPO_FORMATS / name).read_bytes()


def test_formats_override_and_its_errors_through_the_cli(tmp_path: Path) -> None:
    """QMIG_FORMATS points qmig at another folder; a broken profile there stops the command
    with one line and no traceback."""
    edited(tmp_path, 'request_range_check = "last-byte"', 'request_range_check = "last-bite"')
    env = {**os.environ, FORMATS_ENV: str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "qmig", "inspect", os.devnull, "--qemu-version", "7.2"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert lines == [
        f"qmig: error: {tmp_path / 'qemu-7.2.toml'}: ram.request_range_check: "
        "'last-bite' is not one of 'last-byte', 'end'"
    ], result.stderr
    assert str(formats_dir()) != str(tmp_path)  # this process still reads the shipped ones


# The [multifd] and [mapped_ram] tables (10.0 has both): (old, new, expected).
MULTIFD_MISTAKES = [
    ('zero_pages = "packet"', 'zero_pages = "main"', "multifd.zero_pages: 'main' is not one of"),
    ("sync_flag = 0x01", "sync_flag = 0x03", "multifd.sync_flag: 0x3 is not a single bit"),
    ("device_state_flag = 0x40", "device_state_flag = 0x02", "multifd.device_state_flag: 0x2"),
    ("packet_size = 0x80000", "packet_size = 0x80001", "multifd.packet_size: 0x80001 is not"),
    ("QATZIP = 0x20", "QATZIP = 0x40", "multifd.compression.QATZIP: 0x40 is outside"),
    ("QATZIP = 0x20", "LZ4 = 0x20", "multifd.compression.LZ4: unknown method"),
    ("NOCOMP = 0x00\nZLIB = 0x02\nZSTD = 0x04\nQPL", "ZLIB = 0x02\nZSTD = 0x04\nQPL", "NOCOMP"),
    ("bitmap_word = 8", "bitmap_word = 6", "mapped_ram.bitmap_word: 6 is not 4 or 8"),
    ('bitmap_byte_order = "little"', 'bitmap_byte_order = "le"', "mapped_ram.bitmap_byte_order"),
    (
        "file_offset_alignment = 0x100000",
        "alignment = 0x100000",
        "mapped_ram.file_offset_alignment: missing",
    ),
    ("version = 1\nfile_offset", "version = -1\nfile_offset", "mapped_ram.version: -1 is out of"),
]


@pytest.mark.parametrize(("old", "new", "expected"), MULTIFD_MISTAKES)
def test_a_multifd_or_mapped_ram_mistake_is_one_line(
    tmp_path: Path, old: str, new: str, expected: str
) -> None:
    path = edited(tmp_path, old, new, "10.0")
    line = error_line(path, "10.0")
    assert line.startswith(f"{path}: "), line
    assert expected in line, line


def test_multifd_and_mapped_ram_tables_by_version() -> None:
    assert load_profile("2.9").multifd is None and load_profile("2.9").mapped_ram is None
    old, new = load_profile("7.2"), load_profile("10.0")
    assert old.multifd is not None and new.multifd is not None and new.mapped_ram is not None
    assert old.mapped_ram is None
    assert (old.multifd.zero_pages, new.multifd.zero_pages) == ("main-channel", "packet")
    assert old.multifd.device_state_flag is None and new.multifd.device_state_flag == 0x40
    assert old.multifd.compression == {"NOCOMP": 0, "ZLIB": 2, "ZSTD": 4}
