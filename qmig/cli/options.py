"""The command line's shared vocabulary: value types, option spellings, help and error layout.

Every command builds its parser from these, so that one thing has one name everywhere
(``--connect URI`` for the peer, ``--dump-ram DIR`` for RAM written to a folder, ``SECONDS``
and ``MIB/S`` as placeholders), every option's help ends with its default, and a bad value
reads ``qmig: error: --opt: detail`` with exit status 1, like every other error.

Old spellings stay as hidden aliases (:func:`add_alias`): they parse, but help does not show
them. Only :mod:`argparse` is imported here: ``qmig --help`` must stay cheap.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NoReturn

from qmig.sizes import parse_size

EXIT_ERROR = 1

# argparse's own wording for a value its type function refused with ValueError.
_INVALID_VALUE = re.compile(r"invalid (\w+) value: (.*)")
_TYPE_WORDS = {"int": "not a whole number", "float": "not a number"}
_ARGUMENT = re.compile(r"argument ([^:]+): (.*)", re.DOTALL)


class HelpFormatter(argparse.HelpFormatter):
    """Help that ends each option with its default, unless the text already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if text is argparse.SUPPRESS or "default" in text or not action.option_strings:
            return text
        default = action.default
        if default is None or default is False or default == [] or action.nargs == 0:
            return text
        shown = f"{default:g}" if isinstance(default, float) else str(default)
        # argparse formats help with %: a literal % in the value must be doubled.
        return f"{text} (default: {shown.replace('%', '%%')})"


class Parser(argparse.ArgumentParser):
    """argparse with qmig's error line and hidden aliases of required options."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        # Required options that an alias may also set: argparse checks "required" per
        # spelling, so these are checked here, by value, after parsing (and marked required
        # only while help is written).
        self.aliased_required: list[argparse.Action] = []

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_ERROR, f"qmig: error: {self.one_line(message)}\n")

    def one_line(self, message: str) -> str:
        """argparse's message in qmig's grammar: ``--opt: detail`` or ``command: detail``."""
        message = " ".join(message.split())
        match = _ARGUMENT.fullmatch(message)
        if match is None:
            command = self.prog.removeprefix("qmig").strip()
            return f"{command}: {message}" if command else message
        what, detail = match.group(1).split("/")[0], match.group(2)
        detail = detail.replace("not allowed with argument ", "not allowed with ")
        invalid = _INVALID_VALUE.fullmatch(detail)
        if invalid is not None:
            kind = _TYPE_WORDS.get(invalid.group(1), f"not a valid {invalid.group(1)}")
            detail = f"{kind}: {invalid.group(2)}"
        return f"{what}: {detail}"

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, extras = super().parse_known_args(args, namespace)
        missing = [
            a.option_strings[0] for a in self.aliased_required if getattr(parsed, a.dest) is None
        ]
        if missing:
            self.error(f"the following arguments are required: {', '.join(missing)}")
        return parsed, extras

    def format_usage(self) -> str:
        with self._required_shown():
            return super().format_usage()

    def format_help(self) -> str:
        with self._required_shown():
            return super().format_help()

    @contextmanager
    def _required_shown(self) -> Iterator[None]:
        for action in self.aliased_required:
            action.required = True
        try:
            yield
        finally:
            for action in self.aliased_required:
                action.required = False


def add_alias(parser: argparse.ArgumentParser, old: str, canonical: argparse.Action) -> None:
    """Accept ``old`` as a hidden spelling of ``canonical`` (same value, same checks)."""
    parser.add_argument(
        old,
        dest=canonical.dest,
        type=canonical.type or str,
        metavar=canonical.metavar,
        help=argparse.SUPPRESS,
    )
    if canonical.required and isinstance(parser, Parser):
        canonical.required = False
        parser.aliased_required.append(canonical)


def _type(name: str, convert: Callable[[str], Any]) -> Callable[[str], Any]:
    """A value type whose refusal becomes ``--opt: detail`` (its name shows in no message)."""

    def parse(text: str) -> Any:
        try:
            return convert(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    parse.__name__ = name
    return parse


def _size(text: str) -> int:
    size = parse_size(text)
    if size <= 0:
        raise ValueError(f"must be positive, not {text}")
    return size


def _buffer_size(text: str) -> int | None:
    """A socket buffer's size, or ``auto``: the kernel's autotuning (None)."""
    return None if text == "auto" else _size(text)


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise ValueError(f"must be 0 or more, not {value}")
    return value


def _positive_count(text: str) -> int:
    value = _count(text)
    if value == 0:
        raise ValueError(f"must be at least 1, not {value}")
    return value


def _finite(text: str, noun: str, *, zero: bool) -> float:
    """A finite number, more than 0 (or 0 or more, with ``zero``); ``noun`` names it."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"not {noun}: {text!r}") from None
    if not (value >= 0 if zero else value > 0) or value == float("inf"):  # NaN fails both
        raise ValueError(f"must be {'0 or more' if zero else 'positive'}, not {text}")
    return value


def _seconds(text: str) -> float:
    return _finite(text, "a number of seconds", zero=False)


def _rate(text: str) -> float:
    return _finite(text, "a number", zero=False)


def _rate_or_zero(text: str) -> float:
    return _finite(text, "a number", zero=True)


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"not a whole number: {text!r}") from None


size = _type("size", _size)  # bytes, more than 0: 4096, 64K, 2M, 1G
buffer_size = _type("buffer_size", _buffer_size)  # a size, or auto (the kernel's autotuning)
count = _type("count", _count)  # a whole number, 0 or more
positive_count = _type("positive_count", _positive_count)  # a whole number, 1 or more
seconds = _type("seconds", _seconds)  # a positive number of seconds
rate = _type("rate", _rate)  # a positive number (per second)
rate_or_zero = _type("rate_or_zero", _rate_or_zero)  # 0 or more per second (0: none at all)
integer = _type("integer", _integer)  # any whole number (seeds)


def add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json", action="store_true", help="print one JSON document on stdout instead"
    )


def add_fast_answer(parser: argparse.ArgumentParser) -> None:
    """The source's C answer thread, on by default (simulate and replay)."""
    parser.add_argument(
        "--no-fast-answer",
        action="store_true",
        help="answer page requests from the source's Python loop instead of the C thread "
        "that reads the return path (default: the C thread, on the main channel, or on the "
        "preempt channel with the 8.0 preempt variant)",
    )
    parser.add_argument(
        "--no-fast-sweep",
        action="store_true",
        help="build postcopy's background pages in the source's Python loop instead of "
        "writing them from C beside the C answer thread (default: from C)",
    )


def add_bandwidth(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--bandwidth",
        type=rate,
        metavar="MIB/S",
        help="cap the stream at this many MiB/s (default: unlimited)",
    )


def print_error(message: str) -> int:
    print(f"qmig: error: {message}", file=sys.stderr)
    return EXIT_ERROR
