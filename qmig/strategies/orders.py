"""Command orders: well-formed postcopy records in any order behind a valid opening."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hypothesis import strategies as st

from qmig.strategies.basics import _profile, _schema, uints
from qmig.wire import messages as m

ORDER_STEPS = (
    "OPEN_RETURN_PATH",
    "PING",
    "POSTCOPY_ADVISE",
    "POSTCOPY_RAM_DISCARD",
    "POSTCOPY_LISTEN",
    "POSTCOPY_RUN",
    "PACKAGED",
    "RAM",
    "EOF",
)


@dataclass(frozen=True)
class CommandOrder:
    """A stream whose commands come in any order: the bytes and the steps, in words."""

    version: str
    data: bytes = field(repr=False)
    steps: tuple[str, ...]
    block: m.RamBlockInfo


@st.composite
def command_orders(draw: st.DrawFn, version: str = "7.2", *, max_steps: int = 12) -> CommandOrder:
    """Header, CONFIGURATION and a one-block ``ram`` setup, then postcopy commands, page
    records and EOF in any order (PACKAGED holds LISTEN / PING / RUN in any order).

    Each record is well formed and its ranges fit the block: only the order is random, so
    what a destination refuses is the order. This is what qmig's state-machine tests and
    ``qmig fuzz differential`` send::

        @given(qs.command_orders("7.2"))
        def test_destination_verdicts(order):
            dest = Destination("7.2")
            dest.receive_data(order.data)
            ...  # compare with your model of QEMU's PostcopyState rules
    """
    schema = _schema(version)
    page = schema.target_page_size
    block = m.RamBlockInfo("pc.ram", draw(st.integers(1, 64)) * page)
    out = bytearray(schema.build_opening(m.Configuration("pc-i440fx-7.2")))
    out += schema.build_ram_setup(2, (block,))
    pages = block.used_length // page
    steps = []
    for step in draw(st.lists(st.sampled_from(ORDER_STEPS), max_size=max_steps)):
        steps.append(step)
        if step == "OPEN_RETURN_PATH":
            out += schema.build_command(m.OpenReturnPath())
        elif step == "PING":
            out += schema.build_command(m.Ping(draw(uints(32))))
        elif step == "POSTCOPY_ADVISE":
            out += schema.build_command(m.PostcopyAdvise(page, page))
        elif step == "POSTCOPY_RAM_DISCARD":
            first = draw(st.integers(0, pages - 1))
            count = draw(st.integers(1, pages - first))
            span = m.DiscardRange(first * page, count * page)
            out += schema.build_command(m.PostcopyRamDiscard(block.idstr, (span,)))
        elif step == "POSTCOPY_LISTEN":
            out += schema.build_command(m.PostcopyListen())
        elif step == "POSTCOPY_RUN":
            out += schema.build_command(m.PostcopyRun())
        elif step == "PACKAGED":
            inner = draw(st.permutations(["POSTCOPY_LISTEN", "PING", "POSTCOPY_RUN"]))
            commands: dict[str, Any] = {
                "POSTCOPY_LISTEN": m.PostcopyListen(),
                "PING": m.Ping(3),
                "POSTCOPY_RUN": m.PostcopyRun(),
            }
            blob = b"".join(schema.build_command(commands[name]) for name in inner)
            out += schema.build_packaged(blob)
            steps[-1] = f"PACKAGED({', '.join(inner)})"
        elif step == "RAM":
            offset = draw(st.integers(0, pages - 1)) * page
            record = schema.build_ram_page(m.RamPage(block.idstr, offset, True, b"\x00"))
            out += schema.build_section(m.SectionPart(2)) + record
            out += schema.build_ram_flag("EOS") + schema.build_footer(2)
        else:
            out += schema.eof.build(m.Eof())
    return CommandOrder(_profile(version).name, bytes(out), tuple(steps), block)
