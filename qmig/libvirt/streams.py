"""QEMU's stream inside a save image, decompressed as it is read: memory stays bounded.

gzip, bzip2 and xz are decompressed with Python's standard library, zstd with the
``zstandard`` package, lzop by the ``lzop`` program, as libvirt itself does (``lzop -dc``).
A ``sparse`` image holds a mapped-ram stream (RAM at fixed file offsets rather than in page
records), which qmig does not read.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import shutil
import subprocess
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, BinaryIO, cast

from qmig.errors import MalformedError, QmigError, TruncatedError
from qmig.libvirt.image import SaveImage, read_image
from qmig.libvirt.layout import load_layout

BUFFER = 1 << 20
SPARSE_DETAIL = (
    "format 'sparse' holds a QEMU mapped-ram stream (RAM at fixed offsets in the file, "
    "not page records); qmig does not read mapped-ram streams yet"
)


def open_save_image(path: Path) -> BinaryIO:
    """The QEMU stream inside the libvirt save image ``path``."""
    return open_stream(read_image(path))


def open_stream(image: SaveImage) -> BinaryIO:
    """A reader of the image's QEMU stream, from its first byte (QEMU's magic)."""
    if image.compression == "sparse":
        raise QmigError(str(image.path), SPARSE_DETAIL)
    file = image.path.open("rb")
    try:
        file.seek(image.stream_offset)
        if image.compression == "raw":
            return file
        return _decompressing(image, file)
    except BaseException:
        file.close()
        raise


def relocate(error: QmigError, image: SaveImage) -> QmigError:
    """An error in the inner stream, said of the image: a file offset where there is one."""
    if error.offset is None:
        return error
    if image.compression == "raw":
        return error.at(error.offset + image.stream_offset)
    clone = error.at(error.offset)
    clone.detail += f" (of the {image.compression}-decompressed QEMU stream)"
    Exception.__init__(clone, clone.one_line())
    return clone


def _decompressing(image: SaveImage, file: BinaryIO) -> BinaryIO:
    name = image.compression
    if name == "lzop":
        return cast(BinaryIO, io.BufferedReader(_Program(image, file), BUFFER))
    opener: Callable[[BinaryIO], Any]
    if name == "gzip":
        opener = lambda raw: gzip.GzipFile(fileobj=raw, mode="rb")  # noqa: E731
    elif name == "bzip2":
        opener = bz2.BZ2File
    elif name == "xz":
        opener = lzma.LZMAFile
    elif name == "zstd":
        opener = _zstd_reader
    else:
        raise QmigError(str(image.path), f"no decompressor for format {name!r}")
    return cast(BinaryIO, io.BufferedReader(_Guarded(name, opener(file), file), BUFFER))


def _zstd_reader(file: BinaryIO) -> Any:
    try:
        import zstandard
    except ImportError:
        raise QmigError(
            "zstd",
            "a zstd-compressed save image needs the Python package zstandard "
            "(pip install 'qmig[libvirt]')",
        ) from None
    return zstandard.ZstdDecompressor().stream_reader(file, read_across_frames=True)


def _decompress_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError, EOFError, lzma.LZMAError, zlib.error]
    try:
        import zstandard

        errors.append(zstandard.ZstdError)
    except ImportError:
        pass
    return tuple(errors)


class _Guarded(io.RawIOBase):
    """A decompressor whose failures become one-line errors at the compressed byte reached."""

    def __init__(self, name: str, inner: Any, file: BinaryIO) -> None:
        self.name = name
        self.inner = inner
        self.file = file
        self.errors = _decompress_errors()
        self.ended = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.ended:
            return 0
        try:
            data = self.inner.read(len(buffer))
        except EOFError:
            raise TruncatedError(
                f"{self.name} data", self.file.tell(), during="the compressed stream"
            ) from None
        except self.errors as error:
            raise MalformedError(
                f"{self.name} data", f"cannot decompress: {error}", self.file.tell()
            ) from None
        if not data:
            self.ended = True
            return 0
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        try:
            self.inner.close()
            self.file.close()
        finally:
            super().close()


class _Program(io.RawIOBase):
    """A decompressing program reading the image from the stream's offset (libvirt's way)."""

    def __init__(self, image: SaveImage, file: BinaryIO) -> None:
        argv = load_layout().decompress[image.compression]
        if shutil.which(argv[0]) is None:
            file.close()
            raise QmigError(
                image.compression,
                f"an {image.compression}-compressed save image needs the {argv[0]} program "
                f"(apt-get install {argv[0]}), which is not installed",
            )
        self.name = image.compression
        self.stderr: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 (read at the end)
        # The child reads from the file's current offset: the stream's first byte.
        self.process = subprocess.Popen(
            argv, stdin=file, stdout=subprocess.PIPE, stderr=self.stderr
        )
        file.close()
        assert self.process.stdout is not None
        self.out = cast(io.BufferedReader, self.process.stdout)
        self.produced = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        count = self.out.readinto(buffer)
        if count:
            self.produced += count
            return count
        status = self.process.wait()
        if status != 0:
            self.stderr.seek(0)
            said = self.stderr.read().decode(errors="replace").strip().splitlines()
            detail = said[-1] if said else f"exit status {status}"
            raise MalformedError(f"{self.name} data", f"cannot decompress: {detail}")
        return 0

    def close(self) -> None:
        try:
            if self.process.poll() is None:
                self.process.kill()
            self.out.close()
            self.process.wait()
            self.stderr.close()
        finally:
            super().close()
