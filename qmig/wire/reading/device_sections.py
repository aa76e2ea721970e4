"""Device sections and what follows EOF: the VMDESCRIPTION that says how to read them.

A device's SECTION_FULL carries no length. Outside PACKAGED its end is found by decoding it
with its VMDESCRIPTION entry (:mod:`qmig.wire.vmstate`), the JSON a precopy stream ends with;
inside PACKAGED the blob's length bounds it, and its footer delimits it.
"""

from __future__ import annotations

import json
from typing import Any

from qmig.errors import MalformedError
from qmig.wire import messages as m
from qmig.wire.reading.framing import Frame, FramedInput, Section
from qmig.wire.reading.records import NeedMore, Record

MAX_DESCRIPTION = 64 << 20  # the largest VMDESCRIPTION, and deferred device state, it buffers


class DeviceSectionsReader(FramedInput):
    """Device SECTION_FULL payloads and the VMDESCRIPTION (a part of :class:`StreamReader`)."""

    vmdesc: Any

    def _read_device(self) -> Record:
        section = self._frame.section
        assert section is not None
        if self._packages:
            size = self._delimit_by_footer(section)
            data = bytes(self._buf[self._pos : self._pos + size])
            self._after_section()
            return self._emit(
                m.DeviceState(section.idstr, section.instance_id, data), size, section.idstr
            )
        return self._read_described_device(section)

    def _delimit_by_footer(self, section: Section) -> int:
        """Length of a device payload inside PACKAGED, found by its footer.

        Inside a package the blob's length bounds the device state even where no
        VMDESCRIPTION describes it. The payload ends at the first ``0x7e + be32 id`` that
        is followed by something that can only start the next record: another section
        header, a known command, or the end of the package.
        """
        offset = self.offset
        package_end = self._packages[-1] - self._base
        limit = min(package_end, self._pos + self.max_record)
        if limit > len(self._buf):
            raise NeedMore(f"SECTION_FULL {section.idstr!r}", offset)
        footer = bytes(
            [self.profile.section_types["SECTION_FOOTER"]]
        ) + section.section_id.to_bytes(4, "big")
        at = self._pos
        while True:
            at = self._storage.find(footer, at, limit)
            if at < 0:
                raise MalformedError(
                    "SECTION_FULL",
                    f"cannot delimit device section {section.idstr!r}: no footer found "
                    "before the end of the package",
                    offset,
                )
            if self._starts_record(at + 5, package_end):
                return at - self._pos
            at += 1

    def _starts_record(self, at: int, package_end: int) -> bool:
        if at == package_end:
            return True
        types = self.profile.section_types
        kind = self._buf[at]
        if kind == types["COMMAND"] and at + 5 <= package_end:
            cmd = int.from_bytes(self._buf[at + 1 : at + 3], "big")
            length = int.from_bytes(self._buf[at + 3 : at + 5], "big")
            name = self.profile.command_names.get(cmd)
            return (
                name is not None
                and self.profile.command_lengths[name].allows(length)
                and at + 5 + length <= package_end
            )
        if kind in (types["SECTION_FULL"], types["SECTION_START"]) and at + 6 <= package_end:
            name_len = self._buf[at + 5]
            end = at + 6 + name_len + 8
            if name_len == 0 or end > package_end:
                return False
            idstr = self._buf[at + 6 : at + 6 + name_len]
            return all(0x20 < byte < 0x7F for byte in idstr)
        if kind == types["EOF"]:
            return at + 1 == package_end
        return False

    def _read_described_device(self, section: Section) -> Record:
        description = self._device_description(section)
        from qmig.wire import vmstate

        limit = self._limit()
        try:
            used, decoded = vmstate.decode_device(description, self._buf, self._pos, limit)
        except vmstate.VmstateError as error:
            if error.short and limit == len(self._buf) and not self._eof:
                raise NeedMore("SECTION_FULL", self.offset, MAX_DESCRIPTION) from None
            at = None if error.offset is None else self._base + error.offset
            raise MalformedError("SECTION_FULL", error.detail, at) from None
        data = bytes(self._buf[self._pos : self._pos + used])
        self._after_section()
        return self._emit(
            m.DeviceState(section.idstr, section.instance_id, data, decoded), used, section.idstr
        )

    def _device_description(self, section: Section) -> Any:
        from qmig.wire import vmstate

        offset = self.offset
        if self.vmdesc is None:
            found = find_trailing_vmdesc(self._storage, self._pos, len(self._buf))
            if found is None:
                if self._eof:
                    raise MalformedError(
                        "SECTION_FULL",
                        f"cannot delimit device section {section.idstr!r}: device sections "
                        "carry no length and the stream has no VMDESCRIPTION describing them",
                        offset,
                    )
                raise NeedMore("SECTION_FULL", offset, MAX_DESCRIPTION)
            try:
                self.vmdesc = vmstate.VmDescription.from_json(found)
            except vmstate.VmstateError as error:
                raise MalformedError("VMDESCRIPTION", error.detail, offset) from None
        description = self.vmdesc.find(section.idstr, section.instance_id)
        if description is None:
            raise MalformedError(
                "SECTION_FULL",
                f"no description for section {section.idstr!r} instance "
                f"{section.instance_id} in VMDESCRIPTION",
                offset,
            )
        return description

    # --- after EOF ------------------------------------------------------------------------

    def _read_after_eof(self) -> Record:
        kind = self._peek_byte()
        if kind != self.profile.section_types["VMDESCRIPTION"]:
            raise MalformedError(
                "stream", f"expected VMDESCRIPTION after EOF, got {kind:#04x}", self.offset
            )
        if self._pos + 5 > len(self._buf):
            raise NeedMore("VMDESCRIPTION", self.offset)
        length = int.from_bytes(self._buf[self._pos + 1 : self._pos + 5], "big")
        if length > MAX_DESCRIPTION:
            raise MalformedError(
                "VMDESCRIPTION",
                f"{length} bytes is more than qmig's {MAX_DESCRIPTION} limit",
                self.offset,
            )
        if self._pos + 5 + length > len(self._buf):
            raise NeedMore("VMDESCRIPTION", self.offset, MAX_DESCRIPTION + 5)
        description, size = self._parse("VMDESCRIPTION", self.schema.vmdescription, 5 + length)
        self._frame = Frame("end")
        return self._emit(description, size)


def find_trailing_vmdesc(buf: bytes | bytearray, start: int, end: int) -> bytes | None:
    """The JSON of a complete ``EOF, VMDESCRIPTION`` ending exactly at ``buf[end]``."""
    if end - start < 7 or buf[end - 1] != ord("}"):
        return None
    lowest = max(start + 1, end - MAX_DESCRIPTION - 5)
    at = buf.rfind(b"\x00\x06", lowest - 1, end)
    while at >= lowest - 1 and at >= start:
        length = int.from_bytes(buf[at + 2 : at + 6], "big")
        if at + 6 + length == end:
            text = bytes(buf[at + 6 : end])
            try:
                json.loads(text)
            except ValueError:
                return None
            return text
        at = buf.rfind(b"\x00\x06", lowest - 1, at)
    return None
