"""Running a real destination (userfaultfd RAM) on a stream fed through a socket, with the C
receive path and without it, and keeping what each placed."""

from __future__ import annotations

import functools
import lzma
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qmig.ram._uffd import ffi

from qmig.errors import QmigError
from qmig.protocol.destination import Destination
from qmig.runner.destination import DestinationRunner
from qmig.transport import Connection

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"


@functools.cache
def fixture_stream(name: str) -> bytes:
    return lzma.decompress((FIXTURES / name / "stream.bin.xz").read_bytes())


@dataclass
class Outcome:
    """What a destination did with one stream."""

    error: str | None
    error_offset: int | None
    ram: dict[str, bytes] = field(default_factory=dict)  # block → contents, where complete
    received: dict[str, bytes] = field(default_factory=dict)  # block → received bitmap
    placed_pages: dict[str, int] = field(default_factory=dict)
    block_pages: dict[str, list[int]] = field(default_factory=dict)
    requests: int = 0
    fast_path: dict[str, Any] = field(default_factory=dict)


class _KeepingRunner(DestinationRunner):
    """Keeps each block's received bitmap (and, when it completed, its bytes) before the
    RAM is torn down, whatever the outcome."""

    kept: dict[str, bytes]

    def _close_session(self) -> None:
        self.kept = {}
        if self.session is not None:
            for block in self.session.blocks:
                bits = -(-block.used_length // block.c_block.target_page // 8)
                self.kept[block.idstr] = bytes(ffi.buffer(block.c_block.bitmap, bits))
        super()._close_session()


def run_destination(stream: bytes, version: str | None, *, fast_path: bool) -> Outcome:
    """Feed ``stream`` to a destination through a socket pair (the return path is read and
    dropped) and report what it did. No vCPU runs: every page comes from the stream."""
    ours, theirs = socket.socketpair()
    ours.settimeout(30.0)

    def feed() -> None:
        def drain() -> None:
            try:
                while theirs.recv(1 << 16):
                    pass
            except OSError:
                pass

        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        try:
            theirs.sendall(stream)
            theirs.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the destination failed and closed first
        reader.join(30.0)

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    runner = _KeepingRunner(
        Connection("stream", ours),
        Destination(version),
        keep_ram=True,
        fast_path=fast_path,
        idle_timeout=30.0,
    )
    error: QmigError | None = None
    try:
        report = runner.run()
    except QmigError as failed:
        error = failed
        report = runner.report
    ram: dict[str, bytes] = {}
    if error is None and runner.session is not None:
        for idstr, used in report.blocks.items():
            ram[idstr] = runner.session.block(idstr).read(0, used)
        runner.session.close()
    ours.close()
    feeder.join(30.0)
    theirs.close()
    return Outcome(
        error=None if error is None else str(error),
        error_offset=None if error is None else getattr(error, "offset", None),
        ram=ram,
        received=getattr(runner, "kept", {}),
        placed_pages=dict(report.placed_pages),
        block_pages={k: list(v) for k, v in report.block_pages.items()},
        requests=report.requests,
        fast_path=dict(report.fast_path),
    )
