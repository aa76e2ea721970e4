# The C fast paths are cffi out-of-line API modules, compiled at install time from the .c/.h
# files beside their build scripts (-O2 -Wall -Wextra; QMIG_STRICT_C=1 adds -Werror).
from setuptools import find_packages, setup

setup(
    # formats/ is the package qmig.formats (pyproject.toml maps the directory).
    packages=[*find_packages(include=["qmig*"]), "qmig.formats"],
    cffi_modules=[
        "qmig/wire/_ramscan_build.py:ffibuilder",
        "qmig/ram/_uffd_build.py:ffibuilder",
        "qmig/runner/_answer_build.py:ffibuilder",
    ],
)
