"""The on-disk layout of a capture (documented in formats/capture.md), written and read here.

A capture directory holds ``stream.bin`` (source → destination bytes), ``return-path.bin``
(destination → source bytes), ``index.tsv`` (one line per chunk as it was received) and
``meta.json``. Data files are written without fsync: a capture is for analysis, and syncing
per chunk would slow the migration it watches. Every reader also accepts each file
xz-compressed (``stream.bin.xz``...), as the fixtures are shipped, and decompresses it as it
reads, so memory stays bounded.
"""

from __future__ import annotations

import enum
import hashlib
import json
import lzma
import queue
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, cast

from qmig.capture.live import DEFAULT_TIMEOUT_S, LiveFile, is_live
from qmig.errors import MalformedError, QmigError

STREAM_NAME = "stream.bin"
RETURN_PATH_NAME = "return-path.bin"
PREEMPT_NAME = "preempt.bin"  # postcopy-preempt's channel, source → destination
MULTIFD_PREFIX = "multifd-"  # multifd-<K>: the K-th multifd channel accepted, source → destination
MAX_MULTIFD_CHANNELS = 256  # QEMU's multifd-channels is at most 255 (a u8 id)
INDEX_NAME = "index.tsv"
META_NAME = "meta.json"
FORMAT = "qmig-capture"
FORMAT_VERSION = 1
INDEX_HEADER = "direction\toffset\tlength\tt_ns\n"
TAIL_BYTES = 16  # kept of each direction: what the return path ended with


class Direction(enum.Enum):
    STREAM = "stream"  # source → destination: the migration stream
    RETURN_PATH = "return-path"  # destination → source
    PREEMPT = "preempt"  # source → destination: the postcopy-preempt channel, if there is one
    # And ``multifd-<K>`` (source → destination): made on demand, see multifd_direction().

    @classmethod
    def _missing_(cls, value: object) -> Direction | None:
        """``multifd-<K>``: the K-th multifd channel's direction, one member per K."""
        if not isinstance(value, str) or not _MULTIFD.fullmatch(value):
            return None
        if int(value[len(MULTIFD_PREFIX) :]) >= MAX_MULTIFD_CHANNELS:
            return None
        member = cls._value2member_map_.get(value)
        if member is None:
            member = object.__new__(cls)
            member._value_ = value
            member._name_ = value.upper().replace("-", "_")
            cls._value2member_map_[value] = member
        return member  # type: ignore[return-value]

    @property
    def multifd_channel(self) -> int | None:
        """K for ``multifd-<K>``; None for the other directions."""
        if not self.value.startswith(MULTIFD_PREFIX):
            return None
        return int(self.value[len(MULTIFD_PREFIX) :])

    @property
    def file_name(self) -> str:
        if self.multifd_channel is not None:
            return f"{self.value}.bin"
        return {
            Direction.STREAM: STREAM_NAME,
            Direction.RETURN_PATH: RETURN_PATH_NAME,
            Direction.PREEMPT: PREEMPT_NAME,
        }[self]


_MULTIFD = re.compile(re.escape(MULTIFD_PREFIX) + r"(0|[1-9][0-9]{0,2})")


def multifd_direction(channel: int) -> Direction:
    """The direction (and file, ``multifd-<K>.bin``) of the K-th multifd channel accepted."""
    return Direction(f"{MULTIFD_PREFIX}{channel}")


# The directions every capture has; the others' files exist only where they carried bytes.
MAIN_DIRECTIONS = (Direction.STREAM, Direction.RETURN_PATH)


@dataclass(frozen=True)
class Chunk:
    """One read from one side: ``length`` bytes at ``offset`` of that direction's file."""

    direction: Direction
    offset: int
    length: int
    t_ns: int  # monotonic nanoseconds since the capture started


class _DirectionFile:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.handle: BinaryIO = path.open("wb")
        self.size = 0
        self.chunks = 0
        self.sha256 = ""


