# The C fast paths are cffi out-of-line API modules, compiled at install time from the .c/.h
# files beside their build scripts (-O2 -Wall -Wextra; QMIG_STRICT_C=1 adds -Werror).
from setuptools import setup

setup(
    cffi_modules=[
        "qmig/wire/_ramscan_build.py:ffibuilder",
        "qmig/ram/_uffd_build.py:ffibuilder",
    ],
)
