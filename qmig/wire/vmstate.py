"""Device state inside SECTION_FULL payloads, delimited and decoded with the stream's VMDESCRIPTION.

A device section has no length prefix, so the only way to find where its payload ends is to
walk its fields. A precopy stream ends with ``EOF``, then ``0x06``, ``be32 length`` and a JSON
description of every device section, written while the devices were being saved: its sizes
and array lengths are those of this very stream. :class:`VmDescription` parses that JSON into
frozen descriptions; :func:`decode_device` walks one payload with one of them.

What the walk relies on (checked against streams of QEMU 7.2):

* A field entry's ``size`` is the number of bytes one element took on the wire, measured while
  writing. Any type, even one this module does not interpret, can therefore be stepped over
  by its size. For structs the size includes the struct's subsections.
* An array whose elements all look alike is described once, with ``array_len``; otherwise each
  element has an entry of its own, with ``index``. An array of one element is described like
  a plain field, and an empty array not at all.
* Nested layouts appear under ``struct``, or for some types (``tmp``) as ``vmsd_name``,
  ``version`` and ``fields`` inside the field entry itself.
* A description lists only the subsections that were saved, in wire order.

The decoded tree mirrors QEMU's analyze-migration dump: a dict per struct keyed by field name;
arrays as lists; fields sharing a name gathered into one list in wire order; a subsection as
a dict under its own name (``"cpu/async_pf_msr"``) in its parent's dict. Integers are ints
(signed types signed), ``bool`` is bool, ``float64`` is float, a NULL-pointer placeholder is
None, and everything else is a hex string of its bytes.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeAlias

from qmig.errors import MalformedError

Buffer: TypeAlias = bytes | bytearray | memoryview
LeafDecoder: TypeAlias = Callable[[Buffer, int, int], object]

SUBSECTION_MARKER = 0x05
NULL_POINTER_PLACEHOLDER = 0x30  # QEMU writes the character '0' in place of a NULL element

# Bounds on what a VMDESCRIPTION can make qmig do. A description is sent by the peer: a field
# of 0 bytes repeated 2^40 times holds nothing but would take 2^40 values to decode, and
# nesting would take as many stack frames. QEMU's own descriptions nest a handful of levels
# and a pc machine's devices decode to a few thousand values.
MAX_DEPTH = 32  # structs and subsections inside one another
MAX_VALUES = 1 << 20  # decoded values per device (each element of each array counts one)
ZERO_SIZE_ALLOWANCE = 1 << 12  # values beyond the payload's bytes (elements of 0 bytes)
RAW_BYTES_PER_VALUE = 16  # an undecoded field counts one value per this many bytes

__all__ = [
    "DeviceDescription",
    "FieldDescription",
    "StructDescription",
    "VmDescription",
    "VmstateError",
    "decode_device",
]


class VmstateError(MalformedError):
    """A VMDESCRIPTION that cannot be parsed, or a payload that does not match it.

    ``offset`` is the absolute position in the decoded buffer of the field (or subsection
    header) at fault; None for errors in the JSON itself. ``short`` is true when the payload
    ran out of bytes rather than holding something inconsistent, so a reader that decoded a
    partial buffer knows that more data could help.
    """

    def __init__(
        self,
        detail: str,
        offset: int | None = None,
        *,
        what: str = "VMDESCRIPTION",
        short: bool = False,
    ) -> None:
        self.short = short
        super().__init__(what, detail, offset)


# --- descriptions --------------------------------------------------------------------------


@dataclass(frozen=True)
class StructDescription:
    """A vmsd: the fields of a device, struct, or subsection, then its saved subsections."""

    vmsd_name: str
    version: int | None
    fields: tuple[FieldDescription, ...]
    subsections: tuple[StructDescription, ...] = ()


@dataclass(frozen=True)
class FieldDescription:
    """One field entry: ``array_len`` elements (or one) of ``size`` bytes each."""

    name: str
    type: str
    size: int
    array_len: int | None = None
    index: int | None = None
    layout: StructDescription | None = None  # set for structs and other nested vmsds
    _leaf: LeafDecoder | None = field(init=False, repr=False, compare=False)
    _array_code: str | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        """Pick the decoder once; raises ValueError when ``size`` cannot hold ``type``."""
        leaf = None if self.layout is not None else _leaf_decoder(self.type, self.size)
        object.__setattr__(self, "_leaf", leaf)
        object.__setattr__(self, "_array_code", _array_code(self.type, self.size) if leaf else None)

    @property
    def count(self) -> int:
        return 1 if self.array_len is None else self.array_len

    @property
    def wire_size(self) -> int:
        return self.count * self.size


@dataclass(frozen=True)
class DeviceDescription:
    """One entry of ``devices``: the section it describes and the layout of its payload."""

    name: str
    instance_id: int
    state: StructDescription
    size: int | None = None  # only given for devices saved without a vmsd

    @property
    def vmsd_name(self) -> str:
        return self.state.vmsd_name

    @property
    def version(self) -> int | None:
        return self.state.version

    @property
    def fields(self) -> tuple[FieldDescription, ...]:
        return self.state.fields

    @property
    def subsections(self) -> tuple[StructDescription, ...]:
        return self.state.subsections


class VmDescription:
    """The parsed VMDESCRIPTION JSON."""

    def __init__(
        self,
        page_size: int | None,
        devices: list[DeviceDescription],
        configuration: StructDescription | None = None,
    ) -> None:
        self.page_size = page_size
        self.devices = devices
        self.configuration = configuration
        self._by_section: dict[tuple[str, int], DeviceDescription] = {}
        for device in devices:
            self._by_section.setdefault((device.name, device.instance_id), device)

    @classmethod
    def from_json(cls, data: bytes) -> VmDescription:
        """Parse the JSON body of a VMDESCRIPTION record (without its 0x06 and length)."""
        try:
            document = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise VmstateError(f"JSON does not parse: {error}") from error
        except RecursionError:
            raise VmstateError("JSON nested too deeply to parse") from None
        if not isinstance(document, dict):
            raise VmstateError("JSON is not an object")
        page_size = _optional_int(document, "page_size", "JSON")
        devices = _require_list(document, "devices", "JSON")
        parsed = [_parse_device(entry, number) for number, entry in enumerate(devices)]
        return cls(page_size, parsed, _parse_configuration(document.get("configuration")))

    def find(self, idstr: str, instance_id: int) -> DeviceDescription | None:
        return self._by_section.get((idstr, instance_id))

    def require(self, idstr: str, instance_id: int, offset: int | None = None) -> DeviceDescription:
        """Like :meth:`find`, but a section without a description is an error."""
        device = self.find(idstr, instance_id)
        if device is None:
            raise VmstateError(
                f"no description for section {idstr!r} instance {instance_id} in VMDESCRIPTION",
                offset,
            )
        return device


# --- JSON shapes -----------------------------------------------------------------------------


def _require_count(raw: Mapping[str, object], key: str, where: str) -> int:
    value = raw.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise VmstateError(f"{where}: {key!r} must be a non-negative integer, got {value!r}")
    return value


def _optional_int(raw: Mapping[str, object], key: str, where: str) -> int | None:
    return None if raw.get(key) is None else _require_count(raw, key, where)


def _require_str(raw: Mapping[str, object], key: str, where: str) -> str:
    value = raw.get(key)
    if not isinstance(value, str):
        raise VmstateError(f"{where}: {key!r} must be a string, got {value!r}")
    return value


def _require_list(raw: Mapping[str, object], key: str, where: str) -> list[object]:
    value = raw.get(key)
    if not isinstance(value, list):
        raise VmstateError(f"{where}: {key!r} must be a list, got {value!r}")
    return value


def _parse_device(raw: object, number: int) -> DeviceDescription:
    where = f"device #{number}"
    if not isinstance(raw, dict):
        raise VmstateError(f"{where} is not an object")
    name = _require_str(raw, "name", where)
    where = f"device #{number} ({name!r})"
    instance_id = _require_count(raw, "instance_id", where)
    size = _optional_int(raw, "size", where)
    return DeviceDescription(name, instance_id, _parse_struct(raw, where, 0), size)


def _parse_configuration(raw: object) -> StructDescription | None:
    # Only newer QEMUs describe the CONFIGURATION section; its absence is normal.
    if not isinstance(raw, dict) or "fields" not in raw:
        return None
    return _parse_struct(raw, "configuration", 0)


def _parse_struct(raw: Mapping[str, object], where: str, depth: int) -> StructDescription:
    if depth > MAX_DEPTH:
        raise VmstateError(f"{where}: structs nested more than {MAX_DEPTH} deep")
    vmsd_name = raw.get("vmsd_name", "")
    if not isinstance(vmsd_name, str):
        raise VmstateError(f"{where}: 'vmsd_name' must be a string, got {vmsd_name!r}")
    version = _optional_int(raw, "version", where)
    fields = _require_list(raw, "fields", where)
    subsections = _require_list(raw, "subsections", where) if "subsections" in raw else []
    return StructDescription(
        vmsd_name,
        version,
        tuple(_parse_field(entry, where, depth) for entry in fields),
        tuple(_parse_subsection(entry, where, depth) for entry in subsections),
    )


def _parse_subsection(raw: object, where: str, depth: int) -> StructDescription:
    if not isinstance(raw, dict):
        raise VmstateError(f"{where}: a subsection is not an object: {raw!r}")
    name = raw.get("vmsd_name")
    if not isinstance(name, str) or not name:
        raise VmstateError(f"{where}: a subsection has no 'vmsd_name'")
    return _parse_struct(raw, f"{where} subsection {name!r}", depth + 1)


def _parse_field(raw: object, parent: str, depth: int) -> FieldDescription:
    if not isinstance(raw, dict):
        raise VmstateError(f"{parent}: a field is not an object: {raw!r}")
    name = _require_str(raw, "name", parent)
    where = f"{parent} field {name!r}"
    kind = _require_str(raw, "type", where)
    size = _require_count(raw, "size", where)
    array_len = _optional_int(raw, "array_len", where)
    index = _optional_int(raw, "index", where)
    if array_len is not None and index is not None:
        raise VmstateError(f"{where}: has both 'array_len' and 'index'")
    layout = _nested_layout(raw, where, size, depth)
    try:
        return FieldDescription(name, kind, size, array_len, index, layout)
    except ValueError as error:
        raise VmstateError(f"{where}: {error}") from None


def _nested_layout(
    raw: Mapping[str, object], where: str, size: int, depth: int
) -> StructDescription | None:
    nested = raw.get("struct")
    if nested is not None:
        if not isinstance(nested, dict):
            raise VmstateError(f"{where}: 'struct' must be an object, got {nested!r}")
        if "fields" not in nested and size == 1:
            return None  # a NULL element of a pointer array: QEMU opened the struct, wrote '0'
        return _parse_struct(nested, where, depth + 1)
    if "fields" in raw:
        return _parse_struct(raw, where, depth + 1)  # "tmp" and others inline their vmsd
    return None


# --- leaf types ------------------------------------------------------------------------------

_INTEGER_TYPES: dict[str, tuple[int, bool]] = {
    "int8": (1, True),
    "int16": (2, True),
    "int32": (4, True),
    "int64": (8, True),
    "uint8": (1, False),
    "uint16": (2, False),
    "uint32": (4, False),
    "uint64": (8, False),
    # "equal" and "le" (less or equal) only change how the destination checks the value.
    "int32 equal": (4, True),
    "int32 le": (4, True),
    "int64 equal": (8, True),
    "uint8 equal": (1, False),
    "uint16 equal": (2, False),
    "uint32 equal": (4, False),
    "uint64 equal": (8, False),
    "timer": (8, True),  # expiry time in ns, -1 when not armed
}
_FLOAT_TYPES = frozenset({"float64", "cpu_double"})
_STRUCT_CODES = {
    (1, True): "b",
    (1, False): "B",
    (2, True): "h",
    (2, False): "H",
    (4, True): "i",
    (4, False): "I",
    (8, True): "q",
    (8, False): "Q",
}


class _Failure(Exception):
    """A decoding failure on its way out; each level it crosses adds where it happened."""

    def __init__(self, reason: str, offset: int, *, short: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.offset = offset
        self.short = short
        self.path: list[tuple[str, str | int]] = []  # innermost first

    def within(self, kind: str, label: str | int) -> _Failure:
        self.path.append((kind, label))
        return self


def _leaf_decoder(kind: str, size: int) -> LeafDecoder:
    natural = _natural_size(kind)
    if natural is not None and size != natural:
        if size == 1:
            return _decode_null_pointer  # a NULL element of a pointer array keeps its type
        raise ValueError(f"type {kind!r} is {natural} bytes, description says {size}")
    if kind in _INTEGER_TYPES:
        return _integer_decoder(*_INTEGER_TYPES[kind])
    if kind == "bool":
        return _decode_bool
    if kind in _FLOAT_TYPES:
        return _decode_float
    if kind == "nullptr":
        return _decode_null_pointer
    if kind == "capability":
        if size < 1:
            raise ValueError("a capability needs at least its length byte")
        return _decode_capability
    return _decode_raw


def _natural_size(kind: str) -> int | None:
    if kind in _INTEGER_TYPES:
        return _INTEGER_TYPES[kind][0]
    if kind in ("bool", "nullptr"):
        return 1
    if kind in _FLOAT_TYPES:
        return 8
    return None


def _array_code(kind: str, size: int) -> str | None:
    """The struct-module code that unpacks a whole array of this type in one call."""
    integer = _INTEGER_TYPES.get(kind)
    if integer is None or integer[0] != size:
        return None
    return _STRUCT_CODES[size, integer[1]]


def _integer_decoder(size: int, signed: bool) -> LeafDecoder:
    unpack = struct.Struct(">" + _STRUCT_CODES[size, signed]).unpack_from

    def decode(data: Buffer, pos: int, _size: int) -> object:
        return unpack(data, pos)[0]

    return decode


def _decode_bool(data: Buffer, pos: int, _size: int) -> object:
    return data[pos] != 0


def _decode_float(data: Buffer, pos: int, _size: int) -> object:
    return struct.unpack_from(">d", data, pos)[0]


def _decode_null_pointer(data: Buffer, pos: int, _size: int) -> object:
    if data[pos] != NULL_POINTER_PLACEHOLDER:
        raise _Failure(f"expected the NULL-pointer placeholder 0x30, found 0x{data[pos]:02x}", pos)
    return None


def _decode_capability(data: Buffer, pos: int, size: int) -> object:
    if data[pos] != size - 1:
        raise _Failure(f"capability name length {data[pos]}, description says {size - 1}", pos)
    return bytes(data[pos + 1 : pos + size]).decode("latin-1")


def _decode_raw(data: Buffer, pos: int, size: int) -> object:
    return data[pos : pos + size].hex()


# --- decoding --------------------------------------------------------------------------------


def decode_device(
    desc: DeviceDescription, data: Buffer, pos: int, end: int
) -> tuple[int, dict[str, object]]:
    """Decode the payload of device ``desc`` at ``data[pos:end]``; return (bytes used, tree).

    Never reads at or past ``end``. Raises :class:`VmstateError` naming the device and field
    when the bytes run out or do not match the description.
    """
    end = min(end, len(data))
    if not 0 <= pos <= end:
        raise VmstateError(
            f"device {desc.name!r}: payload start {pos} outside 0..{end}", pos, what="SECTION_FULL"
        )
    budget = _Budget(end - pos)
    try:
        next_pos, tree = _decode_struct(desc.state, data, pos, end, budget)
        if desc.size is not None and next_pos - pos != desc.size:
            raise _Failure(f"payload is {next_pos - pos} bytes, description says {desc.size}", pos)
    except _Failure as failure:
        raise VmstateError(
            f"device {desc.name!r}{_render_path(failure.path)}: {failure.reason}",
            failure.offset,
            what="SECTION_FULL",
            short=failure.short,
        ) from None
    return next_pos - pos, tree


class _Budget:
    """What is left of one device's decoding bounds: values to produce, levels to enter."""

    def __init__(self, payload: int) -> None:
        self.payload = payload  # bytes the payload can hold at most
        self.limit = min(MAX_VALUES, 4 * payload + ZERO_SIZE_ALLOWANCE)
        self.values = self.limit
        self.depth = -1  # the device itself is level 0, as in the description

    def spend(self, entry: FieldDescription, pos: int) -> None:
        per_element = 1
        if entry.layout is None and entry._array_code is None:
            per_element += entry.size // RAW_BYTES_PER_VALUE
        cost = entry.count * per_element
        if cost > self.values:
            raise _Failure(
                f"{entry.count} elements of {entry.size} bytes: more than the {self.limit} "
                f"values qmig decodes from a payload of at most {self.payload} bytes",
                pos,
            )
        self.values -= cost

    def enter(self, pos: int) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _Failure(f"structs nested more than {MAX_DEPTH} deep", pos)


