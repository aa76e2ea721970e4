"""The C of the cffi modules: built with warnings on, warning-free under the strict flags."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from cffi import FFI
from qmig.ram._uffd import ffi as uffd_ffi
from qmig.ram._uffd import lib as uffd_lib
from qmig.wire._ramscan import ffi as ramscan_ffi
from qmig.wire._ramscan import lib as ramscan_lib

from qmig import _cbuild

PACKAGE = Path(_cbuild.__file__).resolve().parent
HEADERS = [PACKAGE / "ram" / "qmig_uffd.h", PACKAGE / "wire" / "qmig_ramscan.h"]


def test_strict_adds_werror_only_when_asked() -> None:
    assert _cbuild.compile_args({}) == ["-O2", "-Wall", "-Wextra"]
    assert _cbuild.compile_args({"QMIG_STRICT_C": "0"}) == ["-O2", "-Wall", "-Wextra"]
    assert _cbuild.compile_args({"QMIG_STRICT_C": "1"}) == ["-O2", "-Wall", "-Wextra", "-Werror"]


@pytest.mark.parametrize(("ffi", "lib"), [(uffd_ffi, uffd_lib), (ramscan_ffi, ramscan_lib)])
def test_installed_modules_were_built_with_warnings_on(ffi: FFI, lib: object) -> None:
    flags = ffi.string(lib.qmig_build_flags()).decode().split()  # type: ignore[attr-defined]
    assert {"-O2", "-Wall", "-Wextra"} <= set(flags)


@pytest.mark.parametrize("header", HEADERS, ids=lambda path: path.name)
def test_each_header_is_also_cffis_declarations(header: Path) -> None:
    text = _cbuild.cdef_text(header)
    assert "#" not in "".join(line.lstrip()[:1] for line in text.splitlines())
    FFI().cdef(text)  # cffi parses every remaining line


@pytest.mark.parametrize(
    "source",
    sorted(path for path in PACKAGE.glob("*/*.c") if not path.name.startswith("_")),
    ids=lambda path: path.name,
)
def test_sources_compile_without_a_warning_under_the_strict_flags(source: Path) -> None:
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        pytest.skip("no C compiler")
    flags = _cbuild.compile_args({"QMIG_STRICT_C": "1"})
    # Compiled for real, not only parsed: some warnings come from the optimiser.
    done = subprocess.run(
        [compiler, *flags, "-c", "-o", os.devnull, f"-I{source.parent}", str(source)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def test_a_block_without_its_target_page_size_is_refused() -> None:
    """The C takes the target page size from struct qmig_block, never from a constant of its
    own: a block whose size was not set is refused, not divided by."""
    block = uffd_ffi.new("struct qmig_block *")
    block.fd = -1
    block.page_size = block.length = 1 << 12
    result = uffd_ffi.new("struct qmig_records_result *")
    headers = uffd_ffi.new("uint64_t[]", [0])
    data = uffd_ffi.new("uint8_t[]", 1)
    assert uffd_lib.qmig_place_records(block, data, 0, headers, headers, 1, 0, 0, result) == (
        -errno.EINVAL
    )
    assert uffd_lib.qmig_block_sweep(block) == -errno.EINVAL
    bad = uffd_ffi.new("uint64_t *")
    assert uffd_lib.qmig_block_discard(block, data, 0, 0, bad) == -errno.EINVAL
