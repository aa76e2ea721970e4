"""The source runner reads the return path while its stream is backed up."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from sans_io_destination import answer_to_the_end

from qmig.errors import QmigError, RemoteProtocolError
from qmig.protocol.source import Source
from qmig.protocol.states import SourceState
from qmig.runner.source import SourcePlan, SourceRunner
from qmig.runner.source_ram import Dirtier, GuestRam
from qmig.transport import Connection, connect, limit_buffers, listen
from qmig.wire import messages as m
from qmig.wire.reader import END, NEED_DATA, StreamReader
from qmig.wire.schema import schema_for


def test_a_destination_that_stops_reading_still_gets_its_shut_read() -> None:
    """The destination never reads the stream; the source, its buffers full, must still see
    the SHUT(1) on the return path and stop, instead of blocking in a send forever."""
    ram = GuestRam.generate([("pc.ram", 16 << 20)], zero_fraction=0.0)
    source = Source(ram.blocks, version="7.2")
    shut = schema_for("7.2").build_rp(m.Shut(1))
    held: list[Connection] = []

    def destination() -> None:
        time.sleep(0.3)  # long enough for the source to fill both socket buffers
        held[0].sendall(shut)

    with listen("tcp:127.0.0.1:0") as listener:
        assert listener.socket is not None
        limit_buffers(listener.socket, receive=16 << 10)
        with connect(listener.uri) as connection:
            held.append(listener.accept(timeout=5))
            thread = threading.Thread(target=destination)
            thread.start()
            sent: list[int] = []
            runner = SourceRunner(
                connection,
                source,
                SourcePlan(send_buffer=16 << 10),
                on_progress=lambda _phase, size: sent.append(size),
            )
            started = time.monotonic()
            with pytest.raises(RemoteProtocolError, match=r"SHUT: the destination reported"):
                runner.run()
            assert time.monotonic() - started < 10
            thread.join()
            assert sum(sent) < 16 << 20  # it was stuck behind the full buffers, not done
            held[0].close()


def test_the_send_buffer_is_limited_only_from_the_switch_to_postcopy() -> None:
    """Precopy streams through the kernel's autotuned buffer; from the switchover on, a
    requested page must not wait behind megabytes, so SO_SNDBUF is set then, and only then,
    after the switchover's bytes (discards, the package ending in RUN) are in the socket."""
    ram = GuestRam.generate([("pc.ram", 4 << 20)], zero_fraction=0.5)
    source = Source(ram.blocks, version="7.2")
    calls: list[tuple[SourceState, bool, int | None]] = []
    with listen("tcp:127.0.0.1:0") as listener, connect(listener.uri) as connection:
        peer = listener.accept(timeout=5)
        thread = threading.Thread(target=answer_to_the_end, args=(peer, "7.2"))
        thread.start()
        limit = connection.limit_buffers

        def recorded(send: int | None = None, receive: int | None = None) -> None:
            calls.append((source.state, bool(source._out), send))  # switchover bytes unsent?
            limit(send=send, receive=receive)

        connection.limit_buffers = recorded  # type: ignore[method-assign]
        runner = SourceRunner(
            connection,
            source,
            SourcePlan(postcopy_after=1, send_buffer=16 << 10),
            dirtier=Dirtier(ram, 50000.0),
        )
        runner.run()
        assert connection.socket is not None
        assert connection.socket.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == 32 << 10
        thread.join(timeout=10)
        peer.close()
    # Once, in postcopy, with nothing of the switchover left unsent.
    assert calls == [(SourceState.POSTCOPY, False, 16 << 10)]
    assert source.stats.discard_commands > 0


def test_requested_pages_go_out_past_the_cap_and_ahead_of_the_sweep() -> None:
    """As QEMU's source does, a page asked for on the return path goes out in the cap's next
    window at the latest, past its quota, before any more of the background sweep. The cap
    here (1 byte/s) would hold a capped page for hours: the page arriving at all shows it
    went past it."""
    size = 8 << 20
    ram = GuestRam.generate([("pc.ram", size)], zero_fraction=0.0)
    source = Source(ram.blocks, version="7.2")
    schema = schema_for("7.2")
    wanted = size - 4096
    seen: dict[str, int] = {}
    errors: list[BaseException] = []

    def run_source(connection: Connection) -> None:
        try:
            SourceRunner(connection, source, SourcePlan(postcopy_after=0, bandwidth=1.0)).run()
        except QmigError as error:
            errors.append(error)

    with listen("tcp:127.0.0.1:0") as listener, connect(listener.uri) as connection:
        peer = listener.accept(timeout=5)
        peer.socket.settimeout(10)  # type: ignore[union-attr]
        thread = threading.Thread(target=run_source, args=(connection,))
        thread.start()
        reader = StreamReader("7.2")
        buffer = bytearray(1 << 16)
        asked_at = None
        while "page" not in seen:
            count = peer.recv_into(buffer)
            assert count, "the stream ended before the requested page came"
            reader.feed(bytes(buffer[:count]))
            while (record := reader.next_record()) is not NEED_DATA and record is not END:
                message = record.message
                if isinstance(message, m.PostcopyRun) and asked_at is None:
                    peer.sendall(schema.build_rp(m.ReqPagesId(wanted, 4096, "pc.ram")))
                    asked_at = record.offset + record.size
                elif asked_at is not None and wanted in _page_offsets(message):
                    seen["page"] = record.offset
        peer.close()
        thread.join(timeout=10)
    assert not thread.is_alive()
    assert asked_at is not None
    # At most one background chunk was on its way when the request came.
    assert seen["page"] - asked_at <= 64 << 10
    assert source.stats.requested_pages == 1
    assert len(errors) == 1  # the destination hung up; the source says so, and stops


def _page_offsets(message: object) -> list[int]:
    if isinstance(message, m.RamPageRun):
        return [offset for offset, _zero, _body in message.pages()]
    if isinstance(message, m.RamPage):
        return [message.offset]
    return []
