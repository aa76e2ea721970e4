"""Driving real QEMU: the test guest, QMP-controlled processes and the memory oracle."""
