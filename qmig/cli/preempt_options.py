"""The postcopy-preempt options, shared by simulate, receive and replay."""

from __future__ import annotations

from typing import Any

from qmig.protocol.preempt import VARIANT_NAMES


def add_preempt(parser: Any, *, machine_type: bool = False) -> None:
    group = parser.add_argument_group("postcopy-preempt")
    group.add_argument(
        "--preempt",
        action="store_true",
        help="postcopy-preempt: requested pages on a connection of their own (QEMU 7.1+; "
        "as with QEMU, both ends must have it)",
    )
    group.add_argument(
        "--preempt-variant",
        choices=VARIANT_NAMES,
        help="pre-7.2: the channel opens at setup and ends with EOS; 8.0: it opens when "
        "postcopy starts (default: from --qemu-version and the machine type)",
    )
    if machine_type:
        group.add_argument(
            "--machine-type",
            metavar="TYPE",
            help="the machine type the CONFIGURATION names (default: the version's "
            "own, as -machine pc names it: pc-i440fx-10.0 for 10.0); "
            "QEMU 8.0+ uses the pre-7.2 preempt variant for types of 7.2 or older",
        )
