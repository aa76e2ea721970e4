"""qmig's seeds and dictionaries as OSS-Fuzz and ClusterFuzzLite pick them up.

``python -m qmig.fuzz.atheris_seeds OUT`` writes, for each target's fuzzer
(``stream_fuzzer``, ``return_path_fuzzer``, ``destination_fuzzer``), the seed corpus as
``OUT/NAME_seed_corpus.zip`` and the dictionary as ``OUT/NAME.dict``: the names those
services look for beside a fuzzer binary. The inputs are the ones ``qmig fuzz`` starts from.
"""

from __future__ import annotations

import hashlib
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path

from qmig.fuzz.atheris_campaign import write_dictionary
from qmig.fuzz.seeds import dictionary
from qmig.fuzz.targets import TARGETS, starting_inputs


def fuzzer_name(target: str) -> str:
    """``return-path`` -> ``return_path_fuzzer`` (the entry file's and the binary's name)."""
    return f"{target.replace('-', '_')}_fuzzer"


def export(out: Path, version: str | None = None) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for target in TARGETS.values():
        name = fuzzer_name(target.name)
        archive = out / f"{name}_seed_corpus.zip"
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as corpus:
            for data in starting_inputs(target, version):
                corpus.writestr(hashlib.sha1(data).hexdigest(), data)
        words = write_dictionary(out / f"{name}.dict", dictionary(target.channel, version))
        written += [archive, words]
    return written


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        sys.stderr.write("qmig: error: usage: python -m qmig.fuzz.atheris_seeds OUT\n")
        return 1
    for path in export(Path(args[0])):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
