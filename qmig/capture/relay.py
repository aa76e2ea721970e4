"""A recording relay between a migration source and destination.

The source connects to the relay; the relay then connects to the destination and pumps each
direction in its own thread: read into a large buffer, forward, then append to the recording.
Forwarding first keeps the added latency (which matters for page requests) to one copy. The
relay ends when both directions have reached end of stream.

Postcopy recovery: when a connection ends without the destination's SHUT(0) and recovery is
on, the relay waits for the source to resume (it connects to the relay again) and connects
to the destination's recovery URI (where it listens once told ``migrate-recover``), with
retries. The new connection's bytes go to the same files, after the old ones; ``meta.json``
lists where each connection starts (``qmig.capture.connections`` reads them back).

Multifd: the source's next N connections after the main one are its multifd channels (QEMU
opens the main one first). Each is relayed, in the order accepted, on a connection of its own
to the destination (which tells them apart by their handshake, whatever their order), and
recorded in ``multifd-<K>.bin`` (K: the accept order).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qmig import __version__
from qmig.capture.recording import CaptureWriter, Direction, multifd_direction
from qmig.errors import QmigError, TransportError
from qmig.transport import Connection, Listener, connect, listen
from qmig.wire import messages as m
from qmig.wire.schema import schema_for

CHUNK_SIZE = 1 << 20
RELAY_NICE = -10
ACCEPT_POLL_SECONDS = 0.2
RETRY_SECONDS = 0.1
PREEMPT_LINGER_S = 5.0  # after the main connection ends, for the source to close its preempt one
# The return path's last message when the destination completed (the same in every version).
COMPLETED_SHUT = schema_for(None).build_rp(m.Shut(0))


@dataclass
class DirectionResult:
    bytes: int = 0
    chunks: int = 0
    sha256: str = ""
    # How the direction ended: "eof" (clean), "stopped" (Relay.stop), or what ended it.
    end: str = "running"


@dataclass
class CaptureSummary:
    out_dir: str
    listen: str
    connect: str
    duration_s: float = 0.0
    qemu_version: str | None = None  # the wire profile that reads the recorded stream
    stream: DirectionResult = field(default_factory=DirectionResult)
    return_path: DirectionResult = field(default_factory=DirectionResult)
    # Where each connection starts: {"t_ns", "stream_offset", "return_path_offset"}.
    connections: list[dict[str, int]] = field(default_factory=list)
    # Postcopy-preempt's channel (source → destination), when the relay takes one.
    preempt: DirectionResult | None = None
    # The multifd channels (source → destination), in the order accepted.
    multifd: list[DirectionResult] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        channels = all(result.end == "eof" for result in self.multifd)
        return (
            self.stream.end == "eof"
            and self.return_path.end == "eof"
            and channels
            and self.completed
        )

    completed: bool = True  # the destination said SHUT(0) (set when recovery is on)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "clean": self.clean}


class Relay:
    """Listens at once (so a busy port fails in the constructor); ``start()`` runs it."""

    def __init__(
        self,
        connect_uri: str,
        out_dir: Path,
        listen_uri: str = "tcp:127.0.0.1:0",
        chunk_size: int = CHUNK_SIZE,
        qemu_version: str | None = None,
        recover_connect: str | None = None,
        recover_timeout: float = 0.0,
        preempt: bool = False,
        multifd: int = 0,
    ) -> None:
        """``qemu_version``: the wire profile that reads this migration, kept in meta.json;
        None or ``auto``: detected from the recorded stream's first bytes.
        ``recover_timeout``: when a connection ends before the destination's SHUT(0), wait
        this long for the source to connect again, and relay the resumed migration to
        ``recover_connect`` (default: ``connect_uri``); 0: one connection only.
        ``preempt``: postcopy-preempt is on: the source's next connection after the main one
        is its preempt channel, relayed on a connection of its own to ``connect_uri`` (opened
        after the main one, so that the destination takes it as such) and recorded in
        ``preempt.bin``. ``multifd``: the source's multifd channels (its next connections after
        the main one), each relayed on a connection of its own and recorded in
        ``multifd-<K>.bin``."""
        self.preempt = preempt
        self.multifd = multifd
        self.recover_connect = recover_connect or connect_uri
        self.recover_timeout = recover_timeout
        self.connect_uri = connect_uri
        self.qemu_version = qemu_version
        self.out_dir = out_dir
        self.chunk_size = chunk_size
        self._listener: Listener = listen(listen_uri)
        self.listen_uri = self._listener.uri
        self.summary = CaptureSummary(str(out_dir), self.listen_uri, connect_uri)
        if preempt:
            self.summary.preempt = DirectionResult()
        self.summary.multifd = [DirectionResult() for _ in range(multifd)]
        self._multifd_connections: list[Connection] = []
        self._multifd_giving_up = threading.Event()
        self._stop = threading.Event()
        self._connections: list[Connection] = []
        self._thread: threading.Thread | None = None
        self._error: Exception | None = None
        self._writer: CaptureWriter | None = None
        self._preempt_connections: list[Connection] = []
        self._preempt_giving_up = threading.Event()

    @property
    def port(self) -> int:
        port = getattr(self._listener.address, "port", None)
        if port is None:
            raise TransportError(self.listen_uri, "not a TCP address")
        return int(port)

    def start(self) -> Relay:
        self._thread = threading.Thread(target=self._run_guarded, name="relay", daemon=True)
        self._thread.start()
        return self

    def progress(self) -> tuple[int, int] | None:
        """Bytes relayed so far (stream, return path); None until the source has connected."""
        writer = self._writer
        if writer is None:
            return None
        return writer.size(Direction.STREAM), writer.size(Direction.RETURN_PATH)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def join(self, timeout: float | None = None) -> CaptureSummary:
        """Wait for both directions to end; re-raise whatever stopped the relay early."""
        if self._thread is None:
            raise RuntimeError("relay not started")
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TransportError(self.listen_uri, f"relay still running after {timeout} s")
        if self._error is not None:
            raise self._error
        return self.summary

    def stop(self) -> None:
        """Abort: stop accepting and cut both connections (the recording is still closed)."""
        self._stop.set()
        for connection in list(self._connections):
            if connection.socket is not None:
                with contextlib.suppress(OSError):
                    connection.socket.shutdown(socket.SHUT_RDWR)  # wakes the blocked pumps
        if self._thread is not None:
            self._thread.join(10)
        self._listener.close()

    def __enter__(self) -> Relay:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def _run_guarded(self) -> None:
        try:
            self._run()
        except (QmigError, OSError) as error:  # OSError: writing the capture failed
            self._error = error
        finally:
            self._listener.close()

    def _accept(self) -> Connection:
        while not self._stop.is_set():
            try:
                return self._listener.accept(timeout=ACCEPT_POLL_SECONDS)
            except TransportError as error:
                if error.detail != "timed out":
                    raise
        raise TransportError(self.listen_uri, "relay stopped before the source connected")

    def _run(self) -> None:
        _raise_priority()
        source = self._accept()
        self._connections.append(source)
        if not self.recover_timeout and not self.preempt and not self.multifd:
            # One migration per relay: nobody else may connect while it runs.
            self._listener.close()
        writer = self._writer = CaptureWriter(self.out_dir)
        try:
            destination = connect(self.connect_uri)
        except TransportError:
            source.close()
            writer.close(self._meta(writer))
            raise
        self._connections.append(destination)
        writer.restart_clock()
        while True:
            where = {
                "t_ns": time.monotonic_ns() - writer.start_ns,
                "stream_offset": writer.size(Direction.STREAM),
                "return_path_offset": writer.size(Direction.RETURN_PATH),
            }
            preempt = None
            if self.preempt:
                # Opened (again, after a recovery's bitmap sync) once the main one is up.
                where["preempt_offset"] = writer.size(Direction.PREEMPT)
                # Where the destination listens now, decided here: the thread may take the
                # source's preempt connection at once (in the pre-7.2 variant it is already
                # waiting, right behind the resumed main one).
                uri = self.connect_uri if not self.summary.connections else self.recover_connect
                preempt = threading.Thread(
                    target=self._relay_preempt, args=(writer, uri), name="relay-preempt"
                )
                preempt.start()
            multifd = None
            if self.multifd and not self.summary.connections:
                multifd = threading.Thread(
                    target=self._relay_multifd, args=(writer,), name="relay-multifd"
                )
                multifd.start()
            self.summary.connections.append(where)
            self._relay_connection(source, destination, writer)
            if preempt is not None:
                self._end_preempt(preempt)
            if multifd is not None:
                self._end_multifd(multifd)
            if not self.recover_timeout or self._completed(writer):
                break
            try:
                source, destination = self._reconnect()
            except TransportError as error:
                self.summary.completed = False
                self.summary.stream.end = f"not resumed: {error.detail}"
                break
        self._listener.close()
        self.summary.duration_s = (time.monotonic_ns() - writer.start_ns) / 1e9
        writer.finish()
        for direction, result in self._results():
            result.bytes = writer.size(direction)
            result.chunks = writer.chunks(direction)
            result.sha256 = writer.sha256(direction)
        writer.close(self._meta(writer))

    def _completed(self, writer: CaptureWriter) -> bool:
        """Did the destination end this connection with SHUT(0)? (Its last 8 bytes.)"""
        self.summary.completed = writer.tail(Direction.RETURN_PATH).endswith(COMPLETED_SHUT)
        return self.summary.completed

    def _reconnect(self) -> tuple[Connection, Connection]:
        """The resumed migration: the source connects again, and the relay connects to the
        destination once it listens for the recovery (retrying until the time is up)."""
        deadline = time.monotonic() + self.recover_timeout
        while True:
            try:
                source = self._listener.accept(timeout=ACCEPT_POLL_SECONDS)
                break
            except TransportError as error:
                if error.detail != "timed out" or self._stop.is_set():
                    raise
                if time.monotonic() > deadline:
                    raise TransportError(self.listen_uri, "the source did not resume") from None
        self._connections.append(source)
        while True:
            try:
                destination = connect(self.recover_connect, timeout=1.0)
                break
            except TransportError:
                if time.monotonic() > deadline or self._stop.is_set():
                    source.close()
                    raise
                time.sleep(RETRY_SECONDS)
        self._connections.append(destination)
        return source, destination

    def _relay_connection(
        self, source: Connection, destination: Connection, writer: CaptureWriter
    ) -> None:
        pumps = [
            threading.Thread(
                target=self._pump,
                args=(source, destination, writer, Direction.STREAM),
                name="relay-stream",
            ),
            threading.Thread(
                target=self._pump,
                args=(destination, source, writer, Direction.RETURN_PATH),
                name="relay-return-path",
            ),
        ]
        for pump in pumps:
            pump.start()
        for pump in pumps:
            pump.join()
        source.close()
        destination.close()

    def _relay_preempt(self, writer: CaptureWriter, uri: str) -> None:
        """The preempt channel: the source's next connection, to a connection of its own to
        the destination at ``uri`` (after a recovery, where it was told migrate-recover).
        Only its source → destination bytes are recorded (the destination sends nothing on
        it)."""
        result = self.summary.preempt
        assert result is not None
        source = None
        while source is None and not (self._stop.is_set() or self._preempt_giving_up.is_set()):
            try:
                source = self._listener.accept(timeout=ACCEPT_POLL_SECONDS)
            except TransportError as error:
                if error.detail != "timed out":
                    result.end = f"no preempt channel: {error.detail}"
                    return
        if source is None:
            result.end = "no preempt channel"
            return
        self._connections.append(source)
        self._preempt_connections = [source]
        try:
            destination = connect(uri)
        except TransportError as error:
            result.end = f"connect: {error.detail}"
            source.close()
            return
        self._connections.append(destination)
        self._preempt_connections.append(destination)
        back = threading.Thread(
            target=self._pump,
            args=(destination, source, None, Direction.RETURN_PATH),
            name="relay-preempt-back",
        )
        back.start()
        self._pump(source, destination, writer, Direction.PREEMPT)
        back.join()
        source.close()
        destination.close()

    def _end_preempt(self, thread: threading.Thread) -> None:
        """The main connection is over: the source closes its preempt channel as it cleans
        up; one that lingers (or never came) is cut."""
        thread.join(PREEMPT_LINGER_S)
        if thread.is_alive():
            for connection in self._preempt_connections:
                if connection.socket is not None:
                    with contextlib.suppress(OSError):
                        connection.socket.shutdown(socket.SHUT_RDWR)
            self._preempt_giving_up.set()  # and an accept still waiting gives up
            thread.join()
            self._preempt_giving_up.clear()
        self._preempt_connections = []

    def _relay_multifd(self, writer: CaptureWriter) -> None:
        """Accept the multifd channels in order; relay each on a thread of its own."""
        pumps = []
        for channel, result in enumerate(self.summary.multifd):
            source = None
            while source is None and not (self._stop.is_set() or self._multifd_giving_up.is_set()):
                try:
                    source = self._listener.accept(timeout=ACCEPT_POLL_SECONDS)
                except TransportError as error:
                    if error.detail != "timed out":
                        result.end = f"not opened: {error.detail}"
                        break
            if source is None:
                for missing in self.summary.multifd[channel:]:
                    if missing.end == "running":
                        missing.end = "not opened"
                break
            self._connections.append(source)
            self._multifd_connections.append(source)
            try:
                destination = connect(self.connect_uri)
            except TransportError as error:
                result.end = f"connect: {error.detail}"
                source.close()
                continue
            self._connections.append(destination)
            self._multifd_connections.append(destination)
            pump = threading.Thread(
                target=self._relay_one_multifd,
                args=(source, destination, writer, channel),
                name=f"relay-multifd-{channel}",
            )
            pump.start()
            pumps.append(pump)
        for pump in pumps:
            pump.join()

    def _relay_one_multifd(
        self, source: Connection, destination: Connection, writer: CaptureWriter, channel: int
    ) -> None:
        # The destination sends nothing on a multifd channel; its end is passed on all the same.
        back = threading.Thread(
            target=self._pump,
            args=(destination, source, None, Direction.RETURN_PATH),
            name=f"relay-multifd-{channel}-back",
        )
        back.start()
        self._pump(source, destination, writer, multifd_direction(channel))
        back.join()
        source.close()
        destination.close()

    def _end_multifd(self, thread: threading.Thread) -> None:
        """The main connection is over: the source closes its multifd channels as it cleans
        up; those that linger (or never came) are cut."""
        thread.join(PREEMPT_LINGER_S)
        if thread.is_alive():
            self._multifd_giving_up.set()
            for connection in self._multifd_connections:
                if connection.socket is not None:
                    with contextlib.suppress(OSError):
                        connection.socket.shutdown(socket.SHUT_RDWR)
            thread.join()

    def _results(self) -> list[tuple[Direction, DirectionResult]]:
        results = [
            (Direction.STREAM, self.summary.stream),
            (Direction.RETURN_PATH, self.summary.return_path),
        ]
        if self.summary.preempt is not None:
            results.append((Direction.PREEMPT, self.summary.preempt))
        for channel, result in enumerate(self.summary.multifd):
            results.append((multifd_direction(channel), result))
        return results

    def _pump(
        self,
        reader: Connection,
        sender: Connection,
        writer: CaptureWriter | None,
        direction: Direction,
    ) -> None:
        """Forward ``reader`` to ``sender`` and record it as ``direction`` (``writer`` None:
        forward only)."""
        result = self._result(direction) if writer is not None else DirectionResult()
        assert result is not None
        buffer = bytearray(self.chunk_size)
        view = memoryview(buffer)
        forward_error: str | None = None
        while True:
            try:
                count = reader.recv_into(view)
            except TransportError as error:
                result.end = f"read: {error.detail}"
                break
            if count == 0:
                result.end = "eof"
                break
            received_ns = time.monotonic_ns()
            if forward_error is None:
                try:
                    sender.sendall(view[:count])
                except TransportError as error:
                    # Keep recording what this side still says; only forwarding stopped.
                    forward_error = f"forward: {error.detail}"
            if writer is not None:
                writer.record(direction, view[:count], received_ns)
        if forward_error is not None:
            result.end = forward_error
        elif self._stop.is_set():
            result.end = "stopped"  # our own shutdown, not the peer's end of stream
        # Pass the end of this direction on, whatever ended it, so the peer is not left waiting.
        with contextlib.suppress(TransportError):
            sender.shutdown_write()

    def _result(self, direction: Direction) -> DirectionResult | None:
        channel = direction.multifd_channel
        if channel is not None:
            return self.summary.multifd[channel]
        return {
            Direction.STREAM: self.summary.stream,
            Direction.RETURN_PATH: self.summary.return_path,
            Direction.PREEMPT: self.summary.preempt,
        }[direction]

    def _meta(self, writer: CaptureWriter) -> dict[str, Any]:
        return {
            "tool": f"qmig {__version__}",
            "listen": self.listen_uri,
            "connect": self.connect_uri,
            **self._version(writer),
            "started_unix": writer.start_wall,
            "duration_s": self.summary.duration_s,
            "clean": self.summary.clean,
            "connections": self.summary.connections,
            **self._multifd_meta(),
            "directions": {
                direction.value: {
                    "file": direction.file_name,
                    "bytes": result.bytes,
                    "chunks": result.chunks,
                    "sha256": result.sha256,
                    "end": result.end,
                }
                for direction, result in self._results()
            },
        }

    def _multifd_meta(self) -> dict[str, Any]:
        """``multifd``: the channels' directions and files, in the order accepted."""
        if not self.multifd:
            return {}
        channels = [multifd_direction(k) for k in range(self.multifd)]
        return {
            "multifd": {
                "channels": self.multifd,
                "directions": [direction.value for direction in channels],
                "files": [direction.file_name for direction in channels],
            }
        }

    def _version(self, writer: CaptureWriter) -> dict[str, str | None]:
        found = self._find_version(writer)
        self.summary.qemu_version = found["qemu_version"]
        return found

    def _find_version(self, writer: CaptureWriter) -> dict[str, str | None]:
        if self.qemu_version not in (None, "auto"):
            return {"qemu_version": self.qemu_version, "qemu_version_evidence": "given"}
        from qmig.wire.detect import PREFIX_BYTES, detect

        try:
            with (self.out_dir / Direction.STREAM.file_name).open("rb") as file:
                prefix = file.read(PREFIX_BYTES)
        except OSError:
            prefix = b""
        if not prefix or writer.size(Direction.STREAM) == 0:
            return {"qemu_version": None, "qemu_version_evidence": "no stream recorded"}
        detection = detect(prefix, complete=len(prefix) < PREFIX_BYTES)
        return {"qemu_version": detection.version, "qemu_version_evidence": detection.evidence}


def _raise_priority() -> None:
    """Run this thread, and the pumps it starts, ahead of ordinary work where allowed.

    The relay needs little CPU, but every page request and page crosses it, and the QEMUs on
    either side keep their vCPUs busy: on a small host each hop would otherwise wait for a
    time slice. Linux keeps nice values per thread; this one and its children are raised.
    """
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), RELAY_NICE)


def start_relay(connect_uri: str, out_dir: Path, listen_uri: str = "tcp:127.0.0.1:0") -> Relay:
    """Listen (default: an ephemeral port on 127.0.0.1) and relay in the background.

    ``relay.port`` is where the source should migrate to; ``relay.join()`` returns the
    :class:`CaptureSummary` once both directions have closed; ``relay.stop()`` aborts.
    """
    return Relay(connect_uri, out_dir, listen_uri).start()
