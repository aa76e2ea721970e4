"""libFuzzer's entry point into qmig's fuzz targets, through atheris.

``python -m qmig.fuzz.atheris_entry [libFuzzer flags] [CORPUS_DIR...]`` fuzzes the target
named by ``QMIG_FUZZ_TARGET`` (``stream``, ``return-path``, ``destination``, or
``module:attribute`` naming any :class:`~qmig.fuzz.targets.Target`); the QEMU version and
the per-input time limit come from ``QMIG_FUZZ_VERSION`` and ``QMIG_FUZZ_TIME_LIMIT``. They
travel in the environment, not in argv, because libFuzzer's fork mode starts its workers
with the parent's argv, and any argument it does not know is a corpus directory to it.

The oracle is the built-in engine's, not a copy of it: each input goes through
:func:`qmig.fuzz.engine.execute`, and a finding (an exception that is not a qmig error, a
verdict that depends on chunking, a page or discard outside its block, a hang, MemoryError)
is raised as :class:`FuzzFinding`, which atheris reports as a crash and libFuzzer writes as a
``crash-*`` file. qmig's modules are instrumented for coverage as they are imported, except
the fuzzer itself and the command line (as :mod:`qmig.fuzz.coverage` skips them).
"""

from __future__ import annotations

import importlib
import os
import shlex
import sys
from collections.abc import Sequence

TARGET_ENV = "QMIG_FUZZ_TARGET"
VERSION_ENV = "QMIG_FUZZ_VERSION"  # empty or unset: the default profile
TIME_LIMIT_ENV = "QMIG_FUZZ_TIME_LIMIT"
# Coverage on what the targets exercise; the fuzzer's own code and the CLI teach nothing.
INSTRUMENTED = ["qmig"]
NOT_INSTRUMENTED = [
    "qmig.fuzz.coverage",
    "qmig.fuzz.engine",
    "qmig.fuzz.mutate",
    "qmig.fuzz.targets",
]


class FuzzFinding(Exception):
    """What the built-in engine calls a finding, raised so that libFuzzer records it."""


def resolve(name: str) -> object:
    """A target by its ``qmig fuzz`` name, or ``module:attribute`` for any Target."""
    from qmig.fuzz.targets import TARGETS

    if name in TARGETS:
        return TARGETS[name]
    module, _, attribute = name.partition(":")
    if not attribute:
        raise SystemExit(f"qmig: error: {TARGET_ENV}: unknown target {name!r}")
    return getattr(importlib.import_module(module), attribute)


def main(target_name: str | None = None, argv: Sequence[str] | None = None) -> None:
    import atheris

    name = target_name or os.environ.get(TARGET_ENV, "")
    version = os.environ.get(VERSION_ENV) or None
    with atheris.instrument_imports(include=INSTRUMENTED, exclude=NOT_INSTRUMENTED):
        from qmig.fuzz.engine import MEMORY_BOUND, TIME_LIMIT, execute, memory_bound
        from qmig.fuzz.targets import Target
        from qmig.protocol import destination  # noqa: F401  (instrumented here, not later)
        from qmig.wire import reader  # noqa: F401

        target = resolve(name)
    assert isinstance(target, Target)
    limit = float(os.environ.get(TIME_LIMIT_ENV) or TIME_LIMIT)

    def one_input(data: bytes) -> None:
        outcome = execute(target, data, version, limit=limit)
        if outcome.finding is not None:
            raise FuzzFinding(f"{outcome.finding.kind}: {outcome.finding.summary}")

    args = list(sys.argv if argv is None else argv)
    if argv is None and __spec__ is not None and args[0] == __file__:
        # Run as ``python -m``: argv[0] is this file, which fork mode cannot execute. libFuzzer
        # starts each worker through ``sh -c`` with argv joined by spaces, so the command
        # that started this process works in its place.
        args[0] = shlex.join([sys.executable, "-m", __spec__.name])
    atheris.Setup(args, one_input)
    # As in the built-in engine, an allocation sized by a hostile length field fails with
    # MemoryError (a finding) rather than taking the machine. atheris.Fuzz() never returns.
    with memory_bound(MEMORY_BOUND):
        atheris.Fuzz()


if __name__ == "__main__":
    main()
