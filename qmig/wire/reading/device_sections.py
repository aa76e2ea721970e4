"""Device sections and what follows EOF: the VMDESCRIPTION that says how to read them.

A device's SECTION_FULL carries no length. Outside PACKAGED its end is found by decoding it
with its VMDESCRIPTION entry (:mod:`qmig.wire.vmstate`), the JSON a precopy stream ends with;
inside PACKAGED the blob's length bounds it, and its footer delimits it.
"""

from __future__ import annotations

from typing import Any

from qmig.errors import MalformedError
from qmig.wire import messages as m
from qmig.wire.reading.framing import Frame, FramedInput, Mode, Section
from qmig.wire.reading.records import NeedMore, Record
from qmig.wire.schema import Schema

# The largest VMDESCRIPTION, and device state waiting for it, that qmig buffers: QEMU 7.2's
# pc machine sends 12 KiB of device state and 99 KiB of JSON. The unread tail is copied as it
# grows, so memory peaks near twice this (64 MiB let a stream cost 424 MB before refusal).
MAX_DESCRIPTION = 8 << 20


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
        footer = self.schema.build_footer(section.section_id)
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
            if self._starts_record(at + len(footer), package_end):
                return at - self._pos
            at += 1

    def _starts_record(self, at: int, package_end: int) -> bool:
        if at == package_end:
            return True
        schema, types = self.schema, self.profile.section_types
        kind = self._buf[at]
        head = schema.command_header_size
        if kind == types["COMMAND"] and at + head <= package_end:
            header = schema.command_header.parse(bytes(self._buf[at : at + head]))
            name = self.profile.command_names.get(header.cmd)
            return (
                name is not None
                and self.profile.command_lengths[name].allows(header.len)
                and at + head + header.len <= package_end
            )
        # A full section header: its id, then a counted idstr of printable ASCII.
        name_at = at + schema.short_section_header_size
        if kind in (types["SECTION_FULL"], types["SECTION_START"]) and name_at < package_end:
            name_len = self._buf[name_at]
            end = at + schema.full_section_header_size + name_len
            if name_len == 0 or end > package_end:
                return False
            idstr_at = name_at + schema.name_length_size
            return all(0x20 < byte < 0x7F for byte in self._buf[idstr_at : idstr_at + name_len])
        if kind == types["EOF"]:
            return at + schema.section_type_size == package_end
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
            found = find_trailing_vmdesc(self._storage, self._pos, len(self._buf), self.schema)
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
                if not self._eof:
                    # Device bytes that merely look like a VMDESCRIPTION ending where this
                    # read ended: the stream's own may come later, so only one found at the
                    # end of the input is bad, whatever the reads' sizes.
                    raise NeedMore("SECTION_FULL", offset, MAX_DESCRIPTION) from None
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
        head = self.schema.vmdescription_head_size
        if self._pos + head > len(self._buf):
            raise NeedMore("VMDESCRIPTION", self.offset)
        length_at = self._pos + self.schema.section_type_size
        length = int.from_bytes(self._buf[length_at : self._pos + head], "big")
        if length > MAX_DESCRIPTION:
            raise MalformedError(
                "VMDESCRIPTION",
                f"{length} bytes is more than qmig's {MAX_DESCRIPTION} limit",
                self.offset,
            )
        if self._pos + head + length > len(self._buf):
            raise NeedMore("VMDESCRIPTION", self.offset, MAX_DESCRIPTION + head)
        description, size = self._parse("VMDESCRIPTION", self.schema.vmdescription, head + length)
        self._frame = Frame(Mode.END)
        return self._emit(description, size)


def find_trailing_vmdesc(
    buf: bytes | bytearray, start: int, end: int, schema: Schema
) -> bytes | None:
    """The JSON of a complete ``EOF, VMDESCRIPTION`` ending exactly at ``buf[end]``, found by
    its framing alone: whether the JSON is good is :meth:`VmDescription.from_json`'s to say,
    so that a bad one is reported as a bad one, not as a missing one.

    JSON text never holds the EOF byte (0x00 in every profile), so the last such byte before
    ``end`` is the EOF itself or one of the length bytes after it: only a few positions can
    start the record, and finding them costs one backward scan, however the JSON is made.
    """
    marker = schema.vmdescription_marker  # EOF, VMDESCRIPTION
    head = len(marker) + schema.vmdescription_length_size  # then the JSON
    last = buf.rfind(marker[:1], start, end)
    for at in range(last, max(start, last - head + 1) - 1, -1):
        if at < 0 or at + head > end or buf[at : at + len(marker)] != marker:
            continue
        length = int.from_bytes(buf[at + len(marker) : at + head], "big")
        if at + head + length == end and length <= MAX_DESCRIPTION:
            return bytes(buf[at + head : end])
    return None