class CaptureWriter:
    """Appends chunks to the two data files and the index.

    ``record()`` only queues a copy of the chunk; one background thread writes the files. The
    forwarding threads thus never wait on the disk (page-cache writeback can stall a writer
    for milliseconds), only on the queue when the disk falls more than ``QUEUED_CHUNKS``
    behind, which bounds memory.
    """

    QUEUED_CHUNKS = 64

    def __init__(self, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        self.out_dir = out_dir
        self.start_ns = time.monotonic_ns()
        self.start_wall = time.time()
        self._files = {d: _DirectionFile(out_dir / d.file_name) for d in MAIN_DIRECTIONS}
        self._tails: dict[Direction, bytes] = {}
        self._index = (out_dir / INDEX_NAME).open("w", encoding="ascii")
        self._index.write(INDEX_HEADER)
        self._queue: queue.Queue[tuple[Direction, bytes, int, int] | None] = queue.Queue(
            self.QUEUED_CHUNKS
        )
        self._write_error: OSError | None = None
        self._thread = threading.Thread(target=self._write_loop, name="capture-writer")
        self._thread.start()

    def restart_clock(self) -> None:
        """Make t=0 the moment the first connection arrived, not when the files were made."""
        self.start_ns = time.monotonic_ns()
        self.start_wall = time.time()

    def record(self, direction: Direction, data: memoryview, received_ns: int) -> None:
        """Queue one chunk (copied: the caller reuses its buffer). One caller per direction."""
        file = self._files.get(direction)
        if file is None:  # a channel that is not always there: its file from its first bytes
            file = self._files[direction] = _DirectionFile(self.out_dir / direction.file_name)
        offset = file.size
        file.size += len(data)
        tail = self._tails.get(direction, b"") + bytes(data[-TAIL_BYTES:])
        self._tails[direction] = tail[-TAIL_BYTES:]
        file.chunks += 1
        self._queue.put((direction, bytes(data), offset, received_ns - self.start_ns))

    def _write_loop(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._write_error is not None:
                continue  # keep draining so the forwarding threads never block on us
            direction, data, offset, t_ns = item
            try:
                self._files[direction].handle.write(data)
                self._index.write(f"{direction.value}\t{offset}\t{len(data)}\t{t_ns}\n")
            except OSError as error:
                self._write_error = error

    def size(self, direction: Direction) -> int:
        file = self._files.get(direction)
        return 0 if file is None else file.size

    def tail(self, direction: Direction) -> bytes:
        """The last few bytes recorded in ``direction`` (up to TAIL_BYTES)."""
        return self._tails.get(direction, b"")

    def chunks(self, direction: Direction) -> int:
        file = self._files.get(direction)
        return 0 if file is None else file.chunks

    def sha256(self, direction: Direction) -> str:
        """Digest of the finished file (valid after ``finish()``)."""
        file = self._files.get(direction)
        return "" if file is None else file.sha256

    def finish(self) -> None:
        """Write out what is queued, close the data files and hash them.

        Hashing reads the files back once the migration is over: hashing every chunk on the
        forwarding path would cost about as much CPU as the forwarding itself. A write error
        (e.g. disk full) is raised here.
        """
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        for file in self._files.values():
            if not file.handle.closed:
                file.handle.close()
                if self._write_error is None:
                    file.sha256 = _file_sha256(file.path)
        if self._write_error is not None:
            raise self._write_error

    def close(self, meta: dict[str, Any]) -> None:
        try:
            self.finish()
        finally:
            self._index.close()
        self._sort_index()
        document = {"format": FORMAT, "version": FORMAT_VERSION, **meta}
        (self.out_dir / META_NAME).write_text(json.dumps(document, indent=2) + "\n")

    def _sort_index(self) -> None:
        # The two pumps queue chunks as they finish forwarding, so lines can be slightly out
        # of time order; readers want one timeline. Each direction's own lines stay in offset order.
        path = self.out_dir / INDEX_NAME
        lines = path.read_text(encoding="ascii").splitlines(keepends=True)[1:]
        lines.sort(key=lambda line: int(line.rsplit("\t", 1)[1]))
        path.write_text(INDEX_HEADER + "".join(lines), encoding="ascii")


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Capture:
    """A capture directory read back: both byte streams, the chunk index and the metadata."""

    stream: bytes
    return_path: bytes
    chunks: list[Chunk]
    meta: dict[str, Any]


def capture_file(directory: Path, name: str) -> Path | None:
    """``directory/name``, or its xz-compressed ``name.xz``; None when neither exists.

    A FIFO or character device counts (its bytes are read as they come, see
    :mod:`qmig.capture.live`); a directory does not.
    """
    for candidate in (directory / name, directory / f"{name}.xz"):
        if candidate.exists() and not candidate.is_dir():
            return candidate
    return None


def open_capture_file(path: Path, timeout: float = DEFAULT_TIMEOUT_S) -> BinaryIO:
    """Open a capture file for reading, decompressing a ``.xz`` one on the fly.

    A FIFO or character device is read with ``timeout`` seconds as the limit for its
    first byte and between reads; a regular file needs none.
    """
    try:
        compressed = path.suffix == ".xz"
        if not is_live(path):
            return lzma.open(path, "rb") if compressed else path.open("rb")  # type: ignore[return-value]
        live = cast(BinaryIO, LiveFile(path, timeout))
        return cast(BinaryIO, lzma.open(live, "rb")) if compressed else live
    except OSError as error:
        raise QmigError(str(path), error.strerror or str(error)) from None


def read_capture_file(path: Path) -> bytes:
    """A whole capture file (decompressed); for small files such as the index."""
    with open_capture_file(path) as handle:
        try:
            return handle.read()
        except lzma.LZMAError as error:
            raise MalformedError(str(path), f"cannot decompress: {error}") from None


def _required(directory: Path, name: str) -> Path:
    path = capture_file(directory, name)
    if path is None:
        raise QmigError(str(directory), f"not a capture folder: no {name} or {name}.xz")
    return path


def read_index(path: Path) -> list[Chunk]:
    lines = read_capture_file(path).decode("ascii", "replace").splitlines()
    if not lines or lines[0] + "\n" != INDEX_HEADER:
        raise MalformedError(str(path), "not a qmig capture index (bad header line)")
    chunks = []
    for number, line in enumerate(lines[1:], start=2):
        fields = line.split("\t")
        try:
            direction = Direction(fields[0])
            offset, length, t_ns = (int(field) for field in fields[1:])
        except ValueError:
            raise MalformedError(str(path), f"bad index line {number}: {line!r}") from None
        chunks.append(Chunk(direction, offset, length, t_ns))
    return chunks


def read_capture(directory: Path) -> Capture:
    """Read a capture directory into memory and check the index covers both files."""
    capture = Capture(
        stream=read_capture_file(_required(directory, STREAM_NAME)),
        return_path=read_capture_file(_required(directory, RETURN_PATH_NAME)),
        chunks=read_index(_required(directory, INDEX_NAME)),
        meta=json.loads((directory / META_NAME).read_text()),
    )
    for direction, data in (
        (Direction.STREAM, capture.stream),
        (Direction.RETURN_PATH, capture.return_path),
    ):
        expected_offset = 0
        for chunk in capture.chunks:
            if chunk.direction is direction:
                if chunk.offset != expected_offset:
                    raise MalformedError(
                        INDEX_NAME,
                        f"{direction.value} chunk at {chunk.offset}, expected {expected_offset}",
                    )
                expected_offset += chunk.length
        if expected_offset != len(data):
            raise MalformedError(
                INDEX_NAME,
                f"{direction.value} chunks sum to {expected_offset}, file has {len(data)} bytes",
            )
    return capture
