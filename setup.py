# The C fast paths are cffi out-of-line API modules, compiled at install time.
from setuptools import find_packages, setup

setup(
    # formats/ is the package qmig.formats (pyproject.toml maps the directory).
    packages=[*find_packages(include=["qmig*"]), "qmig.formats"],
    cffi_modules=[
        "qmig/wire/_ramscan_build.py:ffibuilder",
        "qmig/ram/_uffd_build.py:ffibuilder",
    ],
)
