"""Fault injection: a TCP proxy between a migration source and its destination.

:class:`FaultProxy` relays both directions and reads the stream as it passes (a
:class:`~qmig.wire.reader.StreamReader` watches it), so a fault can be aimed at a record:
cut the connection inside the N-th record of a kind (a precopy page section, a discard,
PACKAGED, a postcopy page), stop forwarding the stream and drop the page requests (a source
that never answers), or delay and re-chunk both directions (legal: the migration must still
complete). :func:`run_faulted` runs a ``qmig simulate``-style migration through it: a qmig
source in this process, a qmig destination with userfaultfd RAM in a child process, and
reports how each side ended. The child is :mod:`qmig.runner.peer`, the destination of
``qmig simulate``, with a short idle timeout so that a stalled source fails it fast.

With ``recover``, both ends recover from a broken channel as QEMU's postcopy recovery does:
the proxy then relays every connection the source makes (a resumed migration is a new
one), and the fault may aim at a record of the recovery handshake (``RECV_BITMAP``,
``POSTCOPY_RESUME``) as well as anywhere in postcopy.
"""

from __future__ import annotations

import contextlib
import random
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from qmig.errors import QmigError
from qmig.wire import messages as m
from qmig.wire.reader import NEED_DATA, Record, ReturnPathReader, StreamReader

RELAY_CHUNK = 64 << 10
IDLE_TIMEOUT = 3.0
RUN_TIMEOUT = 60.0
RECOVER_TIMEOUT = 10.0


@dataclass(frozen=True)
class Fault:
    """What to do to a migration, and where.

    ``kind``: ``cut`` (close both directions inside the target record), ``stall`` (from the
    target record on, forward no stream and drop every page request: a source that never
    answers), ``delay`` (hold each return-path message ``delay`` seconds and re-chunk the
    stream: nothing is lost, the migration must complete), or ``none``.
    ``record``: the record NAME to aim at (``RAM``, ``POSTCOPY_RAM_DISCARD``,
    ``PACKAGED``...), its ``nth`` occurrence, only after POSTCOPY_RUN if ``postcopy``.
    ``into``: how far into the record to cut (a fraction of its size).
    """

    kind: str
    record: str = "RAM"
    nth: int = 1
    postcopy: bool = False
    into: float = 0.5
    delay: float = 0.0
    seed: int = 1
    # With recovery: once the first cut is made, cut again inside the first ``then`` record
    # of a later connection (``RECV_BITMAP``: the recovery handshake; a double failure).
    then: str | None = None


@dataclass
class ProxyLog:
    """What the proxy saw and did."""

    forwarded: int = 0  # stream bytes that reached the destination
    cut_at: int | None = None  # absolute stream offset of the cut
    target_offset: int | None = None  # where the aimed-at record starts
    phase: str = "precopy"
    dropped_requests: int = 0
    return_path_bytes: int = 0
    connections: int = 0  # relayed: more than one when the migration recovered
    cuts: int = 0
    errors: list[str] = field(default_factory=list)


def _next_chunk(sock: socket.socket, other: socket.socket) -> bytes | None:
    """The next bytes from ``sock``; None once it has ended (its end passed on to ``other``,
    whose write side is shut) or failed."""
    try:
        chunk = sock.recv(RELAY_CHUNK)
    except OSError:
        return None
    if not chunk:
        with contextlib.suppress(OSError):
            other.shutdown(socket.SHUT_WR)
        return None
    return chunk


