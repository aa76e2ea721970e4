"""One strategy per QEMU_VM_COMMAND, and :func:`commands` for any of them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hypothesis import strategies as st

from qmig.strategies.basics import U16_MAX, U32_MAX, _profile, names, uints
from qmig.wire import messages as m
from qmig.wire.schema import discard_range, discard_range_offset


def open_return_paths() -> st.SearchStrategy[m.OpenReturnPath]:
    return st.just(m.OpenReturnPath())


def pings() -> st.SearchStrategy[m.Ping]:
    return st.builds(m.Ping, uints(32))


def postcopy_advises(version: str | None = None) -> st.SearchStrategy[m.PostcopyAdvise]:
    """ADVISE with 16 bytes, and the 0-byte form where ``version`` accepts it."""
    sixteen = st.builds(m.PostcopyAdvise, uints(64), uints(64))
    rule = _profile(version).command_lengths["POSTCOPY_ADVISE"]
    if rule.allows(0):
        return st.just(m.PostcopyAdvise()) | sixteen
    return sixteen


def postcopy_listens() -> st.SearchStrategy[m.PostcopyListen]:
    return st.just(m.PostcopyListen())


def postcopy_runs() -> st.SearchStrategy[m.PostcopyRun]:
    return st.just(m.PostcopyRun())


def discard_ranges() -> st.SearchStrategy[m.DiscardRange]:
    """Any range the wire can carry; :func:`valid_discards` makes QEMU-valid ones."""
    return st.builds(m.DiscardRange, uints(64), uints(64))


@st.composite
def postcopy_ram_discards(
    draw: st.DrawFn,
    blocks: st.SearchStrategy[str] | None = None,
    max_ranges: int = 12,
) -> m.PostcopyRamDiscard:
    """A discard command; at most ``max_ranges`` ranges (and what a be16 length allows)."""
    block = draw(blocks or names())
    room = (U16_MAX - discard_range_offset(block, 0)) // discard_range().sizeof()
    ranges = draw(st.lists(discard_ranges(), min_size=1, max_size=min(max_ranges, room)))
    return m.PostcopyRamDiscard(block, tuple(ranges))


def packageds(max_length: int = U32_MAX) -> st.SearchStrategy[m.Packaged]:
    return st.builds(m.Packaged, st.integers(0, max_length))


def enable_colos() -> st.SearchStrategy[m.EnableColo]:
    return st.just(m.EnableColo())


def postcopy_resumes() -> st.SearchStrategy[m.PostcopyResume]:
    return st.just(m.PostcopyResume())


def recv_bitmaps() -> st.SearchStrategy[m.RecvBitmap]:
    return st.builds(m.RecvBitmap, names())


def switchover_starts() -> st.SearchStrategy[m.SwitchoverStart]:
    return st.just(m.SwitchoverStart())


COMMAND_STRATEGIES: dict[str, Callable[[str | None], st.SearchStrategy[Any]]] = {
    "OPEN_RETURN_PATH": lambda version: open_return_paths(),
    "PING": lambda version: pings(),
    "POSTCOPY_ADVISE": postcopy_advises,
    "POSTCOPY_LISTEN": lambda version: postcopy_listens(),
    "POSTCOPY_RUN": lambda version: postcopy_runs(),
    "POSTCOPY_RAM_DISCARD": lambda version: postcopy_ram_discards(),
    "PACKAGED": lambda version: packageds(_profile(version).packaged_max_length),
    "ENABLE_COLO": lambda version: enable_colos(),
    "POSTCOPY_RESUME": lambda version: postcopy_resumes(),
    "RECV_BITMAP": lambda version: recv_bitmaps(),
    "SWITCHOVER_START": lambda version: switchover_starts(),
}


def commands(version: str | None = None) -> st.SearchStrategy[Any]:
    """Any QEMU_VM_COMMAND that ``version`` knows (PACKAGED without its blob)."""
    known = [name for name in _profile(version).commands if name in COMMAND_STRATEGIES]
    return st.one_of([COMMAND_STRATEGIES[name](version) for name in known])
