"""Both machines' states and legal transitions, as data.

Two rules shape this file (after h11's ``_state.py``). Everything that decides whether an
input is legal in a state, and which state it leads to, lives here: the machines look their
transitions up and hold no rule of their own beyond the checks of a message's contents. And
the tables are plain dicts (state -> input -> next state, or a refusal), so that a test, the
documentation and the differential fuzzer can all read and walk them.

The destination's rules are QEMU's (``migration/savevm.c``)::

    NONE --ADVISE--> ADVISE --RAM_DISCARD--> DISCARD --LISTEN--> LISTENING --RUN--> RUNNING
                        \\_________________LISTEN_________________/        (EOF) --> END
    NONE / ADVISE / DISCARD --EOF--> EOF_READ --VMDESCRIPTION (or anything)--> END

DISCARD is skipped when nothing was discarded. Some commands move QEMU's state before they
check the old one (an atomic exchange); the table records that too, as ``sets_before_check``.

Postcopy recovery (QEMU 3.0 on; ``migration/savevm.c``, ``migration.c``): only once the
guest runs here can a broken channel pause the migration instead of failing it::

    RUNNING --channel broken--> PAUSED --new channel--> RECOVER --POSTCOPY_RESUME--> RUNNING
                                   ^___channel broken (a double failure)___/

In RECOVER, RECV_BITMAP is answered with the block's received bitmap. POSTCOPY_RESUME out of
RECOVER is reported and ignored, as QEMU does ("illegal resume received"); so is RECV_BITMAP
("only used for recovery"), which is then not answered. PAUSED and RECOVER are QEMU's
incoming migration *status* (its PostcopyState stays RUNNING meanwhile).

The source's rules are qmig's plan of QEMU's outgoing side (``migration/migration.c``)::

    IDLE --start--> PRECOPY --pass sent--> PASS_COMPLETE --begin_pass--> PRECOPY
    PRECOPY / PASS_COMPLETE --start_postcopy--> POSTCOPY --stream sent--> COMPLETING
    PRECOPY / PASS_COMPLETE --complete_precopy--> COMPLETING --SHUT--> DONE
    POSTCOPY / COMPLETING --channel broken--> PAUSED --resume()--> RECOVER
    RECOVER --RECV_BITMAP (each block)--> RECOVER --RESUME_ACK--> POSTCOPY
    RECOVER --channel broken--> PAUSED

(QEMU's ``postcopy-paused``, ``postcopy-recover``; a precopy COMPLETING that breaks fails:
the machine checks that it is in postcopy.) A RESUME_ACK outside RECOVER moves nothing in
QEMU (its state change is a compare-and-swap from RECOVER) and is ignored; an RP
RECV_BITMAP outside RECOVER fails the migration.

Failure is reachable from every state and is not a table entry (like h11's ERROR).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

from qmig.wire.profiles import Profile


class DestinationState(enum.IntEnum):
    """The destination's state. The first six are QEMU's PostcopyState, with QEMU's values
    (its messages print them); the others are qmig's, numbered past QEMU's."""

    NONE = 0
    ADVISE = 1
    DISCARD = 2
    LISTENING = 3
    RUNNING = 4
    END = 5
    EOF_READ = 16  # precopy EOF read: the VMDESCRIPTION (or the end of input) follows
    PAUSED = 17  # postcopy recovery: the channel broke after RUN; RAM and requests are kept
    RECOVER = 18  # a new channel is up: bitmaps are asked for, then POSTCOPY_RESUME
    FAILED = 19


# QEMU's name, for the states it has.
PostcopyState = DestinationState


class DestinationInput(enum.Enum):
    """What moves the destination: the stream's commands and end records, by QEMU's names."""

    ADVISE = "POSTCOPY_ADVISE"
    RAM_DISCARD = "POSTCOPY_RAM_DISCARD"
    LISTEN = "POSTCOPY_LISTEN"
    RUN = "POSTCOPY_RUN"
    EOF = "EOF"
    VMDESCRIPTION = "VMDESCRIPTION"
    CHANNEL_BROKEN = "channel broken"  # the stream failed or ended early
    NEW_CHANNEL = "new channel"  # migrate-recover's channel is connected
    RECV_BITMAP = "RECV_BITMAP"
    RESUME = "POSTCOPY_RESUME"


class SourceState(enum.Enum):
    IDLE = "idle"
    PRECOPY = "precopy"
    PASS_COMPLETE = "pass-complete"  # a precopy pass is out: sync, then decide what next
    POSTCOPY = "postcopy"
    COMPLETING = "completing"  # everything sent; waiting for SHUT
    DONE = "done"
    PAUSED = "postcopy-paused"  # the channel broke in postcopy: wait for resume()
    RECOVER = "postcopy-recover"  # a new channel: bitmaps, POSTCOPY_RESUME, RESUME_ACK
    FAILED = "failed"


class SourceInput(enum.Enum):
    """What moves the source: its runner's calls, its own progress, the return path."""

    START = "start()"
    SYNC_DIRTY = "sync_dirty()"
    BEGIN_PASS = "begin_pass()"
    START_POSTCOPY = "start_postcopy()"
    COMPLETE_PRECOPY = "complete_precopy()"
    PASS_SENT = "pass sent"  # the precopy sweep found nothing more to send
    STREAM_SENT = "stream sent"  # postcopy: every page is out, EOF queued
    NO_RETURN_PATH = "no return path"  # nothing will answer: done once everything is queued
    REQUEST = "page request"  # REQ_PAGES / REQ_PAGES_ID
    SHUT = "SHUT"
    RETURN_PATH_CLOSED = "return path closed"
    CHANNEL_BROKEN = "channel broken"  # the runner lost the connection
    RESUME = "resume()"  # QEMU's migrate with resume: true, on a new channel
    RECV_BITMAP = "RECV_BITMAP"  # the return path's received bitmap of one block
    RESUME_ACK = "RESUME_ACK"


