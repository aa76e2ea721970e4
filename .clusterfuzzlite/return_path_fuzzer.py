#!/usr/bin/env python3
"""libFuzzer entry point of qmig's 'return-path' target (qmig fuzz return-path --engine atheris)."""

import sys

from qmig.fuzz.atheris_entry import main

if __name__ == "__main__":
    main("return-path", sys.argv)
