"""The postcopy-preempt capability: which variant a migration uses, and where pages go.

With ``postcopy-preempt`` (QEMU 7.1 on; it needs ``postcopy-ram``, at both ends) requested
pages travel on a second connection of their own, so that a faulting vCPU does not wait
behind the background pages queued on the main one. That connection carries no header: the
destination takes it as the preempt channel because it is the next connection after the main
one. It carries bare RAM page records (``be64 offset|flags``, the block name unless
CONTINUE, then the page or its fill byte), with their own "last block".

Two variants, chosen by the QEMU version and the machine type (the profile says which):

- ``pre-7.2`` (QEMU 7.1/7.2, and newer QEMU on machine types of 7.2 or older): the channel is
  opened at setup, the destination waits for it before loading, and the source ends it with
  an EOS record when the migration completes.
- ``8.0``: the channel is opened when postcopy starts (after the main channel's first PONG);
  nothing ends it but the migration's cleanup.

Both put only requested pages on it, each host page whole; the background sweep stays on the
main channel, where it was (the requested page does not move it). Which source thread sends
them is the QEMU version's, not the variant's (the profile's ``preempt_sender``): QEMU 7.2's
migration thread, so that they wait for the rate limit as the main channel's pages do; from
8.0 on the thread that reads the request, at once, on either variant.
"""

from __future__ import annotations

import enum
import re

from qmig.errors import QmigError
from qmig.wire.profiles import Profile

PREEMPT_CHANNEL = "preempt channel"  # how errors and reports name the connection

_MACHINE_VERSION = re.compile(r"-(\d+)\.(\d+)$")


class PreemptVariant(enum.Enum):
    PRE_7_2 = "pre-7.2"
    V8_0 = "8.0"

    @property
    def opened_at_setup(self) -> bool:
        """The source connects it right after the main channel, and the destination waits
        for it before it loads anything."""
        return self is PreemptVariant.PRE_7_2

    @property
    def ends_with_eos(self) -> bool:
        """The source sends an EOS record on it at completion (the destination's preempt
        thread, which the end of the load waits for, exits there)."""
        return self is PreemptVariant.PRE_7_2


VARIANT_NAMES = tuple(variant.value for variant in PreemptVariant)


def machine_version(machine_type: str) -> tuple[int, int] | None:
    """``pc-i440fx-7.2`` -> (7, 2); an alias without a version (``pc``, ``q35``): None."""
    match = _MACHINE_VERSION.search(machine_type)
    return None if match is None else (int(match.group(1)), int(match.group(2)))


def preempt_variant(
    profile: Profile, machine_type: str | None = None, override: str | None = None
) -> PreemptVariant:
    """The variant a migration with postcopy-preempt uses: ``override`` (one of
    VARIANT_NAMES) if given, else the profile's, with its compat rule for old machine types.
    A QmigError when the QEMU version has no postcopy-preempt."""
    if profile.preempt == "none":
        raise QmigError("--preempt", f"QEMU {profile.name} has no postcopy-preempt capability")
    if override is not None:
        if override not in VARIANT_NAMES:
            raise QmigError(
                "--preempt-variant", f"{override!r} is not one of {', '.join(VARIANT_NAMES)}"
            )
        return PreemptVariant(override)
    variant = PreemptVariant(profile.preempt)
    compat = profile.preempt_pre_7_2_machines
    if compat is not None and machine_type is not None:
        version = machine_version(machine_type)
        limit = machine_version("-" + compat)
        if version is not None and limit is not None and version <= limit:
            return PreemptVariant.PRE_7_2
    return variant
