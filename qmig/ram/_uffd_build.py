"""cffi builder for ``qmig.ram._uffd``: userfaultfd ioctls, page placement, faults, vCPU loops.

Out-of-line API mode, compiled against the kernel's ``<linux/userfaultfd.h>`` at install time
(``pip install -e .`` runs it through setup.py's ``cffi_modules``). API mode releases the GIL
around every call, which is what lets a C "vCPU" block on a missing page while the Python fault
thread keeps running. The C is in the ``.c`` files beside this script; ``qmig_uffd.h`` declares
what Python calls, for the C and for cffi alike.
"""

import importlib.util
from pathlib import Path

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("_qmig_cbuild", HERE.parent / "_cbuild.py")
assert _spec is not None and _spec.loader is not None
cbuild = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cbuild)

SOURCES = [
    "uffd.c",
    "bitmap.c",
    "memory.c",
    "workload.c",
    "records.c",
    "discard.c",
    "serve.c",
    "fastpath.c",
    "request.c",
]

# The kernel's and libc's constants Python uses, taken from their headers at build time.
KERNEL_CONSTANTS = [
    "UFFD_API",
    "UFFDIO_REGISTER_MODE_MISSING",
    "UFFDIO_COPY_MODE_DONTWAKE",
    "UFFDIO_ZEROPAGE_MODE_DONTWAKE",
    "UFFD_EVENT_PAGEFAULT",
    "UFFD_EVENT_FORK",
    "UFFD_EVENT_REMAP",
    "UFFD_EVENT_REMOVE",
    "UFFD_EVENT_UNMAP",
    "UFFD_PAGEFAULT_FLAG_WRITE",
    "_UFFDIO_REGISTER",
    "_UFFDIO_UNREGISTER",
    "_UFFDIO_WAKE",
    "_UFFDIO_COPY",
    "_UFFDIO_ZEROPAGE",
    "_UFFDIO_API",
    "MADV_DONTNEED",
    "MADV_HUGEPAGE",
    "MADV_NOHUGEPAGE",
    "MCL_CURRENT",
    "MCL_FUTURE",
]

ffibuilder = cbuild.builder(
    "qmig.ram._uffd",
    HERE / "qmig_uffd.h",
    [HERE / name for name in SOURCES],
    cdef_extra="".join(f"\n#define {name} ..." for name in KERNEL_CONSTANTS),
    source_extra="#include <sys/mman.h>\n#include <linux/userfaultfd.h>\n",
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
