"""Which wire profile reads a stream: ``--qemu-version auto``, from the stream's first bytes.

Nothing in a migration stream names the QEMU that wrote it. The evidence, strongest first:

1. What each profile can read. The first bytes (:data:`PREFIX_BYTES`: the header, the
   CONFIGURATION section and the records after them) are read with every profile in
   ``formats/``; a profile that refuses them is out. This is how a command that only some
   versions know (10.0's SWITCHOVER_START), a CONFIGURATION missing (allowed only where
   the profile says ``configuration = "optional"``) or with subsections an older profile
   lacks, or a 0-byte POSTCOPY_ADVISE rule a version out.
2. The PING that a profile's source adds inside PACKAGED (``package_loaded_ping``): a
   stream that carries it comes from a version whose profile has it.
3. The machine type in CONFIGURATION (``pc-i440fx-7.2``, ``pc-q35-10.0``, ``virt-9.2``):
   QEMU gates wire changes on the machine type's compat properties, and a source is at
   least as new as its machine type, so the newest profile not newer than the machine
   type's version is chosen.
4. Otherwise the default profile (if it reads the bytes), else the newest that does.

:func:`hint` answers the other question, after a read failed: which other profile reads
the same bytes past the failing offset. It is what ``qmig`` appends to such an error line.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from qmig.errors import QmigError
from qmig.wire import messages as m
from qmig.wire.profiles import DEFAULT_VERSION, available_versions, load_profile
from qmig.wire.reader import END, NEED_DATA, Record, StreamReader

PREFIX_BYTES = 1 << 16
# A machine type ends in its QEMU version: pc-i440fx-7.2, pc-q35-10.0, virt-9.2, pseries-8.0.
MACHINE_VERSION = re.compile(r"-(\d+)\.(\d+)$")

Chunks = Callable[[], Iterable[bytes]]


def version_key(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in name.split("."))


@dataclass(frozen=True)
class Reading:
    """How one profile fared on the prefix."""

    version: str
    error: QmigError | None = None
    machine_type: str | None = None
    loaded_ping: bool = False  # its package_loaded_ping seen inside PACKAGED


@dataclass(frozen=True)
class Detection:
    version: str
    evidence: str  # one phrase, for the listing, JSON and error lines
    readings: tuple[Reading, ...] = field(default=(), repr=False)

    @property
    def readers(self) -> list[str]:
        return [reading.version for reading in self.readings if reading.error is None]


def read_prefix(version: str, prefix: bytes, complete: bool) -> Reading:
    """Read ``prefix`` with one profile, to its end (or the stream's, when ``complete``)."""
    profile = load_profile(version)
    reader = StreamReader(version)
    reader.feed(prefix)
    if complete:
        reader.feed_eof()
    machine_type = None
    loaded_ping = False
    try:
        while (record := reader.next_record()) not in (NEED_DATA, END):
            assert isinstance(record, Record)
            message = record.message
            if isinstance(message, m.Configuration):
                machine_type = message.machine_type
            elif (
                isinstance(message, m.Ping)
                and record.depth > 0
                and profile.package_loaded_ping is not None
                and message.value == profile.package_loaded_ping
            ):
                loaded_ping = True
    except QmigError as error:
        return Reading(version, error, machine_type, loaded_ping)
    return Reading(version, None, machine_type, loaded_ping)


def machine_version(machine_type: str | None) -> tuple[int, int] | None:
    match = MACHINE_VERSION.search(machine_type or "")
    return None if match is None else (int(match.group(1)), int(match.group(2)))


def detect(prefix: bytes, *, complete: bool = False) -> Detection:
    """The profile for a stream that starts with ``prefix`` (``complete``: that is all of it)."""
    readings = tuple(read_prefix(v, prefix, complete) for v in available_versions())
    readers = sorted((r for r in readings if r.error is None), key=lambda r: version_key(r.version))
    if not prefix:
        return Detection(DEFAULT_VERSION, "an empty stream: the default", readings)
    if not readers:
        return Detection(DEFAULT_VERSION, "no profile reads its first bytes", readings)
    pinged = [r for r in readers if r.loaded_ping]
    if pinged:
        chosen = pinged[-1]
        return Detection(
            chosen.version, f"the PING inside PACKAGED that only {chosen.version} sends", readings
        )
    machine = readers[0].machine_type
    machine_text = "no machine type" if machine is None else f"machine type {machine}"
    if len(readers) == 1:
        refused = [r for r in readings if r.error is not None]
        # The newest refusal says best what the older profiles lack.
        last = refused[-1]
        assert last.error is not None
        why = f"{last.version}: {last.error.what} at byte {last.error.offset}"
        only = readers[0].version
        return Detection(
            only, f"only {only} reads its first bytes ({why}); {machine_text}", readings
        )
    wanted = machine_version(machine)
    if wanted is not None:
        older = [r for r in readers if version_key(r.version) <= wanted]
        chosen = older[-1] if older else readers[0]
        return Detection(chosen.version, machine_text, readings)
    names = [r.version for r in readers]
    chosen_name = DEFAULT_VERSION if DEFAULT_VERSION in names else names[-1]
    if machine is not None:
        machine_text += " (no version in it)"
    return Detection(chosen_name, f"{machine_text}: the default", readings)


def reads_past(chunks: Iterable[bytes], version: str, offset: int) -> bool:
    """Whether ``version``'s profile reads the stream in ``chunks`` beyond byte ``offset``."""
    reader = StreamReader(version)
    try:
        for chunk in chunks:
            reader.feed(chunk)
            while (record := reader.next_record()) not in (NEED_DATA, END):
                if reader.offset > offset:
                    return True
            if record is END:
                return True
        reader.feed_eof()
        while (record := reader.next_record()) is not END:
            if reader.offset > offset:
                return True
    except QmigError:
        return False
    return True


def hint(error: QmigError, used: str, chunks: Chunks) -> str | None:
    """After ``used``'s profile failed with ``error``: a profile that reads past that byte.

    ``chunks`` reads the stream again from its start (called once per other profile).
    """
    if error.offset is None or reads_past(chunks(), used, error.offset):
        # ``used``'s own reader gets past the byte: the stream is well-formed for it and the
        # error is one of state or contents, which another profile would not change.
        return None
    others = sorted((v for v in available_versions() if v != used), key=version_key, reverse=True)
    for version in others:
        if reads_past(chunks(), version, error.offset):
            return f"--qemu-version {version} reads this stream past byte {error.offset}"
    return None


def prefix_hint(error: QmigError, used: str, prefix: bytes) -> str | None:
    """The hint when only the stream's first bytes can be read again (a live connection)."""
    if error.offset is not None and error.offset < len(prefix):
        found = hint(error, used, lambda: [prefix])
        if found is not None:
            return found
    detection = detect(prefix)
    if not detection.readers:
        return None  # no profile reads these bytes: no other version would do better
    if detection.version != used and used not in detection.readers:
        return f"its first bytes read as QEMU {detection.version} ({detection.evidence})"
    if detection.version != used and detection.evidence.startswith(("machine", "the PING")):
        return f"{detection.evidence} suggests --qemu-version {detection.version}"
    return None
