"""Fuzzing qmig's parsers and machines, and differential fuzzing against real QEMU.

:mod:`qmig.fuzz.targets` (what is fuzzed), :mod:`qmig.fuzz.mutate` (how inputs change),
:mod:`qmig.fuzz.coverage` (the guidance), :mod:`qmig.fuzz.engine` (the loop, limits,
minimisation, reproducers), :mod:`qmig.fuzz.seeds` (real captures and strategies),
:mod:`qmig.fuzz.differential` (qmig's destination against a real QEMU destination) and
:mod:`qmig.fuzz.faults` (a fault-injecting proxy). ``qmig fuzz`` drives them.
"""
