"""cffi builder for the RAM-record fast path (see qmig/wire/ramscan.py).

The C is ``ramscan.c``; ``qmig_ramscan.h`` declares what Python calls, for the C and for cffi.
"""

import importlib.util
from pathlib import Path

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("_qmig_cbuild", HERE.parent / "_cbuild.py")
assert _spec is not None and _spec.loader is not None
cbuild = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cbuild)

ffibuilder = cbuild.builder("qmig.wire._ramscan", HERE / "qmig_ramscan.h", [HERE / "ramscan.c"])

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
