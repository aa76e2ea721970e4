#!/usr/bin/env python3
"""libFuzzer entry point of qmig's 'stream' target (qmig fuzz stream --engine atheris)."""

import sys

from qmig.fuzz.atheris_entry import main

if __name__ == "__main__":
    main("stream", sys.argv)
