"""The source's C answer thread goes by its own name (what ps, top and perf show, and what a
user renices or pins it by)."""

from __future__ import annotations

import os

from test_fast_answer import Thread, postcopy_source
from thread_names import left, named


def test_the_answer_thread() -> None:
    earlier = named("qmig-answer", timeout=0)
    thread = Thread(postcopy_source())
    try:
        mine = named("qmig-answer", besides=earlier)
        assert len(mine) == 1
        assert os.getpid() not in mine  # the thread's name, not the process's
    finally:
        thread.close()
    assert not left("qmig-answer", mine)
