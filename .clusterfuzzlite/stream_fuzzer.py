#!/usr/bin/env python3
"""libFuzzer entry point: qmig's 'stream' fuzz target (as 'qmig fuzz stream --engine atheris')."""

import sys

from qmig.fuzz.atheris_entry import main

if __name__ == "__main__":
    main("stream", sys.argv)
