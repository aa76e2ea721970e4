"""Small socket buffers and non-blocking sends: what keeps page requests from queueing."""

from __future__ import annotations

import socket

from qmig.transport import connect, limit_buffers, listen


def test_a_bounded_receive_buffer_is_inherited_and_sends_stop_when_it_is_full() -> None:
    with listen("tcp:127.0.0.1:0") as listener:
        assert listener.socket is not None
        limit_buffers(listener.socket, receive=16 << 10)
        with connect(listener.uri) as client, listener.accept(timeout=5) as server:
            client.limit_buffers(send=16 << 10)
            assert server.socket is not None and client.socket is not None
            # Linux doubles the value for its bookkeeping and turns autotuning off.
            received = server.socket.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
            assert 16 << 10 <= received <= 64 << 10
            assert client.socket.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) <= 64 << 10
            queued = 0
            chunk = bytes(8 << 10)
            while sent := client.send_some(chunk):  # never blocks: 0 once both buffers fill
                queued += sent
                assert queued < 1 << 20, "the buffers grew past their limits"
            assert queued > 0
            drained = 0
            buffer = bytearray(64 << 10)
            while drained < queued:
                drained += server.recv_into(buffer)
            assert drained == queued