def _decode_struct(
    desc: StructDescription, data: Buffer, pos: int, end: int, budget: _Budget
) -> tuple[int, dict[str, object]]:
    budget.enter(pos)
    tree: dict[str, object] = {}
    for entry in desc.fields:
        try:
            pos = _decode_field(entry, data, pos, end, tree, budget)
        except _Failure as failure:
            raise failure.within("field", entry.name) from None
    for subsection in desc.subsections:
        try:
            pos, value = _decode_subsection(subsection, data, pos, end, budget)
        except _Failure as failure:
            raise failure.within("subsection", subsection.vmsd_name) from None
        key = subsection.vmsd_name
        tree[key if key not in tree else f"{key} (subsection)"] = value
    budget.depth -= 1
    return pos, tree


def _decode_field(
    entry: FieldDescription,
    data: Buffer,
    pos: int,
    end: int,
    tree: dict[str, object],
    budget: _Budget,
) -> int:
    needed = entry.wire_size
    if needed > end - pos:
        failure = _Failure(f"needs {needed} bytes, {end - pos} left", pos, short=True)
        raise failure if entry.index is None else failure.within("element", entry.index)
    budget.spend(entry, pos)
    if entry.layout is not None:
        value = _decode_struct_elements(entry, entry.layout, data, pos, end, budget)
    else:
        value = _decode_leaf_elements(entry, data, pos)
    _store(tree, entry, value)
    return pos + needed


