"""qmig's wire profiles (``qemu-*.toml``) and their notes, shipped in the package as qmig.formats.

This folder stays at the top of the repository for readers; the build maps it into the package
(pyproject.toml, setup.py) and :mod:`qmig.wire.profiles` reads it with importlib.resources.
"""
