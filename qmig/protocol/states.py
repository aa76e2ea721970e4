"""The destination's PostcopyState rules, as data.

Everything that decides whether a postcopy command is legal, and where it leads, lives in
this file, so that the destination machine, the tests, the documentation and the
differential fuzzer all read one table. The rules are QEMU's (``migration/savevm.c``):

    NONE --ADVISE--> ADVISE --RAM_DISCARD--> DISCARD --LISTEN--> LISTENING --RUN--> RUNNING
                        \\_________________LISTEN_________________/          (EOF) --> END

DISCARD is skipped when nothing was discarded. Some commands move the state before they
check the old one (QEMU's atomic exchange), which matters for what a failed command leaves
behind; the table records that too.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from qmig.wire.profiles import Profile


class PostcopyState(enum.IntEnum):
    """QEMU's incoming postcopy state; the values are QEMU's, as its messages print them."""

    NONE = 0
    ADVISE = 1
    DISCARD = 2
    LISTENING = 3
    RUNNING = 4
    END = 5


S = PostcopyState


@dataclass(frozen=True)
class Transition:
    """A command's rule: the states it is legal in and the state it leads to."""

    command: str
    allowed: frozenset[PostcopyState]
    next_state: PostcopyState
    sets_before_check: bool  # QEMU moves the state first, then checks the old one


def transitions(profile: Profile) -> dict[str, Transition]:
    """The PostcopyState transition table of one QEMU version."""
    return {
        rule.command: rule
        for rule in (
            Transition("POSTCOPY_ADVISE", frozenset({S.NONE}), S.ADVISE, True),
            Transition("POSTCOPY_RAM_DISCARD", frozenset({S.ADVISE, S.DISCARD}), S.DISCARD, False),
            Transition("POSTCOPY_LISTEN", frozenset({S.ADVISE, S.DISCARD}), S.LISTENING, True),
            Transition(
                "POSTCOPY_RUN",
                frozenset({S.LISTENING}),
                S.RUNNING,
                profile.run_sets_state_before_check,
            ),
        )
    }


def is_advised(state: PostcopyState) -> bool:
    """QEMU's "advised": ADVISE <= state < END (selects the MEM_SIZE page-size field)."""
    return S.ADVISE <= state < S.END


def is_postcopy_running(state: PostcopyState) -> bool:
    """QEMU's "running": LISTENING <= state < END (pages are placed with userfaultfd)."""
    return S.LISTENING <= state < S.END