def _decode_leaf_elements(entry: FieldDescription, data: Buffer, pos: int) -> object:
    leaf = entry._leaf
    assert leaf is not None
    if entry.array_len is None:
        return leaf(data, pos, entry.size)
    if entry._array_code is not None:
        return list(struct.unpack_from(f">{entry.array_len}{entry._array_code}", data, pos))
    size = entry.size
    return [leaf(data, pos + i * size, size) for i in range(entry.array_len)]


def _decode_struct_elements(
    entry: FieldDescription,
    layout: StructDescription,
    data: Buffer,
    pos: int,
    end: int,
    budget: _Budget,
) -> object:
    elements: list[object] = []
    for number in range(entry.count):
        try:
            next_pos, value = _decode_struct(layout, data, pos, end, budget)
            if next_pos - pos != entry.size:
                raise _Failure(
                    f"struct {layout.vmsd_name!r} took {next_pos - pos} bytes,"
                    f" description says {entry.size}",
                    pos,
                )
        except _Failure as failure:
            if entry.array_len is not None:
                failure.within("element", number)
            elif entry.index is not None:
                failure.within("element", entry.index)
            raise
        elements.append(value)
        pos = next_pos
    return elements if entry.array_len is not None else elements[0]


def _decode_subsection(
    desc: StructDescription, data: Buffer, pos: int, end: int, budget: _Budget
) -> tuple[int, dict[str, object]]:
    if pos < end and data[pos] != SUBSECTION_MARKER:
        raise _Failure(f"expected a subsection (0x05), found 0x{data[pos]:02x}", pos)
    name_length = data[pos + 1] if pos + 2 <= end else 0
    header_end = pos + 2 + name_length + 4
    if header_end > end:
        raise _Failure(
            f"subsection header needs {header_end - pos} bytes, {end - pos} left", pos, short=True
        )
    name = bytes(data[pos + 2 : pos + 2 + name_length]).decode("latin-1")
    if name != desc.vmsd_name:
        raise _Failure(f"found subsection {name!r} on the wire", pos + 1)
    version = int.from_bytes(data[header_end - 4 : header_end], "big")
    if desc.version is not None and version != desc.version:
        raise _Failure(f"version {version} on the wire, description says {desc.version}", pos)
    return _decode_struct(desc, data, header_end, end, budget)


def _store(tree: dict[str, object], entry: FieldDescription, value: object) -> None:
    # Several entries may share a name (unrolled arrays, repeated "unused" padding); like
    # QEMU's analyze-migration dump, gather them into one list in wire order.
    name = entry.name
    if entry.array_len is not None:
        assert isinstance(value, list)
        elements = value
    elif entry.index is not None:
        elements = [value]
    elif name not in tree:
        tree[name] = value
        return
    else:
        elements = [value]
    existing = tree.get(name, _MISSING)
    if existing is _MISSING:
        tree[name] = elements
    elif isinstance(existing, list):
        existing.extend(elements)
    else:
        tree[name] = [existing, *elements]


_MISSING = object()


def _render_path(path: list[tuple[str, str | int]]) -> str:
    """Turn an innermost-first path into "field 'a.b[2].c' subsection 'x' field 'y'"."""
    clauses: list[list[str]] = []
    for kind, label in reversed(path):
        if kind == "element":
            clauses[-1][1] += f"[{label}]"
        elif kind == "field" and clauses and clauses[-1][0] == "field":
            clauses[-1][1] += f".{label}"
        else:
            clauses.append([kind, str(label)])
    return "".join(f" {kind} {label!r}" for kind, label in clauses)
