"""Per-QEMU-version wire profiles: the numbers and rules in ``formats/qemu-*.toml`` as objects.

The schemas in :mod:`qmig.wire.schema` are built from a :class:`Profile`; nothing in qmig
hard-codes a command number, a message number or a RAM flag.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import os
import re
import tomllib
from dataclasses import dataclass
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, Literal

from qmig.errors import QmigError
from qmig.wire import messages as m
from qmig.wire.multifd_profile import MappedRamSpec, MultifdSpec, read_mapped_ram, read_multifd
from qmig.wire.profile_spec import Table

DEFAULT_VERSION = "10.0"
# The profiles ship inside the package (formats/ is mapped to qmig.formats at build time);
# QMIG_FORMATS points qmig at another folder of profiles instead.
FORMATS_ENV = "QMIG_FORMATS"

VARIABLE = "variable"
U8, U16, U32 = 0xFF, 0xFFFF, 0xFFFF_FFFF

# The rules a profile chooses between: each name is one the code that applies it knows.
# stream.configuration (wire/reader.py): whether the CONFIGURATION section must follow the header.
ConfigurationRule = Literal["required", "optional"]
# ram.mem_size_page_size: when a MEM_SIZE entry carries the block's page size.
MemSizePageSizeRule = Literal["postcopy-advised-and-differs"]
# ram.mem_size_mr_addr (wire/reader.py, strategies.py): when an entry carries the region address.
MemSizeMrAddrRule = Literal["x-ignore-shared", "never"]
# ram.request_range_check (protocol/source.py): "last-byte" = start + len - 1 < used_length,
# "end" = start + len <= used_length.
RequestRangeRule = Literal["last-byte", "end"]
# ram.postcopy_host_page_order (protocol/destination.py): how the target pages of one host
# page may arrive in postcopy.
HostPageOrderRule = Literal["same-host-page", "sequential"]
# postcopy.preempt (protocol/preempt.py): the postcopy-preempt channel a current machine type
# gets: "none" (no such capability), "pre-7.2" (opened at setup, EOS at its end) or "8.0"
# (opened when postcopy starts, after the main channel's PONG).
PreemptRule = Literal["none", "pre-7.2", "8.0"]
# postcopy.preempt_sender (runner/source.py): the source thread that sends the preempt
# channel's requested pages, whatever the variant: "migration-thread" (its RAM loop switches
# channels, so whatever holds that thread holds them, the rate limit included) or
# "return-path" (the thread that reads the request sends them at once).
PreemptSenderRule = Literal["migration-thread", "return-path"]
# ram.max_xbzrle_length (wire/schema.py): the largest XBZRLE body.
XbzrleLengthRule = Literal["target-page"]

# The names a table must hold, as the schemas index them; RAM flags may add OPTIONAL_RAM_FLAGS.
SECTION_TYPES = (
    "EOF",
    "SECTION_START",
    "SECTION_PART",
    "SECTION_END",
    "SECTION_FULL",
    "SUBSECTION",
    "VMDESCRIPTION",
    "CONFIGURATION",
    "COMMAND",
    "SECTION_FOOTER",
)
RAM_FLAGS = ("ZERO", "MEM_SIZE", "PAGE", "EOS", "CONTINUE", "XBZRLE", "HOOK")
OPTIONAL_RAM_FLAGS = ("COMPRESS_PAGE", "MULTIFD_FLUSH")
CONFIGURATION_SUBSECTIONS = ("target-page-bits", "capabilities", "uuid")
QUIRK_VERDICT = re.compile(r"\*|accepted|end of stream|crashed|rejected [A-Za-z_ ]+")


@dataclass(frozen=True)
class LengthRule:
    """The payload length a receiver insists on for one command or return-path message."""

    accepted: tuple[int, ...] | None  # None: variable, checked by the message itself
    min_length: int = 0

    @classmethod
    def from_table(cls, spec: Table, limit: int) -> LengthRule:
        """``length`` is a number, a list of numbers or "variable" (then ``min_length`` may
        follow)."""
        length = spec.data.get("length")
        accepted: tuple[int, ...] | None
        if length == VARIABLE:
            spec.taken.add("length")
            accepted = None
        elif isinstance(length, list):
            accepted = spec.integers("length", 0, limit)
            if not accepted:
                spec.fail("an empty list accepts no length", "length")
        elif length is None or isinstance(length, int):
            accepted = (spec.integer("length", 0, limit),)
        else:
            spec.fail(
                f"expected a number, a list of numbers or {VARIABLE!r}, got {length!r}", "length"
            )
        min_length = spec.integer("min_length", 0, limit, 0) if accepted is None else 0
        return cls(accepted, min_length)

    def expected(self) -> str:
        if self.accepted is None:
            return f"at least {self.min_length}"
        return " or ".join(str(n) for n in self.accepted)

    def allows(self, length: int) -> bool:
        if self.accepted is not None:
            return length in self.accepted
        return length >= self.min_length


@dataclass(frozen=True)
class Profile:
    """One QEMU version's wire format, as data."""

    name: str
    description: str
    magic: int
    stream_version: int
    obsolete_versions: tuple[int, ...]
    configuration: ConfigurationRule
    section_footer: bool
    configuration_subsections: tuple[str, ...]
    validated_capabilities: tuple[str, ...]
    default_target_page_bits: int
    default_machine_type: str  # what `-machine pc` names in CONFIGURATION
    section_types: dict[str, int]
    commands: dict[str, int]
    command_lengths: dict[str, LengthRule]
    packaged_max_length: int
    discard_version: int
    max_discard_ranges: int
    rp_max_length: int
    rp_messages: dict[str, int]
    rp_lengths: dict[str, LengthRule]
    ram_section_version: int
    ram_flags: dict[str, int]
    mem_size_page_size: MemSizePageSizeRule
    mem_size_mr_addr: MemSizeMrAddrRule
    request_range_check: RequestRangeRule
    postcopy_host_page_order: HostPageOrderRule
    max_xbzrle_length: XbzrleLengthRule
    run_sets_state_before_check: bool
    reject_second_listen: bool
    package_loaded_ping: int | None
    preempt: PreemptRule = "none"
    # Machine types of this version or older get the pre-7.2 variant (hw_compat_7_2's
    # x-preempt-pre-7-2=true); None: every machine type gets ``preempt``.
    preempt_pre_7_2_machines: str | None = None
    preempt_sender: PreemptSenderRule = "return-path"
    # postcopy.preempt_in_rate_limit (runner/source.py): the preempt channel's bytes count
    # against the cap's window, as the main channel's do (one counter for every channel), or
    # on their own (False: a per-file quota that the preempt channel never has).
    preempt_in_rate_limit: bool = False
    # Where this QEMU misbehaves on hostile input and qmig deliberately does not follow it:
    # name -> {tag, qemu, qmig, summary} (formats/quirks.md explains each; the differential
    # fuzzer reads it to tell a known difference from a finding).
    quirks: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    # Multifd channels and the mapped-ram file layout (None: this version has neither).
    multifd: MultifdSpec | None = None
    mapped_ram: MappedRamSpec | None = None

    @functools.cached_property
    def command_names(self) -> dict[int, str]:
        return {number: name for name, number in self.commands.items()}

    @functools.cached_property
    def rp_names(self) -> dict[int, str]:
        return {number: name for name, number in self.rp_messages.items()}

    @functools.cached_property
    def section_type_names(self) -> dict[int, str]:
        return {number: name for name, number in self.section_types.items()}

    @property
    def known_ram_flags(self) -> int:
        mask = 0
        for value in self.ram_flags.values():
            mask |= value
        return mask

    @classmethod
    def from_toml(cls, data: dict[str, Any], source: str = "profile") -> Profile:
        """Read and check a parsed profile; any mistake is one QmigError naming ``source``
        and the dotted key. Every key is read: one that nothing reads is refused."""
        fields: dict[str, Any] = {}
        with Table(data, source) as top:
            fields.update(name=top.string("name"), description=top.string("description"))
            with top.table("stream") as stream:
                page_bits = stream.integer("default_target_page_bits", 9, 16)
                fields.update(
                    magic=stream.integer("magic", 0, U32),
                    stream_version=stream.integer("version", 0, U32),
                    obsolete_versions=stream.integers("obsolete_versions", 0, U32),
                    configuration=stream.choice("configuration", ConfigurationRule),
                    section_footer=stream.boolean("section_footer"),
                    configuration_subsections=stream.strings(
                        "configuration_subsections", CONFIGURATION_SUBSECTIONS
                    ),
                    validated_capabilities=stream.strings("validated_capabilities"),
                    default_target_page_bits=page_bits,
                    default_machine_type=stream.string("default_machine_type"),
                )
            with top.table("section_types") as table:
                fields["section_types"] = _numbers(table, U8, SECTION_TYPES)
            with top.table("commands") as table:
                commands = {cls.NAME for cls in m.COMMANDS}
                fields["commands"], fields["command_lengths"] = _messages(table, commands)
            with top.table("packaged") as table:
                fields["packaged_max_length"] = table.integer("max_length", 1, U32)
            with top.table("discard") as table:
                fields["discard_version"] = table.integer("version", 0, U8)
                fields["max_discard_ranges"] = table.integer("max_ranges_per_command", 1, U8)
            with top.table("return_path") as return_path:
                fields["rp_max_length"] = return_path.integer("max_length", 1, U16)
                with return_path.table("messages") as table:
                    messages = {cls.NAME for cls in m.RETURN_PATH_MESSAGES}
                    fields["rp_messages"], fields["rp_lengths"] = _messages(table, messages)
            with top.table("ram") as ram:
                fields.update(
                    ram_section_version=ram.integer("section_version", 0, U32),
                    mem_size_page_size=ram.choice("mem_size_page_size", MemSizePageSizeRule),
                    mem_size_mr_addr=ram.choice("mem_size_mr_addr", MemSizeMrAddrRule),
                    request_range_check=ram.choice("request_range_check", RequestRangeRule),
                    postcopy_host_page_order=ram.choice(
                        "postcopy_host_page_order", HostPageOrderRule
                    ),
                    max_xbzrle_length=ram.choice("max_xbzrle_length", XbzrleLengthRule),
                )
                with ram.table("flags") as table:
                    fields["ram_flags"] = _ram_flags(table, page_bits)
            with top.table("postcopy") as postcopy:
                fields.update(
                    run_sets_state_before_check=postcopy.boolean("run_sets_state_before_check"),
                    reject_second_listen=postcopy.boolean("reject_second_listen"),
                    package_loaded_ping=postcopy.integer("package_loaded_ping", 0, U32, None),
                )
                if postcopy.has("preempt"):
                    fields["preempt"] = postcopy.choice("preempt", PreemptRule)
                if postcopy.has("preempt_pre_7_2_machines"):
                    fields["preempt_pre_7_2_machines"] = postcopy.string("preempt_pre_7_2_machines")
                if postcopy.has("preempt_sender"):
                    fields["preempt_sender"] = postcopy.choice("preempt_sender", PreemptSenderRule)
                if postcopy.has("preempt_in_rate_limit"):
                    fields["preempt_in_rate_limit"] = postcopy.boolean("preempt_in_rate_limit")
            quirks = top.optional_table("quirks")
            fields["quirks"] = {} if quirks is None else _quirks(quirks)
            multifd, mapped_ram = top.optional_table("multifd"), top.optional_table("mapped_ram")
            fields["multifd"] = None if multifd is None else read_multifd(multifd)
            fields["mapped_ram"] = None if mapped_ram is None else read_mapped_ram(mapped_ram)
        return cls(**fields)


