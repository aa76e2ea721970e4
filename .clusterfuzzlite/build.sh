#!/bin/bash -eu
# Builds qmig's three fuzz targets (the ones 'qmig fuzz' runs) as libFuzzer binaries in $OUT,
# each with the seed corpus and dictionary 'qmig fuzz' starts from.
#
# With Docker and a checkout of google/oss-fuzz, from the qmig checkout:
#   python3 OSS_FUZZ/infra/helper.py build_image --external .
#   python3 OSS_FUZZ/infra/helper.py build_fuzzers --external . --sanitizer address
#   python3 OSS_FUZZ/infra/helper.py check_build --external .
#   python3 OSS_FUZZ/infra/helper.py run_fuzzer --external . stream_fuzzer -- -fork=8
# In CI, google/clusterfuzzlite's actions/build_fuzzers and actions/run_fuzzers (language:
# python) build from this directory and fuzz on every pull request or on a schedule.
cd "$SRC/qmig"

# With the builder's CFLAGS, so that the C fast path the readers call is built with the
# sanitizer too.
pip3 install .

for fuzzer in .clusterfuzzlite/*_fuzzer.py; do
    # The wire profiles are package data (qmig.formats), read at run time.
    compile_python_fuzzer "$fuzzer" --collect-submodules=qmig --collect-data=qmig.formats
done

# NAME_seed_corpus.zip and NAME.dict beside each fuzzer NAME. The seeds include the real
# captures in fixtures/, which only this tree has: qmig runs from here for this step, its C
# helper built in place without the sanitizer flags (a plain python3 loads it).
CFLAGS= CXXFLAGS= LDFLAGS= python3 setup.py -q build_ext --inplace
python3 -m qmig.fuzz.atheris_seeds "$OUT"
