# The C fast paths are cffi out-of-line API modules, compiled at install time.
from setuptools import setup

setup(
    cffi_modules=[
        "qmig/wire/_ramscan_build.py:ffibuilder",
        "qmig/ram/_uffd_build.py:ffibuilder",
    ],
)