class FaultProxy:
    """Relays one migration between ``listener`` (the source connects) and ``target``."""

    def __init__(
        self,
        target: tuple[str, int],
        fault: Fault,
        version: str | None = None,
        *,
        recover: bool = False,
    ):
        """``recover``: after a connection ends, relay the source's next one (until
        :meth:`close`), and aim the fault across all of them (it fires once)."""
        self.target = target
        self.fault = fault
        self.version = version
        self.recover = recover
        self.log = ProxyLog()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._stalled = threading.Event()
        self._rng = random.Random(fault.seed)
        self._source: socket.socket | None = None
        self._destination: socket.socket | None = None
        self._sent = 0  # stream bytes forwarded on the current connection
        self._aim_at: str | None = None  # the ``then`` record, after the first cut

    def start(self) -> FaultProxy:
        thread = threading.Thread(target=self._serve, name="fault-proxy", daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def close(self) -> None:
        self._stop.set()
        # A close alone does not wake a thread blocked in accept() or recv() on Linux; a
        # shutdown does, so the relay ends now rather than at its timeout.
        for sock in (self._source, self._destination, self.listener):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    sock.close()
        for thread in self._threads:
            thread.join(timeout=5.0)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # --- relaying ------------------------------------------------------------------------

    def _serve(self) -> None:
        self.listener.settimeout(RUN_TIMEOUT)
        self._watcher = StreamReader(self.version)
        self._seen = 0
        self._fired = False
        while not self._stop.is_set():
            try:
                self._source, _ = self.listener.accept()
            except OSError as error:
                if not self._stop.is_set() and not self.log.connections:
                    self.log.errors.append(f"proxy: {error}")
                return
            try:
                self._destination = socket.create_connection(self.target, timeout=10.0)
            except OSError as error:
                # The destination is gone (it failed): the source's attempt ends at once.
                self.log.errors.append(f"proxy: {error}")
                with contextlib.suppress(OSError):
                    self._source.close()
                if not self.recover:
                    return
                continue
            self.log.connections += 1
            self._sent = 0  # offsets count per connection, as the destination counts them
            if self.log.connections > 1:
                self._watcher.new_channel()
            for sock in (self._source, self._destination):
                sock.settimeout(None)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            back = threading.Thread(target=self._return_path, name="fault-rp", daemon=True)
            back.start()
            self._threads.append(back)
            self._stream()
            back.join(timeout=RUN_TIMEOUT)
            for sock in (self._source, self._destination):
                with contextlib.suppress(OSError):
                    sock.close()
            if not self.recover:
                return

    def _cut(self) -> None:
        """Both directions end now, as when a cable is pulled or a process dies."""
        for sock in (self._source, self._destination):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def _stream(self) -> None:
        assert self._source is not None and self._destination is not None
        watcher = self._watcher
        seen = self._seen
        aim: int | None = None  # absolute offset where the fault starts
        fault = self.fault
        while not self._stop.is_set():
            if (chunk := _next_chunk(self._source, self._destination)) is None:
                break
            start = self._sent if not self._stalled.is_set() else None
            watcher.feed(chunk)
            if aim is None and not self._fired and fault.kind in ("cut", "stall"):
                aim, seen = self._find_target(watcher, seen)
                self._seen = seen
            end = (start or 0) + len(chunk)
            if self._stalled.is_set():
                continue  # a stalled source: its bytes go nowhere
            assert start is not None
            if aim is not None and aim < end:
                keep = max(0, aim - start)
                self._forward(chunk[:keep])
                if fault.kind == "cut":
                    self.log.cut_at = aim
                    self.log.cuts += 1
                    self._fired = True
                    if fault.then is not None and self.log.cuts == 1:
                        self._fired, self._seen = False, 0
                        self._aim_at = fault.then
                    time.sleep(0.05)  # let the bytes before the cut arrive first
                    self._cut()
                    return
                self._stalled.set()
                continue
            if fault.kind == "delay":
                self._forward_in_pieces(chunk)
            else:
                self._forward(chunk)

    def _find_target(self, watcher: StreamReader, seen: int) -> tuple[int | None, int]:
        fault = self.fault
        record_name, nth = (fault.record, fault.nth) if self._aim_at is None else (self._aim_at, 1)
        try:
            while (record := watcher.next_record()) is not NEED_DATA:
                assert isinstance(record, Record)
                name = record.name
                if name == "POSTCOPY_RUN":
                    self.log.phase = "postcopy"
                if name == record_name and (self.log.phase == "postcopy" or not fault.postcopy):
                    seen += 1
                    if seen == nth:
                        self.log.target_offset = record.offset
                        size = record.size
                        if isinstance(record.message, m.Packaged):
                            size += record.message.length  # aim inside the blob
                        return record.offset + max(1, int(size * fault.into)), seen
        except QmigError as error:
            self.log.errors.append(f"watcher: {error.one_line()}")
        return None, seen

    def _forward(self, data: bytes) -> None:
        assert self._destination is not None
        if not data:
            return
        with contextlib.suppress(OSError):
            self._destination.sendall(data)
            self.log.forwarded += len(data)
            self._sent += len(data)

    def _forward_in_pieces(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            size = self._rng.choice([1, 7, 512, 4099, 1 << 16])
            self._forward(bytes(view[:size]))
            view = view[size:]
            if self._rng.random() < 0.05:
                time.sleep(self.fault.delay / 4)

    def _return_path(self) -> None:
        assert self._source is not None and self._destination is not None
        reader = ReturnPathReader(self.version)
        source = self._source
        while not self._stop.is_set():
            if (chunk := _next_chunk(self._destination, self._source)) is None:
                break
            self.log.return_path_bytes += len(chunk)
            reader.feed(chunk)
            out = bytearray()
            try:
                while (record := reader.next_record()) is not NEED_DATA:
                    assert isinstance(record, Record)
                    if self._stalled.is_set() and record.name in ("REQ_PAGES", "REQ_PAGES_ID"):
                        self.log.dropped_requests += 1
                        continue
                    out += reader.schema.build_rp(record.message)  # byte-identical
            except QmigError as error:
                self.log.errors.append(f"return path: {error.one_line()}")
                out += chunk
            if self.fault.kind == "delay" and out:
                time.sleep(self.fault.delay)  # legal: the source must not depend on timing
            with contextlib.suppress(OSError):
                source.sendall(bytes(out))


# --- a migration through the proxy ---------------------------------------------------------


@dataclass
class FaultResult:
    fault: Fault
    seconds: float
    source_error: str | None
    destination_error: str | None
    destination_report: dict[str, Any] | None
    proxy: ProxyLog
    mismatches: int | None = None  # pages that differ after a completed migration
    recoveries: int = 0  # completed postcopy recoveries (the source's count)


def run_faulted(
    fault: Fault,
    *,
    blocks: list[tuple[str, int]] | None = None,
    version: str | None = "7.2",
    postcopy_after: int = 1,
    bandwidth: float | None = None,
    idle_timeout: float = IDLE_TIMEOUT,
    seed: int = 1,
    recover: bool = False,
    recover_timeout: float = RECOVER_TIMEOUT,
) -> FaultResult:
    """One migration, qmig source to qmig destination, through a :class:`FaultProxy`.
    ``recover``: both ends recover from a broken channel in postcopy (each waits at most
    ``recover_timeout`` seconds for the other's new connection)."""
    from qmig.protocol.source import Source
    from qmig.runner.channels import Channels, connect_with_retries
    from qmig.runner.peer import Peer
    from qmig.runner.source import SourcePlan, SourceRunner
    from qmig.runner.source_ram import Dirtier, GuestRam
    from qmig.simulate import default_devices
    from qmig.transport import connect

    layout = blocks or [("pc.ram", 8 << 20), ("vga.vram", 1 << 20)]
    ram = GuestRam.generate(layout, seed=seed)
    started = time.monotonic()
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    arguments = [
        "--hold",
        "--idle-timeout", str(idle_timeout),
        "--accept-timeout", str(RUN_TIMEOUT),
        "--pattern", "random", "--touches", "2000", "--vcpus", "2",
    ]  # fmt: skip
    if version:
        arguments += ["--qemu-version", version]
    if recover:
        arguments += ["--recover-timeout", str(recover_timeout)]
    peer = Peer(arguments, listener)
    listener.close()
    try:
        peer.wait_until_ready(RUN_TIMEOUT)
        source_error = None
        recoveries = 0
        with FaultProxy(("127.0.0.1", port), fault, version, recover=recover) as proxy:
            try:
                source = Source(ram.blocks, version=version, devices=default_devices(seed))
                dirtier = Dirtier(ram, 2000.0, seed=seed + 1)
                plan = SourcePlan(
                    postcopy_after=postcopy_after,
                    bandwidth=bandwidth,
                    recover_timeout=recover_timeout,
                )
                uri = f"tcp:127.0.0.1:{proxy.port}"
                reopen = None
                if recover:
                    reopen = connect_with_retries(lambda t: connect(uri, t), recover_timeout)
                channels = Channels(connect(uri), reopen)
                try:
                    SourceRunner(channels, source, plan, dirtier=dirtier).run()
                finally:
                    channels.close_main()
                    recoveries = source.stats.recoveries
            except QmigError as error:
                source_error = error.one_line()
            report = peer.report(RUN_TIMEOUT)
            mismatches = None
            if report is not None:
                mismatches, _ = peer.compare([(b.idstr, b.ram) for b in ram.blocks], report)
            destination_error = peer.finish(RUN_TIMEOUT) or None
            log = proxy.log
    finally:
        peer.kill()
    if destination_error is not None:
        report = mismatches = None
    return FaultResult(
        fault,
        time.monotonic() - started,
        source_error,
        destination_error,
        report,
        log,
        mismatches,
        recoveries,
    )
