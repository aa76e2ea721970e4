"""The destination machine driven by random command orders, against an independent model.

The model below is QEMU's PostcopyState table written out again, by hand, from
``migration/savevm.c`` (loadvm_postcopy_handle_advise / _ram_discard / _listen / _run,
loadvm_process_command), not read from :mod:`qmig.protocol.states`: if the table there is
wrong, the two disagree here. Each rule sends one record (or a PACKAGED blob of several),
then compares the machine's verdict (accepted, or which error naming which command in which
state at which byte) and the state it is left in with the model's.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from qmig.errors import IllegalStateError, LocalProtocolError, MalformedError, RemoteProtocolError
from qmig.protocol.destination import Destination
from qmig.protocol.states import PostcopyState
from qmig.wire import messages as m
from qmig.wire.reader import END, NEED_DATA, ReturnPathReader
from qmig.wire.schema import schema_for

pytestmark = pytest.mark.timeout(300)

S = PostcopyState
PAGE = 4096
BLOCKS = {"pc.ram": 32 * PAGE, "pc.bios": 4 * PAGE}
RAM_ID = 2

# QEMU's rules, per command: (states it is legal in, state after, moved before the check?)
MODEL = {
    "POSTCOPY_ADVISE": ({S.NONE}, S.ADVISE, True),
    "POSTCOPY_RAM_DISCARD": ({S.ADVISE, S.DISCARD}, S.DISCARD, False),
    "POSTCOPY_LISTEN": ({S.ADVISE, S.DISCARD}, S.LISTENING, True),
    "POSTCOPY_RUN": ({S.LISTENING}, S.RUNNING, False),  # 7.2: checked, then set
}


@dataclass
class Expected:
    """What the model says one record does: accepted, or the error it must raise."""

    what: str | None = None  # None: accepted
    kind: type[RemoteProtocolError] = RemoteProtocolError
    state: str | None = None
    detail: str | None = None  # default for a state error: "wrong postcopy state STATE"


class DestinationModel(RuleBasedStateMachine):
    version = "7.2"

    def __init__(self) -> None:
        super().__init__()
        self.schema = schema_for(self.version)
        self.dest = Destination(self.version)
        self.stream = bytearray()  # every byte fed so far
        self.state = S.NONE
        self.return_path = False
        self.failed = False
        self.ended = False
        self.pings: list[int] = []
        self.rp = ReturnPathReader(self.version)
        self.rp_messages: list[object] = []
        self.received: dict[str, set[int]] = {name: set() for name in BLOCKS}

    @initialize(return_path=st.booleans(), split=st.integers(0, 200))
    def opening(self, return_path: bool, split: int) -> None:
        s = self.schema
        infos = tuple(m.RamBlockInfo(name, size) for name, size in BLOCKS.items())
        data = s.build_opening(m.Configuration("pc-i440fx-7.2")) + s.build_ram_setup(RAM_ID, infos)
        self._send(data[:split], Expected())
        self._send(data[split:], Expected())
        if return_path:
            self._send(s.build_command(m.OpenReturnPath()), Expected())
            self.return_path = True

    # --- sending and checking -----------------------------------------------------------

    def _send(self, data: bytes, expected: Expected, *, start: int | None = None) -> None:
        """Feed ``data``; the model's verdict for it is ``expected``, the faulty record at
        ``start`` (offset inside ``data``; default: its first byte)."""
        offset = len(self.stream) + (start or 0)
        self.stream += data
        try:
            self.dest.receive_data(data)
            while (event := self.dest.next_event()) is not NEED_DATA and event is not END:
                pass
        except RemoteProtocolError as error:
            assert expected.what is not None, f"rejected what the model accepts: {error}"
            assert isinstance(error, expected.kind), error
            assert error.what == expected.what, error
            assert error.offset == offset, (error, offset)
            if expected.state is not None:
                assert error.state == expected.state, error
                detail = expected.detail or f"wrong postcopy state {expected.state}"
                assert error.detail == detail, error
            assert "\n" not in error.one_line()
            self.failed = True
            assert self.dest.state is S.FAILED
            self._read_return_path()
            if self.return_path:
                assert self.rp_messages[-1] == m.Shut(1)
            return
        assert expected.what is None, f"accepted what the model rejects ({expected})"
        self._read_return_path()

    def _read_return_path(self) -> None:
        self.rp.feed(self.dest.data_to_send())
        self.rp_messages += [record.message for record in self.rp]

    def _command(self, name: str) -> Expected:
        """The model's verdict for a postcopy command, and its effect on the model's state."""
        allowed, after, set_first = MODEL[name]
        old = self.state
        if set_first:
            self.state = after
        if old not in allowed:
            return Expected(name, IllegalStateError, old.name)
        self.state = after
        return Expected()

    # --- rules ------------------------------------------------------------------------------

    @precondition(lambda self: not self.failed and not self.ended)
    @rule()
    def advise(self) -> None:
        expected = self._command("POSTCOPY_ADVISE")
        self._send(self.schema.build_command(m.PostcopyAdvise(PAGE, PAGE)), expected)

    @precondition(lambda self: not self.failed and not self.ended)
    @rule(
        block=st.sampled_from(sorted(BLOCKS)),
        spans=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 8)), min_size=1, max_size=4),
        unaligned=st.booleans(),
    )
    def discard(self, block: str, spans: list[tuple[int, int]], unaligned: bool) -> None:
        ranges = [m.DiscardRange(first * PAGE, count * PAGE) for first, count in spans]
        if unaligned:
            ranges[0] = m.DiscardRange(ranges[0].start + 512, ranges[0].length)
        expected = self._command("POSTCOPY_RAM_DISCARD")
        if expected.what is None:
            # Legal in this state: then every range must be aligned and inside the block.
            bad = unaligned or any(r.start + r.length > BLOCKS[block] for r in ranges)
            if bad:
                expected = Expected("POSTCOPY_RAM_DISCARD", MalformedError)
            else:
                for r in ranges:
                    self.received[block] -= set(range(r.start, r.start + r.length, PAGE))
        command = self.schema.build_command(m.PostcopyRamDiscard(block, tuple(ranges)))
        if expected.what is not None and expected.state is None:
            # A range error is reported at the range; find which one.
            first_bad = next(
                index
                for index, r in enumerate(ranges)
                if (unaligned and index == 0) or r.start + r.length > BLOCKS[block]
            )
            start = 5 + 3 + len(block) + 16 * first_bad
            self._send(command, expected, start=start)
            return
        self._send(command, expected)

    @precondition(lambda self: not self.failed and not self.ended)
    @rule()
    def listen(self) -> None:
        self._send(self.schema.build_command(m.PostcopyListen()), self._command("POSTCOPY_LISTEN"))

    @precondition(lambda self: not self.failed and not self.ended)
    @rule()
    def run(self) -> None:
        self._send(self.schema.build_command(m.PostcopyRun()), self._command("POSTCOPY_RUN"))

    @precondition(lambda self: not self.failed and not self.ended)
    @rule(value=st.integers(0, (1 << 32) - 1))
    def ping(self, value: int) -> None:
        expected = Expected() if self.return_path else Expected("PING")
        if self.return_path:
            self.pings.append(value)
        self._send(self.schema.build_command(m.Ping(value)), expected)

    @precondition(lambda self: not self.failed and not self.ended)
    @rule()
    def open_return_path(self) -> None:
        # A second OPEN_RETURN_PATH is only reported by QEMU, not fatal.
        self.return_path = True
        self._send(self.schema.build_command(m.OpenReturnPath()), Expected())

    @precondition(lambda self: not self.failed and not self.ended)
    @rule(
        inner=st.lists(
            st.sampled_from(["POSTCOPY_LISTEN", "PING", "POSTCOPY_RUN", "DEVICE"]),
            min_size=1,
            max_size=5,
        )
    )
    def packaged(self, inner: list[str]) -> None:
        """PACKAGED: the blob's commands follow the same rules, at their own offsets."""
        s = self.schema
        if "POSTCOPY_RUN" in inner:
            # QEMU's RUN ends the package: what follows it in the blob is never parsed.
            inner = inner[: inner.index("POSTCOPY_RUN") + 1]
        blob = bytearray()
        expected = Expected()
        start = None
        for name in inner:
            if name == "DEVICE":
                record = s.build_section(m.SectionFull(9, "timer", 0, 2))
                record += b"\x01\x02\x03" + s.build_footer(9)
                verdict = Expected()
            elif name == "PING":
                record = s.build_command(m.Ping(len(blob)))
                verdict = Expected() if self.return_path else Expected("PING")
                if self.return_path and expected.what is None:
                    self.pings.append(len(blob))
            else:
                command = m.PostcopyListen() if name == "POSTCOPY_LISTEN" else m.PostcopyRun()
                record = s.build_command(command)
                verdict = self._command(name) if expected.what is None else Expected()
            if expected.what is None and verdict.what is not None:
                expected, start = verdict, len(blob)
            blob += record
        if expected.what is None and "POSTCOPY_RUN" not in inner:
            # Without RUN (or an EOF) QEMU's load of the package reads on past the blob's end
            # and fails there.
            expected, start = Expected("PACKAGED", MalformedError), len(blob)
        header = len(s.build_command(m.Packaged(len(blob))))
        data = s.build_packaged(bytes(blob))
        self._send(data, expected, start=None if start is None else header + start)

    @precondition(lambda self: not self.failed and not self.ended)
    @rule(
        block=st.sampled_from(sorted(BLOCKS)),
        page=st.integers(0, 40),
        zero=st.booleans(),
    )
    def ram_page(self, block: str, page: int, zero: bool) -> None:
        s = self.schema
        offset = page * PAGE
        body = b"\x00" if zero else bytes([page]) * PAGE
        record = s.build_ram_page(m.RamPage(block, offset, zero, body))
        head = s.build_section(m.SectionPart(RAM_ID))
        data = head + record + s.build_ram_flag("EOS") + s.build_footer(RAM_ID)
        if offset >= BLOCKS[block]:
            self._send(data, Expected("RAM", MalformedError), start=len(head))
            return
        self.received[block].add(offset)
        self._send(data, Expected())

    @precondition(lambda self: not self.failed and not self.ended)
    @rule()
    def eof(self) -> None:
        if self.state is S.LISTENING:
            # The listen thread would see the stream end before RUN.
            self._send(
                b"\x00",
                Expected("EOF", IllegalStateError, "LISTENING", "stream ended before POSTCOPY_RUN"),
            )
            return
        self._send(b"\x00", Expected())
        self.ended = True
        if self.state is S.RUNNING:
            self.state = S.END
            assert self.dest.state is S.END
            if self.return_path:
                assert self.rp_messages[-1] == m.Shut(0)
        else:
            self.state = S.EOF_READ  # precopy: a VMDESCRIPTION follows

    @precondition(lambda self: self.failed)
    @rule()
    def refused_after_failure(self) -> None:
        with pytest.raises(LocalProtocolError):
            self.dest.receive_data(b"\x00")

    @precondition(lambda self: self.ended and not self.failed)
    @rule()
    def after_the_end(self) -> None:
        if self.state is S.EOF_READ:
            # Precopy: the VMDESCRIPTION after EOF completes the migration.
            description = self.schema.vmdescription.build(m.VmDescription(b"{}"))
            self._send(description, Expected())
            self.dest.receive_eof()
            assert self.dest.next_event() is not NEED_DATA
            self.state = S.END
        assert self.dest.state is S.END
        self._read_return_path()
        if self.return_path:
            assert self.rp_messages[-1] == m.Shut(0)

    # --- invariants ---------------------------------------------------------------------

    @invariant()
    def same_state(self) -> None:
        # After a failure the machine is FAILED, and keeps the state QEMU's would be left in.
        state = self.dest.state_before_failure if self.failed else self.dest.state
        assert state == self.state

    @invariant()
    def one_pong_per_ping(self) -> None:
        pongs = [msg.value for msg in self.rp_messages if isinstance(msg, m.Pong)]
        assert pongs == self.pings

    @invariant()
    def received_pages_match(self) -> None:
        if self.failed:
            return
        for name, tracker in self.dest.blocks.items():
            held = {index * PAGE for index, byte in enumerate(bytes(tracker.state)) if byte}
            assert held == self.received[name], name


DestinationModel.TestCase.settings = settings(
    DestinationModel.TestCase.settings, stateful_step_count=25, deadline=None
)
test_destination_against_the_postcopy_state_model = DestinationModel.TestCase
