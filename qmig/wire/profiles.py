"""Per-QEMU-version wire profiles: the numbers and rules in ``formats/qemu-*.toml`` as objects.

The schemas in :mod:`qmig.wire.schema` are built from a :class:`Profile`; nothing in qmig
hard-codes a command number, a message number or a RAM flag.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import os
import tomllib
from dataclasses import dataclass
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from qmig.errors import QmigError

DEFAULT_VERSION = "10.0"
# The profiles ship inside the package (formats/ is mapped to qmig.formats at build time);
# QMIG_FORMATS points qmig at another folder of profiles instead.
FORMATS_ENV = "QMIG_FORMATS"

VARIABLE = "variable"


@dataclass(frozen=True)
class LengthRule:
    """The payload length a receiver insists on for one command or return-path message."""

    accepted: tuple[int, ...] | None  # None: variable, checked by the message itself
    min_length: int = 0

    @classmethod
    def from_toml(cls, spec: dict[str, Any]) -> LengthRule:
        length = spec["length"]
        accepted: tuple[int, ...] | None
        if length == VARIABLE:
            accepted = None
        elif isinstance(length, int):
            accepted = (length,)
        else:
            accepted = tuple(length)
        return cls(accepted, spec.get("min_length", 0))

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
    configuration: str  # "required" | "optional"
    section_footer: bool
    configuration_subsections: tuple[str, ...]
    validated_capabilities: tuple[str, ...]
    default_target_page_bits: int
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
    mem_size_page_size: str
    mem_size_mr_addr: str
    request_range_check: str
    postcopy_host_page_order: str
    max_xbzrle_length: str  # "target-page": an XBZRLE body may not exceed one target page
    run_sets_state_before_check: bool
    reject_second_listen: bool
    package_loaded_ping: int | None
    # Where this QEMU misbehaves on hostile input and qmig deliberately does not follow it:
    # name -> {tag, qemu, qmig, summary} (formats/quirks.md explains each; the differential
    # fuzzer reads it to tell a known difference from a finding).
    quirks: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

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
    def from_toml(cls, data: dict[str, Any]) -> Profile:
        stream, ram, rp = data["stream"], data["ram"], data["return_path"]
        postcopy = data.get("postcopy", {})
        return cls(
            name=data["name"],
            description=data["description"],
            magic=stream["magic"],
            stream_version=stream["version"],
            obsolete_versions=tuple(stream["obsolete_versions"]),
            configuration=stream["configuration"],
            section_footer=stream["section_footer"],
            configuration_subsections=tuple(stream["configuration_subsections"]),
            validated_capabilities=tuple(stream["validated_capabilities"]),
            default_target_page_bits=stream["default_target_page_bits"],
            section_types=dict(data["section_types"]),
            commands={name: spec["number"] for name, spec in data["commands"].items()},
            command_lengths={
                name: LengthRule.from_toml(spec) for name, spec in data["commands"].items()
            },
            packaged_max_length=data["packaged"]["max_length"],
            discard_version=data["discard"]["version"],
            max_discard_ranges=data["discard"]["max_ranges_per_command"],
            rp_max_length=rp["max_length"],
            rp_messages={name: spec["number"] for name, spec in rp["messages"].items()},
            rp_lengths={name: LengthRule.from_toml(spec) for name, spec in rp["messages"].items()},
            ram_section_version=ram["section_version"],
            ram_flags=dict(ram["flags"]),
            mem_size_page_size=ram["mem_size_page_size"],
            mem_size_mr_addr=ram["mem_size_mr_addr"],
            request_range_check=ram["request_range_check"],
            postcopy_host_page_order=ram["postcopy_host_page_order"],
            max_xbzrle_length=ram["max_xbzrle_length"],
            run_sets_state_before_check=postcopy.get("run_sets_state_before_check", False),
            reject_second_listen=postcopy.get("reject_second_listen", False),
            package_loaded_ping=postcopy.get("package_loaded_ping"),
            quirks=dict(data.get("quirks", {})),
        )


def formats_dir() -> Traversable:
    """The folder of ``qemu-*.toml`` profiles: ``$QMIG_FORMATS``, else the shipped ones."""
    override = os.environ.get(FORMATS_ENV)
    if override:
        if not Path(override).is_dir():
            raise QmigError(FORMATS_ENV, f"{override}: no such folder of profiles")
        return Path(override)
    return importlib.resources.files("qmig.formats")


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
    with entry.open("rb") as file:
        return Profile.from_toml(tomllib.load(file))
