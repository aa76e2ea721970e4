"""The source runner with the main channel's C answer thread, against a peer that plays a
hostile destination: a request the thread finds odd is the machine's to refuse, and the
runner fails with the same error as the Python loop's."""

from __future__ import annotations

import random
import socket
import threading

import pytest

from qmig.errors import QmigError
from qmig.protocol.source import Source, SourceBlock
from qmig.runner.source import SourcePlan, SourceRunner
from qmig.transport import Connection
from qmig.wire import messages as m
from qmig.wire.schema import schema_for

PAGE = 4096
INTO_POSTCOPY = 1 << 20  # stream bytes read before the request: postcopy has begun


def hostile_peer(sock: socket.socket, request: bytes) -> None:
    """Read the stream; once well into postcopy, send ``request``; read on to the end."""
    seen = 0
    sent = False
    while chunk := sock.recv(1 << 16):
        seen += len(chunk)
        if not sent and seen >= INTO_POSTCOPY:
            sock.sendall(request)
            sent = True
    sock.close()


def run_against(message: object, *, fast: bool) -> tuple[str, SourceRunner]:
    rng = random.Random(3)
    ram = bytearray(rng.randbytes(8 << 20))
    source = Source([SourceBlock("pc.ram", len(ram), ram)], version="7.2")
    ours, theirs = socket.socketpair()
    request = schema_for("7.2").build_rp(message)  # type: ignore[arg-type]
    peer = threading.Thread(target=hostile_peer, args=(theirs, request), daemon=True)
    peer.start()
    runner = SourceRunner(
        Connection("main", ours), source, SourcePlan(postcopy_after=0, fast_answer=fast)
    )
    try:
        with pytest.raises(QmigError) as error:
            runner.run()
    finally:
        ours.close()
        peer.join(30)
    return str(error.value), runner


@pytest.mark.parametrize(
    "message",
    [
        m.ReqPagesId(0, PAGE, "nvram"),  # no such block
        m.ReqPagesId(100, PAGE, "pc.ram"),  # misaligned
        m.ReqPagesId((8 << 20) - PAGE, 2 * PAGE, "pc.ram"),  # past the block's end
    ],
)
def test_an_odd_request_fails_the_runner_as_the_python_loop_does(message: object) -> None:
    expected, _ = run_against(message, fast=False)
    got, runner = run_against(message, fast=True)
    assert got == expected
    assert got.startswith("REQ_PAGES_ID: ") and got.endswith(" at byte 0")
    assert runner.report.fast_answer["started"] == 1  # the thread read it, and left it
    assert runner.report.fast_answer["pages"] == 0
