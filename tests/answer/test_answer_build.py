"""The answer thread's C module: built with warnings on, its header also cffi's declarations."""

from __future__ import annotations

from pathlib import Path

from cffi import FFI
from qmig.runner._answer import ffi, lib

from qmig import _cbuild

HEADER = Path(_cbuild.__file__).resolve().parent / "runner" / "qmig_answer.h"


def test_the_module_was_built_with_warnings_on() -> None:
    flags = ffi.string(lib.qmig_build_flags()).decode().split()
    assert {"-O2", "-Wall", "-Wextra"} <= set(flags)


def test_the_header_is_also_cffis_declarations() -> None:
    text = _cbuild.cdef_text(HEADER)
    assert "#" not in "".join(line.lstrip()[:1] for line in text.splitlines())
    FFI().cdef(text)
