"""One strategy per return-path message, and :func:`return_path_messages` for any."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hypothesis import strategies as st

from qmig.strategies.basics import _profile, names, uints
from qmig.wire import messages as m


def shuts() -> st.SearchStrategy[m.Shut]:
    return st.builds(m.Shut, uints(32))


def pongs() -> st.SearchStrategy[m.Pong]:
    return st.builds(m.Pong, uints(32))


def req_pages_ids(blocks: st.SearchStrategy[str] | None = None) -> st.SearchStrategy[Any]:
    return st.builds(m.ReqPagesId, uints(64), uints(32), blocks or names())


def req_pages() -> st.SearchStrategy[m.ReqPages]:
    return st.builds(m.ReqPages, uints(64), uints(32))


def rp_recv_bitmaps() -> st.SearchStrategy[m.RpRecvBitmap]:
    return st.builds(m.RpRecvBitmap, names())


def resume_acks() -> st.SearchStrategy[m.ResumeAck]:
    return st.builds(m.ResumeAck, uints(32))


def switchover_acks() -> st.SearchStrategy[m.SwitchoverAck]:
    return st.just(m.SwitchoverAck())


RETURN_PATH_STRATEGIES: dict[str, Callable[[], st.SearchStrategy[Any]]] = {
    "SHUT": shuts,
    "PONG": pongs,
    "REQ_PAGES_ID": req_pages_ids,
    "REQ_PAGES": req_pages,
    "RECV_BITMAP": rp_recv_bitmaps,
    "RESUME_ACK": resume_acks,
    "SWITCHOVER_ACK": switchover_acks,
}


def return_path_messages(version: str | None = None) -> st.SearchStrategy[Any]:
    """Any return-path message that ``version`` knows."""
    known = [name for name in _profile(version).rp_messages if name in RETURN_PATH_STRATEGIES]
    return st.one_of([RETURN_PATH_STRATEGIES[name]() for name in known])
