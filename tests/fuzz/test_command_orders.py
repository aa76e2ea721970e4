"""``qmig.strategies.command_orders``: well-formed records in any order.

The reader delimits every one of them (only the order is random), so the stream reader
accepts each whole order that ends in EOF; the destination ends each order in a verdict,
never another exception, and refuses only by naming a command, EOF or the stream's end.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qmig import strategies as qs
from qmig.fuzz.targets import TARGETS

pytestmark = pytest.mark.timeout(120)

REFUSED_BY = {
    "PING",
    "POSTCOPY_ADVISE",
    "POSTCOPY_RAM_DISCARD",
    "POSTCOPY_LISTEN",
    "POSTCOPY_RUN",
    "EOF",
    "stream",
    "RAM",
}


@pytest.mark.parametrize("version", ["2.9", "7.2", "10.0"])
@given(data=st.data())
@settings(deadline=None)
def test_command_orders_end_in_a_verdict(version: str, data: st.DataObject) -> None:
    order = data.draw(qs.command_orders(version))
    read = TARGETS["stream"].check(order.data, version)
    if order.steps and order.steps[-1] == "EOF" and "EOF" not in order.steps[:-1]:
        assert read.accepted, (order.steps, read.line())
    verdict = TARGETS["destination"].check(order.data, version)
    if not verdict.accepted:
        assert verdict.what in REFUSED_BY, (order.steps, verdict.line())
        assert verdict.offset is not None and 0 <= verdict.offset <= len(order.data)
