"""What the cffi build scripts share: the compiler flags, and cffi's declarations read from the
C header that the C files include, so that each struct and prototype is written once.

cffi's ``cdef`` parses plain C declarations and no preprocessor lines, so the header's lines
that start with ``#`` (include guard, includes) are dropped before cffi sees it; everything
else in the header must be a declaration cffi understands (structs, enums, prototypes).

Loaded by path from the build scripts (setuptools runs them before qmig is installed), so it
imports nothing from qmig.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path

from cffi import FFI

STRICT_ENV = "QMIG_STRICT_C"
BASE_FLAGS = ("-O2", "-Wall", "-Wextra")


def compile_args(environ: Mapping[str, str] = os.environ) -> list[str]:
    """``-O2 -Wall -Wextra``, and ``-Werror`` when ``QMIG_STRICT_C=1`` (CI sets it)."""
    flags = list(BASE_FLAGS)
    if environ.get(STRICT_ENV) == "1":
        flags.append("-Werror")
    return flags


def cdef_text(header: Path) -> str:
    """The header as cffi's cdef takes it: without its preprocessor lines."""
    lines = header.read_text().splitlines()
    return "\n".join(line for line in lines if not line.lstrip().startswith("#"))


def _relative(path: Path) -> str:
    # setuptools wants source paths relative to setup.py, which is the working directory
    # when pip builds; running a build script by hand from elsewhere works as well.
    return os.path.relpath(path)


def builder(
    module: str,
    header: Path,
    sources: Sequence[Path],
    cdef_extra: str = "",
    source_extra: str = "",
) -> FFI:
    """An FFI for ``module`` built from ``sources``, declared by ``header``; ``cdef_extra``
    declares more for Python only (such as system constants, which ``source_extra`` includes).

    The module also answers ``qmig_build_flags()``: the flags it was compiled with, so that
    a test can check the installed build is the warning-clean one.
    """
    flags = compile_args()
    ffibuilder = FFI()
    ffibuilder.cdef(cdef_text(header) + cdef_extra + "\nconst char *qmig_build_flags(void);\n")
    flags_literal = shlex.join(flags).replace("\\", "\\\\").replace('"', '\\"')
    ffibuilder.set_source(
        module,
        f'#include "{header.name}"\n{source_extra}'
        f'static const char *qmig_build_flags(void) {{ return "{flags_literal}"; }}\n',
        sources=[_relative(source) for source in sources],
        include_dirs=[_relative(header.parent)],
        depends=[_relative(path) for path in sorted(header.parent.glob("*.h"))],
        extra_compile_args=flags,
    )
    return ffibuilder
