"""Construct building blocks shared by every schema: counted strings, checks that name
themselves, and the adapter that turns a Struct into one of :mod:`qmig.wire.messages`.

A failed check raises :class:`FieldError` carrying a readable detail (the words a user sees)
and the position of the field inside the bytes being parsed, so that the reader can report
an absolute byte offset.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import construct as cs
from construct.core import stream_tell

NAME_ENCODING = "latin-1"  # names are bytes on the wire; latin-1 round-trips every byte


class FieldError(Exception):
    """A field failed to parse: ``detail`` says why, ``position`` is where the field starts.

    ``short`` is true when the field ran out of bytes rather than holding a bad value; a
    reader that parsed from a partial buffer takes that as "need more data".
    """

    def __init__(self, detail: str, position: int, *, short: bool = False) -> None:
        super().__init__(detail)
        self.detail = detail
        self.position = position
        self.short = short


Message = str | Callable[[Any], str]


def _render(message: Message, context: Any) -> str:
    return message(context) if callable(message) else message


class Expect(cs.Subconstruct):
    """Parse ``subcon``; if it fails, raise :class:`FieldError` with ``message``."""

    def __init__(self, subcon: cs.Construct, message: Message) -> None:
        super().__init__(subcon)
        self.message = message

    def _parse(self, stream: Any, context: Any, path: str) -> Any:
        position = stream_tell(stream, path)
        try:
            return self.subcon._parsereport(stream, context, path)
        except FieldError:
            raise
        except cs.StreamError as error:
            raise FieldError(_render(self.message, context), position, short=True) from error
        except cs.ConstructError as error:
            raise FieldError(_render(self.message, context), position) from error


class Valid(Expect):
    """Parse ``subcon`` and check its value; ``message`` on a failed parse, ``invalid`` (a text,
    or a function of the value) when ``predicate`` refuses the value.

    Either way the error points at the field's first byte, where the fault is, not at whatever
    follows it (which may be past the end of the record).
    """

    def __init__(
        self,
        subcon: cs.Construct,
        message: Message,
        predicate: Callable[[Any], bool],
        invalid: str | Callable[[Any], str],
    ) -> None:
        super().__init__(subcon, message)
        self.predicate = predicate
        self.invalid = invalid

    def _parse(self, stream: Any, context: Any, path: str) -> Any:
        position = stream_tell(stream, path)
        value = super()._parse(stream, context, path)
        if not self.predicate(value):
            detail = self.invalid(value) if callable(self.invalid) else self.invalid
            raise FieldError(detail, position)
        return value


class NonEmpty(Expect):
    """A name QEMU refuses when empty: ``message`` on a failed parse, ``empty`` (by default
    the same) on an empty value, both at the name's length byte: an empty name may be the
    last byte of its record."""

    def __init__(
        self, subcon: cs.Construct, message: Message, empty: Message | None = None
    ) -> None:
        super().__init__(subcon, message)
        self.empty = message if empty is None else empty

    def _parse(self, stream: Any, context: Any, path: str) -> Any:
        position = stream_tell(stream, path)
        value = super()._parse(stream, context, path)
        if not value:
            raise FieldError(_render(self.empty, context), position)
        return value


class Require(cs.Construct):
    """A parse-time rule over fields already read; consumes nothing.

    Building never checks it: qmig must be able to build the invalid messages that fuzzers
    and tests send on purpose.
    """

    def __init__(self, predicate: Callable[[Any], bool], message: Message) -> None:
        super().__init__()
        self.predicate = predicate
        self.message = message
        self.flagbuildnone = True

    def _parse(self, stream: Any, context: Any, path: str) -> None:
        if not self.predicate(context):
            raise FieldError(_render(self.message, context), stream_tell(stream, path))

    def _build(self, obj: Any, stream: Any, context: Any, path: str) -> None:
        return None

    def _sizeof(self, context: Any, path: str) -> int:
        return 0


class Exhausted(cs.Construct):
    """The payload must be used up exactly (QEMU's fixed-length checks)."""

    def __init__(self, message: Message) -> None:
        super().__init__()
        self.message = message
        self.flagbuildnone = True

    def _parse(self, stream: Any, context: Any, path: str) -> None:
        position = stream_tell(stream, path)
        if stream.read(1):
            raise FieldError(_render(self.message, context), position)

    def _build(self, obj: Any, stream: Any, context: Any, path: str) -> None:
        return None

    def _sizeof(self, context: Any, path: str) -> int:
        return 0


def counted_string(length_field: cs.Construct = cs.Int8ub) -> cs.Construct:
    """QEMU's counted string: a length, then that many bytes, no terminator."""
    return cs.ExprAdapter(
        cs.Prefixed(length_field, cs.GreedyBytes),
        decoder=lambda raw, ctx: raw.decode(NAME_ENCODING),
        encoder=lambda text, ctx: text.encode(NAME_ENCODING),
    )


CountedName = counted_string()


class As(cs.Adapter):
    """Turn a parsed Struct into a message dataclass, and a dataclass back into a dict."""

    def __init__(self, cls: type, subcon: cs.Construct) -> None:
        super().__init__(subcon)
        self.cls = cls
        self.names = [field.name for field in dataclasses.fields(cls)]

    def _decode(self, obj: Any, context: Any, path: str) -> Any:
        values = {}
        for name in self.names:
            if name not in obj:
                continue  # a field carried elsewhere (RECV_BITMAP's bitmap): its default
            value = obj[name]
            values[name] = tuple(value) if isinstance(value, list) else value
        return self.cls(**values)

    def _encode(self, obj: Any, context: Any, path: str) -> Any:
        if isinstance(obj, dict):
            return obj
        return {name: getattr(obj, name) for name in self.names}


def empty(cls: type) -> cs.Construct:
    return cs.ExprAdapter(cs.Pass, decoder=lambda obj, ctx: cls(), encoder=lambda obj, ctx: None)
