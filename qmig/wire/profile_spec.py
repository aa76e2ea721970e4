"""Reading a parsed TOML profile key by key, so that every mistake is one line.

A :class:`Table` hands out the values of one TOML table by type (an int in a range, a bool, one
of a ``Literal``'s strings, a nested table...) and remembers which keys were taken; ``close()``
(or leaving its ``with`` block) then refuses whatever was not, so a misspelt or stale key fails
the load instead of being ignored. Every error is a :class:`~qmig.errors.QmigError` naming the
file and the dotted key::

    formats/qemu-7.2.toml: ram.request_range_check: 'last-bite' is not one of 'last-byte', 'end'
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, get_args

from qmig.errors import QmigError

_MISSING = object()


class Table:
    """One TOML table of a profile file, at a dotted ``path`` in ``source``."""

    def __init__(self, data: Any, source: str, path: str = "") -> None:
        self.source = source
        self.path = path
        if not isinstance(data, dict):
            self.fail(f"expected a table, got {_describe(data)}")
        self.data: dict[str, Any] = data
        self.taken: set[str] = set()

    def __enter__(self) -> Table:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_rest: object) -> None:
        if kind is None:
            self.close()

    # --- errors ------------------------------------------------------------------------------

    def where(self, key: str | None = None) -> str:
        if key is None:
            return self.path or "(top level)"
        return f"{self.path}.{key}" if self.path else key

    def fail(self, detail: str, key: str | None = None) -> None:
        raise QmigError(self.source, f"{self.where(key)}: {detail}")

    # --- values ------------------------------------------------------------------------------

    def _take(self, key: str, default: Any = _MISSING) -> Any:
        self.taken.add(key)
        if key in self.data:
            return self.data[key]
        if default is _MISSING:
            self.fail("missing", key)
        return default

    def has(self, key: str) -> bool:
        return key in self.data

    def integer(self, key: str, low: int, high: int, default: Any = _MISSING) -> Any:
        value = self._take(key, default)
        if value is default and default is not _MISSING:
            return value
        return self.check_integer(value, low, high, key)

    def check_integer(self, value: Any, low: int, high: int, key: str) -> int:
        # TOML booleans arrive as Python bools, which are ints too: not what a number means.
        if not isinstance(value, int) or isinstance(value, bool):
            self.fail(f"expected an integer, got {_describe(value)}", key)
        if not low <= value <= high:
            self.fail(f"{value} is out of range {low}..{high}", key)
        return int(value)

    def integers(self, key: str, low: int, high: int) -> tuple[int, ...]:
        value = self._take(key)
        if not isinstance(value, list):
            self.fail(f"expected a list of integers, got {_describe(value)}", key)
        return tuple(
            self.check_integer(item, low, high, f"{key}[{i}]") for i, item in enumerate(value)
        )

    def boolean(self, key: str) -> bool:
        value = self._take(key)
        if not isinstance(value, bool):
            self.fail(f"expected true or false, got {_describe(value)}", key)
        return bool(value)

    def string(self, key: str) -> str:
        value = self._take(key)
        if not isinstance(value, str) or not value:
            self.fail(f"expected a non-empty string, got {_describe(value)}", key)
        return str(value)

    def strings(self, key: str, allowed: tuple[str, ...] | None = None) -> tuple[str, ...]:
        value = self._take(key)
        if not isinstance(value, list):
            self.fail(f"expected a list of strings, got {_describe(value)}", key)
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item:
                self.fail(f"expected a non-empty string, got {_describe(item)}", f"{key}[{i}]")
            if allowed is not None and item not in allowed:
                self.fail(f"{item!r} is not one of {_choices(allowed)}", f"{key}[{i}]")
        return tuple(value)

    def choice(self, key: str, kind: Any) -> Any:
        """One of the strings of the ``Literal`` type ``kind`` (what the code that reads the
        rule knows how to apply)."""
        allowed: tuple[str, ...] = get_args(kind)
        value = self._take(key)
        if value not in allowed:
            self.fail(f"{value!r} is not one of {_choices(allowed)}", key)
        return value

    def table(self, key: str) -> Table:
        return Table(self._take(key), self.source, self.where(key))

    def optional_table(self, key: str) -> Table | None:
        value = self._take(key, None)
        return None if value is None else Table(value, self.source, self.where(key))

    def entries(self) -> Iterator[tuple[str, Any]]:
        """Every key of a table whose keys are names (commands, flags): all taken."""
        self.taken.update(self.data)
        yield from self.data.items()

    def close(self) -> None:
        unknown = sorted(set(self.data) - self.taken)
        if unknown:
            self.fail("unknown key", unknown[0])


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def _choices(allowed: tuple[str, ...]) -> str:
    return ", ".join(repr(name) for name in allowed)
