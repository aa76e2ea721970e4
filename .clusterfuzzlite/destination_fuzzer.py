#!/usr/bin/env python3
"""libFuzzer entry point of qmig's 'destination' target (qmig fuzz destination --engine atheris)."""

import sys

from qmig.fuzz.atheris_entry import main

if __name__ == "__main__":
    main("destination", sys.argv)
