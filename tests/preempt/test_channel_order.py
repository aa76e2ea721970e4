"""Which channel a new connection is, on the accepting end: by order, as QEMU's destination
takes a preempt channel, except that a connection arriving while the main channel is gone
is the source's next main channel (a resumed channel that broke during its handshake), and
one whose first bytes are a resumed main channel's RECV_BITMAP is one too."""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator

import pytest

from qmig.errors import TransportError
from qmig.protocol.destination import Destination
from qmig.protocol.preempt import PreemptVariant
from qmig.runner.channels import PREEMPT, Channels
from qmig.transport import Connection, connect, listen
from qmig.transport.connection import Listener
from qmig.wire import messages as m
from qmig.wire.schema import schema_for


@pytest.fixture
def listener() -> Iterator[Listener]:
    with listen("tcp:127.0.0.1:0") as listening:
        yield listening


def accepting_channels(listener: Listener, main: Connection) -> Channels:
    return Channels(
        main,
        reopen=lambda timeout: listener.accept(timeout),
        openers={PREEMPT: lambda timeout: listener.accept(timeout)},
        adopt=lambda connection: connection,
    )


def reset(connection: Connection) -> None:
    """Close as a broken network does: the peer sees a reset."""
    assert connection.socket is not None
    connection.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    connection.close()


def test_the_next_connection_is_the_preempt_channel_while_the_main_one_lives(
    listener: Listener,
) -> None:
    source_main = connect(listener.uri)
    channels = accepting_channels(listener, listener.accept(5.0))
    source_preempt = connect(listener.uri)
    preempt = channels.open(PREEMPT, 5.0)
    source_preempt.sendall(b"page")
    assert preempt.recv_exactly(4) == b"page"
    assert channels.get(PREEMPT) is preempt and not channels.main_gone()
    for connection in (source_main, source_preempt):
        connection.close()
    channels.close_all()


@pytest.mark.parametrize("how", ["reset", "shut down", "closed here"])
def test_a_connection_that_comes_after_the_main_channel_went_is_the_next_main_one(
    listener: Listener, how: str
) -> None:
    source_main = connect(listener.uri)
    channels = accepting_channels(listener, listener.accept(5.0))
    if how == "reset":
        reset(source_main)
    elif how == "shut down":
        source_main.shutdown_write()
    else:
        channels.close_main()
    resumed = connect(listener.uri)
    with pytest.raises(TransportError, match="it is the next main channel, not the preempt one"):
        channels.open(PREEMPT, 5.0)
    assert channels.get(PREEMPT) is None
    main = channels.reopen(0.1)  # nothing more to accept: it is the one set aside
    resumed.sendall(b"RECV_BITMAP")
    assert main.recv_exactly(11) == b"RECV_BITMAP"
    assert channels.opened == 2
    resumed.close()
    source_main.close()
    channels.close_all()


def test_without_adopt_the_order_alone_decides(listener: Listener) -> None:
    """A connecting end (or one that cannot tell) keeps QEMU's rule: the next connection."""
    source_main = connect(listener.uri)
    main = listener.accept(5.0)
    channels = Channels(main, openers={PREEMPT: lambda timeout: listener.accept(timeout)})
    reset(source_main)
    other = connect(listener.uri)
    assert channels.open(PREEMPT, 5.0) is channels.get(PREEMPT)
    other.close()
    channels.close_all()


@pytest.mark.parametrize("version", ["7.2", "10.0"])
def test_first_bytes_tell_a_resumed_main_channel_from_a_preempt_one(version: str) -> None:
    """Where the order misleads, content decides: a resumed main channel opens with its
    RECV_BITMAP commands, a preempt channel with a RAM record (or nothing yet)."""
    schema = schema_for(version)
    channel = Destination(version, preempt=PreemptVariant.V8_0).open_preempt_channel()
    resumed = schema.build_command(m.RecvBitmap("pc.ram")) + schema.build_command(
        m.RecvBitmap("vga.vram")
    )
    assert channel.opens_a_resumed_main_channel(resumed)
    page = schema.build_ram_page(m.RamPage("pc.ram", 0, False, bytes(4096)))
    eos = schema.build_ram_flag("EOS", 0)
    high = schema.build_ram_page(m.RamPage("pc.ram", 0x7F_FFFF_F000, True, b"\0"))
    for first in (page, eos, high, b""):
        assert not channel.opens_a_resumed_main_channel(first)
    assert not channel.opens_a_resumed_main_channel(
        schema.build_command(m.PostcopyResume())
    )  # another command: not a resumed channel's opening


def test_a_connection_set_aside_that_ends_without_a_byte_is_not_the_next_main_channel(
    listener: Listener,
) -> None:
    # The source opened its preempt channel before the break, and the destination came to
    # accept it only after the main channel was gone: set aside as the next main one by the
    # socket state, it is the one the source closes at its pause, without a byte. The reopen
    # skips it and takes the source's real next main channel, which begins with its bytes.
    source_main = connect(listener.uri)
    channels = accepting_channels(listener, listener.accept(5.0))
    source_preempt = connect(listener.uri)
    reset(source_main)
    with pytest.raises(TransportError, match="next main channel"):
        channels.open(PREEMPT, 5.0)
    source_preempt.close()  # the source's pause closes its preempt channel
    source_next = connect(listener.uri)
    source_next.sendall(b"next")
    main = channels.reopen(5.0)
    assert main.recv_exactly(4) == b"next"
    source_next.close()
    channels.close_all()


def test_a_connection_set_aside_with_bytes_is_taken_as_the_next_main_channel(
    listener: Listener,
) -> None:
    source_main = connect(listener.uri)
    channels = accepting_channels(listener, listener.accept(5.0))
    reset(source_main)
    source_next = connect(listener.uri)
    with pytest.raises(TransportError, match="next main channel"):
        channels.open(PREEMPT, 5.0)
    source_next.sendall(b"bitmap")
    main = channels.reopen(5.0)
    assert main.recv_exactly(6) == b"bitmap"
    source_next.close()
    channels.close_all()