# Inputs a runner asks for (illegal ones are LocalProtocolError); the rest come from the
# destination (RemoteProtocolError) or the machine's own progress.
LOCAL_SOURCE_INPUTS: Final = frozenset(
    {
        SourceInput.START,
        SourceInput.SYNC_DIRTY,
        SourceInput.BEGIN_PASS,
        SourceInput.START_POSTCOPY,
        SourceInput.COMPLETE_PRECOPY,
        SourceInput.PASS_SENT,
        SourceInput.STREAM_SENT,
        SourceInput.NO_RETURN_PATH,
        SourceInput.CHANNEL_BROKEN,
        SourceInput.RESUME,
    }
)


@dataclass(frozen=True)
class Ignored:
    """A table entry for an input that QEMU reports and then ignores in a state: nothing
    moves (the reason is the notice's detail)."""

    reason: str


@dataclass(frozen=True)
class Refused:
    """A table entry for an input that is illegal in a state for a reason beyond "wrong
    state" (the reason is the error's detail)."""

    reason: str


D = DestinationState
DI = DestinationInput
SS = SourceState
SI = SourceInput

DestinationEntry = DestinationState | Refused | Ignored
SourceEntry = SourceState | Refused | Ignored
DestinationTable = dict[DestinationState, dict[DestinationInput, DestinationEntry]]
SourceTable = dict[SourceState, dict[SourceInput, SourceEntry]]


@dataclass(frozen=True)
class DestinationRules:
    """One QEMU version's destination rules: the table and how its commands apply it."""

    table: DestinationTable
    # QEMU stores the new state first, then checks the old one: a refused command still
    # leaves the state it leads to (what a failed migration's cleanup then sees).
    sets_before_check: dict[DestinationInput, DestinationState]
    # 2.9/2.10 (reject_second_listen): a LISTEN that passes the state check is refused when
    # a listen thread already runs. The state check refuses a second LISTEN first in a
    # sequential stream (the listen thread only runs from LISTENING on); it is reached only
    # when the state went back to ADVISE meanwhile, as a refused ADVISE on the listen thread
    # stores it while the main thread still reads the package. 7.2 has no such check.
    listen_once: bool


def destination_rules(profile: Profile) -> DestinationRules:
    """The destination's transition table for one QEMU version."""
    to_run = {DI.RUN: D.RUNNING}
    precopy_eof = {DI.EOF: D.EOF_READ}
    # Outside recovery: reported, not acted on (RECV_BITMAP is then not answered).
    stray = {
        DI.RECV_BITMAP: Ignored("MSG_RP_RECV_BITMAP only used for recovery"),
        DI.RESUME: Ignored("illegal resume received"),
    }
    table: DestinationTable = {
        D.NONE: {DI.ADVISE: D.ADVISE, **precopy_eof, **stray},
        D.ADVISE: {DI.RAM_DISCARD: D.DISCARD, DI.LISTEN: D.LISTENING, **precopy_eof, **stray},
        # qmig completes as precopy here; QEMU hangs (formats/quirks.md: eof-in-discard).
        D.DISCARD: {DI.RAM_DISCARD: D.DISCARD, DI.LISTEN: D.LISTENING, **precopy_eof, **stray},
        D.LISTENING: {**to_run, DI.EOF: Refused("stream ended before POSTCOPY_RUN"), **stray},
        # Only a running guest pauses: before RUN the device state is not loaded yet.
        D.RUNNING: {DI.EOF: D.END, DI.CHANNEL_BROKEN: D.PAUSED, **stray},
        # QEMU reads one record after a precopy EOF, expecting VMDESCRIPTION, and only
        # reports anything else ("Expected vmdescription section"): the state is loaded.
        D.EOF_READ: {action: D.END for action in DI if action is not DI.NEW_CHANNEL},
        D.END: {},
        D.PAUSED: {DI.NEW_CHANNEL: D.RECOVER, DI.CHANNEL_BROKEN: D.PAUSED},
        D.RECOVER: {
            DI.RECV_BITMAP: D.RECOVER,
            DI.RESUME: D.RUNNING,
            DI.CHANNEL_BROKEN: D.PAUSED,
            # QEMU's loader takes any record here; the source sends pages only after
            # RESUME_ACK, so a stream that ends now ends too early.
            DI.EOF: Refused("stream ended during postcopy recovery"),
        },
        D.FAILED: {},
    }
    before = {DI.ADVISE: D.ADVISE, DI.LISTEN: D.LISTENING}
    if profile.run_sets_state_before_check:
        before[DI.RUN] = D.RUNNING
    return DestinationRules(table, before, profile.reject_second_listen)


