"""cffi builder for ``qmig.runner._answer``: the source's answer thread and its
background sweep.

Out-of-line API mode, compiled at install time (``pip install -e .``); ``qmig_answer.h``
declares what Python calls, for the C and for cffi alike (see ``qmig/_cbuild.py``).
"""

import importlib.util
from pathlib import Path

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("_qmig_cbuild", HERE.parent / "_cbuild.py")
assert _spec is not None and _spec.loader is not None
cbuild = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cbuild)

ffibuilder = cbuild.builder(
    "qmig.runner._answer", HERE / "qmig_answer.h", [HERE / "answer.c", HERE / "sweep.c"]
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
