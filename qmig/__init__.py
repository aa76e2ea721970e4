"""qmig: a QEMU-compatible live-migration stream simulator."""

__version__ = "0.1.0"