def source_table() -> SourceTable:
    """The source's transition table (the same for every QEMU version qmig sends as)."""
    sending = (SS.PRECOPY, SS.PASS_COMPLETE, SS.POSTCOPY, SS.COMPLETING)
    table: SourceTable = {
        SS.IDLE: {SI.START: SS.PRECOPY, SI.SYNC_DIRTY: SS.IDLE},
        SS.PRECOPY: {
            SI.SYNC_DIRTY: SS.PRECOPY,
            SI.PASS_SENT: SS.PASS_COMPLETE,
            SI.START_POSTCOPY: SS.POSTCOPY,
            SI.COMPLETE_PRECOPY: SS.COMPLETING,
        },
        SS.PASS_COMPLETE: {
            SI.SYNC_DIRTY: SS.PASS_COMPLETE,
            SI.BEGIN_PASS: SS.PRECOPY,
            SI.START_POSTCOPY: SS.POSTCOPY,
            SI.COMPLETE_PRECOPY: SS.COMPLETING,
        },
        SS.POSTCOPY: {
            SI.SYNC_DIRTY: Refused("the guest cannot dirty memory after switchover"),
            SI.STREAM_SENT: SS.COMPLETING,
            SI.CHANNEL_BROKEN: SS.PAUSED,
        },
        # Postcopy's end is not confirmed until SHUT: the stream's tail may be lost.
        SS.COMPLETING: {
            SI.SHUT: SS.DONE,
            SI.NO_RETURN_PATH: SS.DONE,
            SI.CHANNEL_BROKEN: SS.PAUSED,
        },
        SS.DONE: {SI.RETURN_PATH_CLOSED: SS.DONE},
        SS.PAUSED: {
            SI.RESUME: SS.RECOVER,
            SI.CHANNEL_BROKEN: SS.PAUSED,
            SI.RETURN_PATH_CLOSED: SS.PAUSED,
        },
        SS.RECOVER: {
            SI.RECV_BITMAP: SS.RECOVER,
            SI.RESUME_ACK: SS.POSTCOPY,
            SI.CHANNEL_BROKEN: SS.PAUSED,
            SI.RETURN_PATH_CLOSED: SS.PAUSED,
        },
        # The destination hanging up on a failed migration is expected, not a second error.
        SS.FAILED: {SI.RETURN_PATH_CLOSED: SS.FAILED},
    }
    for state in (*sending, SS.RECOVER):
        # The destination may ask for pages whenever the stream is open (QEMU queues them).
        table[state][SI.REQUEST] = state
    for state in SS:
        if state is not SS.RECOVER:
            table[state].setdefault(SI.RESUME_ACK, Ignored("not in postcopy recovery"))
    return table


# After SHUT(0) QEMU's return-path thread exits: nothing more of the return path is read.
SOURCE_STOPS_READING: Final = frozenset({SS.DONE})
# Once the load is complete QEMU's destination stops reading (the listen thread at a
# postcopy EOF, the main thread after VMDESCRIPTION): whatever follows is never looked at.
DESTINATION_STOPS_READING: Final = frozenset({D.END})

# The error detail for an input a state has no entry for ({state}: the state's value).
SOURCE_REFUSALS: Final = {
    SI.SHUT: "the destination shut down during {state}, before the stream was complete",
    SI.RETURN_PATH_CLOSED: "the destination closed the connection during {state}",
    SI.REQUEST: "page request during {state}",
    SI.RECV_BITMAP: "MSG_RP_RECV_BITMAP only used for recovery (state {state})",
    SI.CHANNEL_BROKEN: "the connection broke during {state}",
    SI.RESUME: "cannot resume if there is no paused migration (state {state})",
}


def source_refusal(state: SourceState, action: SourceInput) -> str:
    template = SOURCE_REFUSALS.get(action, f"{action.value} in state {{state}}")
    return template.format(state=state.value)


def destination_refusal(state: DestinationState) -> str:
    return f"wrong postcopy state {state.name}"


# Recovery's states: QEMU's PostcopyState is RUNNING all through them.
RECOVERY_STATES: Final = frozenset({D.PAUSED, D.RECOVER})


def is_advised(state: DestinationState) -> bool:
    """QEMU's "advised": ADVISE <= state < END (selects the MEM_SIZE page-size field)."""
    return D.ADVISE <= state < D.END or state in RECOVERY_STATES


def is_postcopy_running(state: DestinationState) -> bool:
    """QEMU's "running": LISTENING <= state < END (pages are placed with userfaultfd)."""
    return D.LISTENING <= state < D.END or state in RECOVERY_STATES