def _ram_flags(table: Table, page_bits: int) -> dict[str, int]:
    # A flag shares the be64 with a page-aligned offset: one bit below the target page size.
    flags = _numbers(table, (1 << page_bits) - 1, RAM_FLAGS, OPTIONAL_RAM_FLAGS)
    for name, value in flags.items():
        if not value or value & (value - 1):
            table.fail(f"{value:#x} is not a single bit", name)
    return flags


def _numbers(
    table: Table, high: int, required: tuple[str, ...], optional: tuple[str, ...] = ()
) -> dict[str, int]:
    """A table of name = number (section types, RAM flags): the names the code indexes, each
    number in range and used once."""
    numbers: dict[str, int] = {}
    seen: dict[int, str] = {}
    for name, value in table.entries():
        if name not in required and name not in optional:
            table.fail("unknown name (known: " + ", ".join((*required, *optional)) + ")", name)
        number = table.check_integer(value, 0, high, name)
        if number in seen:
            table.fail(f"{number:#x} is already {seen[number]}", name)
        numbers[name], seen[number] = number, name
    for name in required:
        if name not in numbers:
            table.fail("missing", name)
    return numbers


def _messages(table: Table, known: set[str]) -> tuple[dict[str, int], dict[str, LengthRule]]:
    """A table of NAME = { number, length[, min_length] } (commands, return-path messages)."""
    numbers: dict[str, int] = {}
    lengths: dict[str, LengthRule] = {}
    seen: dict[int, str] = {}
    for name, value in table.entries():
        if name not in known:
            table.fail("unknown message (known: " + ", ".join(sorted(known)) + ")", name)
        with Table(value, table.source, table.where(name)) as spec:
            # Commands and return-path messages are be16 numbers with a be16 length.
            number = spec.integer("number", 0, U16)
            if number in seen:
                spec.fail(f"{number} is already {seen[number]}", "number")
            numbers[name], seen[number] = number, name
            lengths[name] = LengthRule.from_table(spec, U16)
    return numbers, lengths


