"""The source machine fed random REQ_PAGES / REQ_PAGES_ID / SHUT / PONG sequences.

The model keeps what the destination must hold: which target pages were discarded at the
switch (changed after they were sent, or never sent) and so must come exactly once in
postcopy, whether asked for or not. Everything the source sends is read back with the
stream reader and checked against it: no page is lost, none is sent twice, no request is
answered for a page that was already sent. Invalid requests (no previous block, unknown
block, misaligned, beyond the block) must fail the source with an error naming them.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from qmig.errors import RemoteProtocolError
from qmig.protocol.source import DeviceSnapshot, Source, SourceBlock
from qmig.protocol.states import SourceState
from qmig.wire import messages as m
from qmig.wire.reader import NEED_DATA, Record, StreamReader
from qmig.wire.schema import schema_for

pytestmark = pytest.mark.timeout(300)

VERSION = "7.2"
PAGE = 4096
PRECOPY = (SourceState.PRECOPY, SourceState.PASS_COMPLETE)
# (name, target pages, page size): one block with 16 KiB host pages of 4 target pages each.
BLOCKS = [("pc.ram", 48, PAGE), ("big", 32, 4 * PAGE), ("pc.bios", 4, PAGE)]


class SourceModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.schema = schema_for(VERSION)
        self.reader = StreamReader(VERSION)
        self.sent: Counter[tuple[str, int]] = Counter()  # postcopy sends per target page
        self.must_send: set[tuple[str, int]] = set()
        self.last_block: str | None = None
        self.failed = False
        self.pongs: list[int] = []
        self.size = {name: pages * PAGE for name, pages, _ in BLOCKS}
        self.page_size = {name: size for name, _, size in BLOCKS}

    @initialize(
        seed=st.integers(0, 1 << 16),
        precopy_sections=st.integers(0, 12),
        dirty=st.lists(st.tuples(st.sampled_from([b[0] for b in BLOCKS]), st.integers(0, 47))),
    )
    def switch_to_postcopy(
        self, seed: int, precopy_sections: int, dirty: list[tuple[str, int]]
    ) -> None:
        rng = random.Random(seed)
        blocks = [
            SourceBlock(name, pages * PAGE, bytearray(rng.randbytes(pages * PAGE)), size)
            for name, pages, size in BLOCKS
        ]
        self.source = Source(
            blocks,
            version=VERSION,
            devices=[DeviceSnapshot("timer", 0, 2, b"\x01" * 8)],
            pages_per_section=5,
        )
        self.source.start()
        self._read(self.source.data_to_send())
        for _ in range(precopy_sections):
            if self.source.pass_complete:
                break
            self._read(self.source.data_to_send(4 * (PAGE + 16)))
        per_block: dict[str, list[int]] = {}
        for name, page in dirty:
            if page < self.size[name] // PAGE:
                per_block.setdefault(name, []).append(page)
        for name, pages in per_block.items():
            self.source.sync_dirty(name, pages)
        # What is dirty now, widened to whole host pages, is discarded and must come again.
        for block in self.source.blocks:
            per_host = block.page_size // PAGE
            for page, flag in enumerate(block.dirty):
                if flag:
                    first = page - page % per_host
                    self.must_send.update((block.idstr, p) for p in range(first, first + per_host))
        self.source.start_postcopy()
        self._read(self.source.data_to_send(0))
        self.postcopy_from = self.reader.offset

    def _read(self, data: bytes) -> None:
        self.reader.feed(data)
        while (record := self.reader.next_record()) is not NEED_DATA:
            assert isinstance(record, Record)
            message = record.message
            if isinstance(message, m.PostcopyRamDiscard):
                continue
            if isinstance(message, m.RamPageRun) and self.source.state not in PRECOPY:
                for offset, _, _ in message.pages():
                    self.sent[(message.block, offset // PAGE)] += 1

    def _feed_rp(self, message: object, error: str | None = None) -> None:
        data = self.schema.build_rp(message)  # type: ignore[arg-type]
        if error is None:
            self.source.receive_data(data)
            return
        with pytest.raises(RemoteProtocolError) as caught:
            self.source.receive_data(data)
        assert caught.value.what == message.NAME  # type: ignore[attr-defined]
        assert error in caught.value.detail
        assert self.source.state is SourceState.FAILED
        self.failed = True

    def _request_verdict(self, block: str, start: int, length: int) -> str | None:
        if start % PAGE or length % PAGE:
            return "misaligned page request"
        if (start + length - 1) % (1 << 64) >= self.size[block]:  # 7.2's last byte, in u64
            return "request overrun"
        return None

    # --- rules ------------------------------------------------------------------------------

    @precondition(lambda self: self.listening)
    @rule(
        block=st.sampled_from([b[0] for b in BLOCKS]),
        page=st.integers(0, 50),
        pages=st.integers(0, 5),
        misalign=st.sampled_from([0, 0, 0, 1, 2048]),
    )
    def req_pages_id(self, block: str, page: int, pages: int, misalign: int) -> None:
        start, length = page * PAGE + misalign, pages * PAGE
        error = self._request_verdict(block, start, length)
        self.last_block = block
        self._feed_rp(m.ReqPagesId(start, length, block), error)

    @precondition(lambda self: self.listening)
    @rule(page=st.integers(0, 50), pages=st.integers(1, 3))
    def req_pages(self, page: int, pages: int) -> None:
        start, length = page * PAGE, pages * PAGE
        if self.last_block is None:
            self._feed_rp(m.ReqPages(start, length), "no previous block")
            return
        verdict = self._request_verdict(self.last_block, start, length)
        self._feed_rp(m.ReqPages(start, length), verdict)

    @precondition(lambda self: self.listening)
    @rule()
    def req_unknown_block(self) -> None:
        self._feed_rp(m.ReqPagesId(0, PAGE, "nope"), "no block 'nope'")

    @precondition(lambda self: self.listening)
    @rule(value=st.integers(0, (1 << 32) - 1))
    def pong(self, value: int) -> None:
        self.pongs.append(value)
        self._feed_rp(m.Pong(value))

    @precondition(lambda self: not self.failed)
    @rule(budget=st.integers(0, 6 * (PAGE + 16)))
    def send(self, budget: int) -> None:
        self._read(self.source.data_to_send(budget))

    @precondition(lambda self: self.listening)
    @rule(status=st.integers(0, 2))
    def shut(self, status: int) -> None:
        if status:
            self._feed_rp(m.Shut(status), "reported an error")
        elif self.source.state is SourceState.COMPLETING:
            self._feed_rp(m.Shut(0))
            assert self.source.state is SourceState.DONE
            self._check_complete()
        elif self.source.state is SourceState.POSTCOPY:
            self._feed_rp(m.Shut(0), "before the stream was complete")

    @precondition(lambda self: not self.failed and self.source.state is SourceState.POSTCOPY)
    @rule()
    def drain(self) -> None:
        """Send everything: the stream must end, having sent every page owed exactly once."""
        for _ in range(10_000):
            if self.source.state is not SourceState.POSTCOPY:
                break
            self._read(self.source.data_to_send(1 << 20))
        assert self.source.state is SourceState.COMPLETING
        self._check_complete()

    @property
    def listening(self) -> bool:
        return not self.failed and self.source.state is not SourceState.DONE

    @precondition(lambda self: self.source.state is SourceState.DONE)
    @rule()
    def nothing_is_read_after_shut(self) -> None:
        """QEMU's return-path thread ends at SHUT: what follows is never looked at."""
        while self.source.next_event() is not NEED_DATA:
            pass
        self.source.receive_data(self.schema.build_rp(m.ReqPagesId(1, 1, "nope")) + b"\xff" * 8)
        assert self.source.next_event() is NEED_DATA
        assert self.source.state is SourceState.DONE

    @precondition(lambda self: self.failed)
    @rule()
    def stays_failed(self) -> None:
        assert self.source.state is SourceState.FAILED

    def _check_complete(self) -> None:
        missing = self.must_send - set(self.sent)
        assert not missing, f"pages lost: {sorted(missing)[:8]}"

    # --- invariants ---------------------------------------------------------------------

    @invariant()
    def nothing_sent_twice_or_without_cause(self) -> None:
        twice = [page for page, count in self.sent.items() if count > 1]
        assert not twice, f"sent twice in postcopy: {twice[:8]}"
        uncalled = set(self.sent) - self.must_send
        assert not uncalled, f"sent in postcopy though never discarded: {sorted(uncalled)[:8]}"

    @invariant()
    def pongs_are_reported(self) -> None:
        if not self.failed:
            assert self.source.pongs == self.pongs


SourceModel.TestCase.settings = settings(
    SourceModel.TestCase.settings, stateful_step_count=30, deadline=None
)
test_source_against_the_no_loss_model = SourceModel.TestCase
