"""The structure-aware mutations aim at the fields the profile says are there."""

from __future__ import annotations

import random

import pytest

from qmig.fuzz.mutate import Mutator
from qmig.wire import messages as m
from qmig.wire.schema import schema_for


@pytest.mark.parametrize("version", ["2.9", "7.2", "10.0"])
def test_length_fields_are_found_in_the_commands_of_the_version(version: str) -> None:
    schema = schema_for(version)
    commands = [m.Ping(5), m.PostcopyRamDiscard("pc.ram", (m.DiscardRange(0, 4096),))]
    data = bytearray()
    expected = []
    for command in commands:
        expected.append(len(data) + schema.command_length_at)
        data += schema.build_command(command)
    mutator = Mutator(random.Random(0), [], version=version)
    assert mutator._length_fields(data) == expected
    for at, command in zip(expected, commands, strict=True):
        length = int.from_bytes(data[at : at + 2], "big")
        assert length == len(schema.build_command(command)) - schema.command_header_size


def test_a_discards_name_length_byte_is_where_the_mutation_writes_it() -> None:
    schema = schema_for("7.2")
    command = schema.build_command(m.PostcopyRamDiscard("pc.ram", (m.DiscardRange(0, 4096),)))
    mutator = Mutator(random.Random(0), [], version="7.2")
    assert command[mutator.discard_name_length_at] == len("pc.ram")


def test_interesting_values_hold_the_profiles_numbers() -> None:
    schema = schema_for("7.2")
    interesting = Mutator(random.Random(0), [], version="7.2").interesting
    assert set(schema.profile.section_types.values()) <= set(interesting.u8)
    assert schema.target_page_size in interesting.u32
    discard = schema.profile.command_lengths["POSTCOPY_RAM_DISCARD"].min_length
    assert {discard - 1, discard} <= set(interesting.u16)