def _quirks(table: Table) -> dict[str, dict[str, Any]]:
    """name -> {tag, qemu, qmig, summary}; the verdict lists hold the differential fuzzer's
    verdicts (or "*", any)."""
    quirks: dict[str, dict[str, Any]] = {}
    for name, value in table.entries():
        with Table(value, table.source, table.where(name)) as quirk:
            entry: dict[str, Any] = {"tag": quirk.string("tag")}
            for side in ("qemu", "qmig"):
                verdicts = quirk.strings(side)
                if not verdicts:
                    quirk.fail("expected at least one verdict", side)
                for i, verdict in enumerate(verdicts):
                    if not QUIRK_VERDICT.fullmatch(verdict):
                        quirk.fail(
                            f"{verdict!r} is not a verdict ('*', 'accepted', 'end of stream', "
                            "'crashed' or 'rejected NAME')",
                            f"{side}[{i}]",
                        )
                entry[side] = list(verdicts)
            entry["summary"] = quirk.string("summary")
        quirks[name] = entry
    return quirks


def formats_dir() -> Traversable:
    """The folder of ``qemu-*.toml`` profiles: ``$QMIG_FORMATS``, else the shipped ones."""
    override = os.environ.get(FORMATS_ENV)
    if override:
        if not Path(override).is_dir():
            raise QmigError(FORMATS_ENV, f"{override}: no such folder of profiles")
        return Path(override)
    return importlib.resources.files("qmig.formats")


