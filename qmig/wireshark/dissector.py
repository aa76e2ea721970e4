"""The Lua dissector for one QEMU version: ``dissector.lua`` with that profile's numbers.

The Lua code knows the layouts by name (as :mod:`qmig.wire.schema` does); every number, the
section types, command and return-path message numbers with their length rules, the RAM
flags, comes from the profile and is written into the ``PROFILE`` table at the top of the
generated file, so a QEMU version's dissector accepts exactly what its profile says; the
multifd handshake and packet sizes come from the profile's ``[multifd]`` table through
:class:`qmig.wire.multifd.MultifdSchema`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qmig.wire.multifd import MultifdSchema
from qmig.wire.profiles import LengthRule, Profile, load_profile
from qmig.wire.schema import RECV_BITMAP_END_MARK

TEMPLATE = Path(__file__).with_name("dissector.lua")
PLACEHOLDER = "--@@PROFILE@@"

# A Python value that has a Lua literal: numbers, strings, booleans, lists, and tables keyed
# by names or numbers.
LuaValue = int | str | bool | Mapping[Any, Any] | list[Any]


def _lua(value: LuaValue, indent: str = "") -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return hex(value) if value > 9 else str(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    inner = indent + "  "
    if isinstance(value, list):
        return "{ " + ", ".join(_lua(item, inner) for item in value) + " }"
    if not value:
        return "{}"
    lines = []
    for key in sorted(value, key=lambda k: (isinstance(k, str), k)):
        name = f"[{key}]" if isinstance(key, int) else _lua_key(key)
        lines.append(f"{inner}{name} = {_lua(value[key], inner)},")
    return "{\n" + "\n".join(lines) + f"\n{indent}}}"


def _lua_key(key: str) -> str:
    return key if key.isidentifier() else f"[{_lua(key)}]"


def _rule(name: str, rule: LengthRule) -> dict[str, LuaValue]:
    spec: dict[str, LuaValue] = {"name": name}
    if rule.accepted is None:
        spec["min"] = rule.min_length
    else:
        spec["lengths"] = list(rule.accepted)
    return spec


def profile_table(profile: Profile) -> dict[str, LuaValue]:
    """What the Lua code reads from ``PROFILE``."""
    return {
        "name": profile.name,
        "magic": profile.magic,
        "stream_version": profile.stream_version,
        "configuration_required": profile.configuration == "required",
        "section_footer": profile.section_footer,
        "target_page_bits": profile.default_target_page_bits,
        "section_types": dict(profile.section_types),
        "commands": {
            number: _rule(name, profile.command_lengths[name])
            for name, number in profile.commands.items()
        },
        "packaged_max": profile.packaged_max_length,
        "rp_max_length": profile.rp_max_length,
        "rp_messages": {
            number: _rule(name, profile.rp_lengths[name])
            for name, number in profile.rp_messages.items()
        },
        "recv_bitmap_end_mark": f"{RECV_BITMAP_END_MARK:016x}",
        "ram_flags": dict(profile.ram_flags),
        "mem_size_mr_addr": profile.mem_size_mr_addr,
        "multifd": _multifd_table(profile),
    }


def _multifd_table(profile: Profile) -> dict[str, LuaValue] | bool:
    """The ``[multifd]`` table's numbers, and the packet's sizes as the schema computes
    them (False: the version has no multifd)."""
    if profile.multifd is None:
        return False
    spec = profile.multifd
    schema = MultifdSchema(profile)
    table: dict[str, LuaValue] = {
        "magic": spec.magic,
        "version": spec.version,
        "init_size": schema.init_size,
        "hdr_size": schema.hdr_size,
        "packet_size": schema.packet_size,
        "device_state_size": schema.device_state_size,
        "data_size": spec.packet_size,
        "zero_pages_in_packet": spec.zero_pages == "packet",
        "sync_flag": spec.sync_flag,
        "compression_mask": spec.compression_mask,
        "compression": {value: name for name, value in spec.compression.items()},
        "nocomp": spec.compression["NOCOMP"],
    }
    if spec.device_state_flag is not None:
        table["device_state_flag"] = spec.device_state_flag
    return table


def render(version: str | None = None) -> str:
    """The dissector's Lua source for a QEMU version (``None``: the default profile)."""
    profile = load_profile(version)
    table = f"-- Wire profile: QEMU {profile.name} ({profile.description})\n"
    table += f"local PROFILE = {_lua(profile_table(profile))}\n"
    return TEMPLATE.read_text().replace(PLACEHOLDER, table.rstrip("\n"))


def write(path: Path, version: str | None = None) -> None:
    path.write_text(render(version))