def target_page_size(version: str | None = None) -> int:
    """The target page size of a version's streams unless a CONFIGURATION says otherwise:
    ``1 << default_target_page_bits``."""
    return 1 << load_profile(version).default_target_page_bits


def available_versions() -> list[str]:
    names = [
        entry.name.removeprefix("qemu-").removesuffix(".toml")
        for entry in formats_dir().iterdir()
        if entry.name.startswith("qemu-") and entry.name.endswith(".toml")
    ]
    return sorted(names, key=lambda name: tuple(int(part) for part in name.split(".")))


@functools.cache
def load_profile(version: str | None = None) -> Profile:
    """The profile for a QEMU version such as ``"7.2"``; ``None`` means the default."""
    name = version or DEFAULT_VERSION
    entry = formats_dir() / f"qemu-{name}.toml"
    if not entry.is_file():
        known = ", ".join(available_versions())
        raise QmigError("--qemu-version", f"unknown QEMU version {name!r} (known: {known})")
    return read_profile(entry, name)


def read_profile(entry: Traversable, version: str) -> Profile:
    """Parse and check one profile file (its ``name`` must be its file's version)."""
    # A shipped profile is named as it is in the repository, where it is to be fixed.
    shipped = entry == importlib.resources.files("qmig.formats") / entry.name
    source = f"formats/{entry.name}" if shipped else str(entry)
    try:
        with entry.open("rb") as file:
            data = tomllib.load(file)
    except tomllib.TOMLDecodeError as error:
        raise QmigError(source, f"not TOML: {error}") from None
    profile = Profile.from_toml(data, source)
    if profile.name != version:
        raise QmigError(source, f"name: {profile.name!r} is not the file's version {version!r}")
    return profile
