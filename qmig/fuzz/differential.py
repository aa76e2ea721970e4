"""Differential fuzzing: the same bytes to a real QEMU destination and to qmig's.

Each case is a command sequence behind the stream opening a QEMU 7.2 ``pc-i440fx-7.2``
source sends (header, CONFIGURATION, the ``ram`` SECTION_START whose MEM_SIZE list names the
RAMBlocks of a 64 MiB ``-nodefaults`` pc guest, as in ``fixtures/postcopy-tcp``). Each case
goes to a fresh ``qemu-system-x86_64 -incoming`` of the ``--qemu-version`` asked for
(:func:`qmig.qemu.machine.qemu_install`), started with the machine type the stream's
CONFIGURATION names (postcopy-ram on; a QEMU destination exits when an incoming load fails),
and to :class:`~qmig.protocol.destination.Destination` with the same ``--qemu-version``.
The verdicts are classified alike:

* ``accepted``: the load went through (QEMU: query-migrate ``completed``);
* ``rejected NAME``: the load failed at a command (or ``RAM``, or ``unknown command``),
  named as QEMU names it without ``MIG_CMD_``; for QEMU, read from its error line;
* ``end of stream``: the load failed only because the input ended (QEMU reports an I/O
  error with no command);
* ``crashed``: QEMU died of a signal.

A disagreement is a finding unless a QEMU quirk in the version's ``[quirks]`` table
(``formats/qemu-*.toml``, explained in ``formats/quirks.md``) names this case's
construct and allows exactly the two verdicts seen.
"""

from __future__ import annotations

import argparse
import json
import lzma
import random
import re
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qmig.errors import QmigError, TruncatedError
from qmig.protocol.destination import BlockTracker, Destination
from qmig.protocol.ram_config import HOST_PAGE_SIZE, RamConfig
from qmig.wire import messages as m
from qmig.wire.profiles import load_profile, target_page_size
from qmig.wire.reader import END, NEED_DATA, Record, StreamReader
from qmig.wire.schema import Schema, schema_for

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "postcopy-tcp" / "stream.bin.xz"
MACHINE_TYPE = "pc-i440fx-7.2"
MEMORY_MIB = 64  # the fixture's guest: its MEM_SIZE list matches this QEMU's RAMBlocks
PAGE = target_page_size()
VERDICT_TIMEOUT = 4.0  # after the last byte: QEMU decides in milliseconds
END_OF_STREAM = "end of stream"
ACCEPTED = "accepted"
CRASHED = "crashed"


# --- cases ----------------------------------------------------------------------------------


@dataclass
class Case:
    """One command sequence: its bytes, its steps in words, and the constructs it uses."""

    number: int
    data: bytes = field(repr=False)
    steps: list[str]
    tags: set[str] = field(default_factory=set)


@dataclass
class Result:
    case: Case
    qemu: str
    qmig: str
    qemu_detail: str = ""
    qmig_detail: str = ""
    quirk: str | None = None
    qmig_offset: int | None = None
    qmig_also: tuple[str, ...] = ()  # see QmigVerdict.also

    @property
    def agree(self) -> bool:
        return self.qemu == self.qmig or self.qemu in self.qmig_also

    @property
    def explained(self) -> bool:
        return self.agree or self.quirk is not None

    def as_json(self) -> dict[str, Any]:
        return {
            "case": self.case.number,
            "steps": self.case.steps,
            "qemu": self.qemu,
            "qmig": self.qmig,
            "qemu_detail": self.qemu_detail,
            "qmig_detail": self.qmig_detail,
            "quirk": self.quirk,
            "agree": self.agree,
        }


def fixture_blocks() -> tuple[m.RamBlockInfo, ...]:
    """The RAMBlocks of the fixture's pc guest, from its MEM_SIZE record."""
    data = lzma.decompress(FIXTURE.read_bytes())
    reader = StreamReader("7.2")
    reader.feed(data[: 1 << 16])
    for record in reader:
        assert isinstance(record, Record)
        if isinstance(record.message, m.MemSize):
            return record.message.blocks
    raise QmigError("differential", f"no MEM_SIZE record in {FIXTURE}")


class CaseBuilder:
    """Draws command sequences: mostly the order a source uses, with one or two changes."""

    def __init__(self, version: str, rng: random.Random) -> None:
        self.schema: Schema = schema_for(version)
        self.profile = self.schema.profile
        self.rng = rng
        self.blocks = fixture_blocks()

    def opening(self) -> bytes:
        return self.schema.build_opening(m.Configuration(MACHINE_TYPE))

    def ram_setup(self) -> bytes:
        return self.schema.build_ram_setup(2, self.blocks)

    def ram_end(self) -> bytes:
        s = self.schema
        return s.build_section(m.SectionEnd(2)) + s.build_ram_flag("EOS") + s.build_footer(2)

    # One step: (words, bytes, tags). Steps marked "risky" go rarely.

    def step(self, name: str) -> tuple[str, bytes, set[str]]:
        s, rng = self.schema, self.rng
        ram = self.blocks[0]
        if name == "OPEN_RETURN_PATH":
            return name, s.build_command(m.OpenReturnPath()), set()
        if name == "PING":
            value = rng.randrange(1 << 32)
            return f"PING {value:#x}", s.build_command(m.Ping(value)), set()
        if name == "ADVISE":
            return name, s.build_command(m.PostcopyAdvise(PAGE, PAGE)), set()
        if name == "ADVISE0":
            return name, s.build_command(m.PostcopyAdvise()), set()
        if name == "ADVISE_BAD_PAGES":
            advise = m.PostcopyAdvise(PAGE, 2 * PAGE)
            return name, s.build_command(advise), set()
        if name == "LISTEN":
            return name, s.build_command(m.PostcopyListen()), {"outer-listen"}
        if name == "RUN":
            return name, s.build_command(m.PostcopyRun()), set()
        if name == "DISCARD":
            pages = ram.used_length // PAGE
            first = rng.randrange(pages)
            span = m.DiscardRange(first * PAGE, rng.randint(1, min(16, pages - first)) * PAGE)
            return f"DISCARD {span.start:#x}+{span.length:#x}", self._discard(ram, span), set()
        if name == "DISCARD_OUTSIDE":
            span = m.DiscardRange(ram.used_length - PAGE, 2 * PAGE)
            return name, self._discard(ram, span), {"discard-range"}
        if name == "DISCARD_UNALIGNED":
            span = m.DiscardRange(PAGE + 512, PAGE)
            return name, self._discard(ram, span), {"discard-range"}
        if name == "DISCARD_WRAP":
            span = m.DiscardRange((1 << 64) - PAGE, 2 * PAGE)
            return name, self._discard(ram, span), {"discard-wrap"}
        if name == "DISCARD_UNKNOWN_BLOCK":
            command = m.PostcopyRamDiscard("nope", (m.DiscardRange(0, PAGE),))
            return name, s.build_command(command), set()
        if name == "DISCARD_SHORT":
            payload = bytes([0, 1]) + b"x\x00" + bytes(12)
            return name, self._raw("POSTCOPY_RAM_DISCARD", payload), set()
        if name == "DISCARD_BAD_VERSION":
            data = bytearray(self._discard(ram, m.DiscardRange(0, PAGE)))
            data[5] = 1
            return name, bytes(data), set()
        if name == "DISCARD_NAME_PAST_COMMAND":
            # The name-length byte claims more than the command holds (see quirks.md).
            payload = bytes([0, 200]) + ram.idstr.encode() + b"\x00" + bytes(16)
            return name, self._raw("POSTCOPY_RAM_DISCARD", payload), {"discard-name-length"}
        if name == "UNKNOWN_COMMAND":
            number = rng.choice([0, max(self.profile.commands.values()) + 1, 0x1234])
            return f"MIG_CMD {number:#x}", bytes([8]) + number.to_bytes(2, "big") + bytes(2), set()
        if name == "BAD_LENGTH":
            which = rng.choice(["PING", "POSTCOPY_LISTEN", "POSTCOPY_RUN", "OPEN_RETURN_PATH"])
            return f"{which} len 3", self._raw(which, b"\x00\x00\x00"), set()
        if name == "PAGE":
            page = m.RamPage(ram.idstr, rng.randrange(ram.used_length // PAGE) * PAGE, True, b"\0")
            return name, self._ram(s.build_ram_page(page)), set()
        if name == "PAGE_OUTSIDE":
            page = m.RamPage(ram.idstr, ram.used_length, True, b"\x00")
            return name, self._ram(s.build_ram_page(page)), set()
        if name == "EOF":
            return name, b"\x00", set()
        raise ValueError(name)

    def _discard(self, block: m.RamBlockInfo, span: m.DiscardRange) -> bytes:
        return self.schema.build_command(m.PostcopyRamDiscard(block.idstr, (span,)))

    def _raw(self, name: str, payload: bytes) -> bytes:
        number = self.profile.commands[name]
        return bytes([8]) + number.to_bytes(2, "big") + len(payload).to_bytes(2, "big") + payload

    def _ram(self, records: bytes) -> bytes:
        s = self.schema
        return (
            s.build_section(m.SectionPart(2))
            + records
            + s.build_ram_flag("EOS")
            + (s.build_footer(2))
        )

    def packaged(self, inner: Sequence[tuple[str, bytes, set[str]]]) -> tuple[str, bytes, set[str]]:
        blob = b"".join(data for _, data, _ in inner)
        words = "PACKAGED(" + ", ".join(word for word, _, _ in inner) + ")"
        tags: set[str] = {"packaged"}
        for _, _, more in inner:
            tags |= more
        return words, self.schema.build_packaged(blob), tags

    # --- whole cases ----------------------------------------------------------------------

    NORMAL_BEFORE = ("OPEN_RETURN_PATH", "PING", "ADVISE")
    MUTANTS = (
        "PING",
        "ADVISE",
        "ADVISE0",
        "ADVISE_BAD_PAGES",
        "RUN",
        "DISCARD",
        "DISCARD_OUTSIDE",
        "DISCARD_UNALIGNED",
        "DISCARD_WRAP",
        "DISCARD_UNKNOWN_BLOCK",
        "DISCARD_SHORT",
        "DISCARD_BAD_VERSION",
        "DISCARD_NAME_PAST_COMMAND",
        "UNKNOWN_COMMAND",
        "BAD_LENGTH",
        "PAGE",
        "PAGE_OUTSIDE",
        "EOF",
    )
    PACKAGE_MUTANTS = ("LISTEN", "RUN", "PING", "ADVISE", "DISCARD", "UNKNOWN_COMMAND")

    def case(self, number: int) -> Case:
        rng = self.rng
        # The source's order: opening, RP, PING, ADVISE, ram setup, discards, PING,
        # PACKAGED(LISTEN, PING, RUN), PING, ram END, EOF.
        outer: list[Any] = [self.step(name) for name in self.NORMAL_BEFORE]
        outer.append(("RAM setup", self.ram_setup(), set()))
        outer += [self.step("DISCARD") for _ in range(rng.randint(0, 2))]
        outer.append(self.step("PING"))
        inner = [self.step("LISTEN"), self.step("PING"), self.step("RUN")]
        for _ in range(rng.choice([0, 0, 1, 1, 2])):
            self._change(inner, self.PACKAGE_MUTANTS, keep_first=0)
        for step in inner:
            step[2].discard("outer-listen")
        outer.append(self.packaged(inner))
        outer += [self.step("PING"), ("RAM end", self.ram_end(), set()), self.step("EOF")]
        for _ in range(rng.choice([0, 1, 1, 1, 2])):
            self._change(outer, self.MUTANTS, keep_first=1)
        if rng.random() < 0.15:
            # Cut the stream short somewhere: the end of stream alone must fail.
            data = b"".join(step[1] for step in outer)
            cut = rng.randrange(len(self.opening()) + 1, len(self.opening()) + len(data))
            return self._assemble(number, outer, cut)
        return self._assemble(number, outer, None)

    def _change(self, steps: list[Any], names: Sequence[str], keep_first: int) -> None:
        rng = self.rng
        action = rng.choice(["insert", "insert", "replace", "delete", "swap"])
        at = rng.randrange(keep_first, len(steps) + (action == "insert"))
        if action == "insert":
            steps.insert(at, self.step(rng.choice(names)))
        elif action == "replace" and at < len(steps):
            steps[at] = self.step(rng.choice(names))
        elif action == "delete" and at < len(steps) and len(steps) > 1:
            del steps[at]
        elif action == "swap" and at + 1 < len(steps):
            steps[at], steps[at + 1] = steps[at + 1], steps[at]

    def _assemble(self, number: int, steps: list[Any], cut: int | None) -> Case:
        body = b"".join(data for _, data, _ in steps)
        data = self.opening() + body
        words = [word for word, _, _ in steps]
        tags = case_facts(data, self.profile.name)  # of the whole sequence, before any cut
        for _, _, more in steps:
            tags |= more
        if cut is not None:
            data = data[:cut]
            words.append(f"(cut at byte {cut})")
            tags.add("cut")
        return Case(number, data, words, tags)


# --- qmig's verdict ------------------------------------------------------------------------


@dataclass(frozen=True)
class QmigVerdict:
    """qmig's destination on one case: the class, its line, and where it was given."""

    verdict: str
    line: str
    offset: int | None = None
    # A stream qmig finds cut inside record X: QEMU reads zeros past the end and may fail
    # X's own checks instead ("Failed to read RAMBlock ID"), or PACKAGED's short read.
    also: tuple[str, ...] = ()


def qmig_verdict(data: bytes, version: str, blocks: Sequence[m.RamBlockInfo] = ()) -> QmigVerdict:
    """qmig's destination fed ``data`` then the end of input.

    ``blocks`` are the destination's own RAMBlocks, as QEMU's come from its command line:
    a discard before (or without) the MEM_SIZE list refers to them."""
    # The QEMU compared with runs on ordinary RAM: its page-size summary is the host's.
    dest = Destination(version, ram=RamConfig(page_size=HOST_PAGE_SIZE))
    for info in blocks:
        dest.blocks[info.idstr] = BlockTracker(info, PAGE, dest.reader.schema.target_page_size)
    try:
        dest.receive_data(data)
        _drain(dest)
        dest.receive_eof()
        _drain(dest)
    except TruncatedError as error:
        also = [f"rejected {_qemu_name(error.what)}"]
        if dest.reader._packages:
            also.append("rejected PACKAGED")
        return QmigVerdict(END_OF_STREAM, error.one_line(), error.offset, tuple(also))
    except QmigError as error:
        if error.what in ("stream", "EOF"):
            return QmigVerdict(END_OF_STREAM, error.one_line(), error.offset)
        return QmigVerdict(f"rejected {_qemu_name(error.what)}", error.one_line(), error.offset)
    return QmigVerdict(ACCEPTED, "accepted")


def _qemu_name(what: str) -> str:
    """qmig's WHAT as QEMU's errors can name it."""
    if what == "MEM_SIZE":
        return "RAM"
    if what.startswith("SECTION_"):
        return "SECTION"  # QEMU names no section type in its errors
    return what


def _drain(dest: Destination) -> None:
    while dest.next_event() not in (NEED_DATA, END):
        pass


# --- QEMU's verdict ------------------------------------------------------------------------

# QEMU's error lines (7.2, migration/savevm.c, ram.c, postcopy-ram.c) -> the command named.
QEMU_ERRORS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"MIG_CMD 0x[0-9a-f]+ unknown"), "unknown command"),
    (re.compile(r"CMD_POSTCOPY_RAM_DISCARD|ram_discard_range|ram_block_discard_range"),
     "POSTCOPY_RAM_DISCARD"),
    (re.compile(r"CMD_POSTCOPY_ADVISE|RAM postcopy is|Postcopy needs matching"),
     "POSTCOPY_ADVISE"),
    (re.compile(r"CMD_POSTCOPY_LISTEN|CMD_POSTCOPY_RAM_LISTEN|ram_block_enable_notify"
                r"|postcopy_ram_incoming_setup|postcopy_ram_enable_notify"), "POSTCOPY_LISTEN"),
    (re.compile(r"CMD_POSTCOPY_RUN"), "POSTCOPY_RUN"),
    (re.compile(r"CMD_PING"), "PING"),
    (re.compile(r"CMD_PACKAGED|packaged state"), "PACKAGED"),
    (re.compile(r"CMD_OPEN_RETURN_PATH"), "OPEN_RETURN_PATH"),
    (re.compile(r"CMD_POSTCOPY_RESUME"), "POSTCOPY_RESUME"),
    (re.compile(r"CMD_RECV_BITMAP"), "RECV_BITMAP"),
    (re.compile(r"Illegal RAM offset|Unknown combination of migration flags|Can't find block"
                r"|Ack, bad migration stream|Non-same host page|block .* should not be"),
     "RAM"),
]  # fmt: skip
QEMU_ERRORS.append(
    (
        re.compile(
            r"Unknown savevm section|Missing section footer|Mismatched section"
            r" id|Unable to read ID string"
        ),
        "SECTION",
    )
)
LENGTH_ERROR = re.compile(r"(\S+) received with bad length")
QEMU_PREFIX = re.compile(r"^qemu-system-\w+: ")


def classify_qemu_log(log: str, completed: bool, signal_number: int | None) -> tuple[str, str]:
    """(class, the error line) from what a QEMU destination printed and how it ended."""
    lines = [QEMU_PREFIX.sub("", line) for line in log.splitlines() if QEMU_PREFIX.match(line)]
    errors = [line for line in lines if not line.startswith("warning:")]
    crash = "" if signal_number is None else f" (then killed by signal {signal_number})"
    if completed:
        # Some lines are reports only (a missing VMDESCRIPTION): the load went through.
        return ACCEPTED, errors[0] if errors else "completed"
    for line in errors:
        length = LENGTH_ERROR.search(line)
        if length:
            name = length[1].removeprefix("CMD_").removeprefix("MIG_CMD_")
            return f"rejected {name}", line + crash
        for pattern, name in QEMU_ERRORS:
            if pattern.search(line):
                # A QEMU that rejected a command may then abort on its way out (the listen
                # thread still runs): the rejection is the verdict.
                return f"rejected {name}", line + crash
    if signal_number is not None and not any("load of migration failed" in e for e in errors):
        return CRASHED, f"killed by signal {signal_number}" + (f": {errors[0]}" if errors else "")
    # The load failed with no command named (an I/O error: the input ended), possibly
    # followed by an abort on the way out.
    return END_OF_STREAM, (errors[0] if errors else "no error line") + crash


def configured_machine_type(data: bytes, version: str) -> str:
    """The machine type a stream's CONFIGURATION names: the destination must be started with
    it (QEMU refuses a stream made for another machine type), "pc" if there is none."""
    reader = StreamReader(version)
    reader.feed(data[: 1 << 12])
    try:
        for record in reader:
            assert isinstance(record, Record)
            if isinstance(record.message, m.Configuration):
                return record.message.machine_type
            if record.name not in ("HEADER", "CONFIGURATION"):
                break
    except QmigError:
        pass
    return "pc"


def qemu_verdict(
    data: bytes, workdir: Path, name: str, version: str | None = None
) -> tuple[str, str]:
    """Send ``data`` to a fresh QEMU destination (the QEMU of ``version``, started with the
    machine type the stream names) and classify how its load ended."""
    from qmig.qemu.machine import FINAL_STATES, Machine, MachineConfig

    machine_type = configured_machine_type(data, version or "7.2")
    config = MachineConfig(
        name,
        MEMORY_MIB,
        guest=None,
        incoming="defer",
        qemu_version=version,
        machine_type=machine_type,
    )
    machine = Machine(config, workdir)
    machine.start()
    try:
        machine.set_capabilities(postcopy_ram=True)
        machine.migrate_incoming("tcp:127.0.0.1:0")
        port = machine.incoming_port()
        return_path = bytearray()
        with socket.create_connection(("127.0.0.1", port), timeout=VERDICT_TIMEOUT) as sock:
            reader = threading.Thread(target=_read_all, args=(sock, return_path), daemon=True)
            reader.start()
            try:
                sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # QEMU already gave up and closed: its verdict is in its log
            completed = False
            deadline = time.monotonic() + VERDICT_TIMEOUT
            assert machine.process is not None
            while time.monotonic() < deadline:
                if machine.process.poll() is not None:
                    break
                try:
                    status = machine.query_migrate().get("status")
                except QmigError:
                    break
                if status in FINAL_STATES:
                    completed = status == "completed"
                    break
                time.sleep(0.02)
            reader.join(timeout=1.0)
        code = machine.process.poll()
        signal_number = -code if code is not None and code < 0 else None
        time.sleep(0.05)  # let QEMU's last line reach the log
        log = machine.log_path.read_text(errors="replace")
        return classify_qemu_log(log, completed, signal_number)
    finally:
        machine.kill()


def _read_all(sock: socket.socket, into: bytearray) -> None:
    try:
        while chunk := sock.recv(65536):
            into += chunk
    except OSError:
        pass


# --- quirks ----------------------------------------------------------------------------------


def case_facts(data: bytes, version: str) -> set[str]:
    """The constructs of a case that QEMU handles its own way (the quirk tags), read off
    the records as qmig's reader delimits them (up to where it stops)."""
    tags: set[str] = set()
    reader = StreamReader(version)
    reader.feed(data)
    reader.feed_eof()
    discarded = False
    state = "NONE"
    run_depth: int | None = None
    listen_at: int | None = None
    ran = False
    try:
        for record in reader:
            assert isinstance(record, Record)
            name = record.name
            if run_depth is not None and record.depth >= run_depth and name != "PACKAGE_END":
                tags.add("after-run-in-package")
            if name == "PACKAGE_END":
                run_depth = None
                if listen_at is not None:
                    tags.add(f"listen-span:{listen_at}:{record.offset}")
                    if not ran:
                        tags.add("listen-package-without-run")
                    listen_at = None
            if name in ("POSTCOPY_RAM_DISCARD", "POSTCOPY_ADVISE") and record.depth:
                tags.add("payload-from-outer-stream")
            if name == "POSTCOPY_ADVISE":
                state = "ADVISE"
            elif name == "POSTCOPY_RAM_DISCARD":
                discarded = True
                state = "DISCARD" if state in ("ADVISE", "DISCARD") else state
            elif name == "POSTCOPY_LISTEN":
                if state == "ADVISE" and not discarded:
                    tags.add("listen-without-discard")
                if record.depth and listen_at is None:
                    # From here QEMU's listen thread parses the outer stream while the main
                    # thread goes on with the package: a failure on either side can win.
                    listen_at = record.offset
                state = "LISTENING"
            elif name == "POSTCOPY_RUN":
                ran = ran or bool(record.depth)
                if record.depth:
                    run_depth = record.depth
                state = "RUNNING"
            elif name == "EOF" and not record.depth and state == "DISCARD":
                tags.add("eof-in-discard")
    except QmigError:
        if run_depth is not None:
            tags.add("after-run-in-package")
    if listen_at is not None:  # the package never ended
        tags.add(f"listen-span:{listen_at}:{len(data)}")
    return tags


def explain(result: Result, version: str) -> str | None:
    """The quirk of ``version`` that explains a disagreement, if one does."""
    quirks: dict[str, Any] = getattr(load_profile(version), "quirks", {}) or {}
    tags = set(result.case.tags)
    at = result.qmig_offset
    for tag in list(tags):
        if tag.startswith("listen-span:") and at is not None:
            # qmig failed after a LISTEN inside a package: in the rest of the package (QEMU's
            # main thread) or in the outer stream after it (QEMU's listen thread, at the same
            # time). The two threads share the postcopy state, so a command on one can fail
            # the other, and QEMU may report either failure.
            start = int(tag.split(":")[1])
            if start < at:
                tags.add("listen-thread-race")
    for name, quirk in quirks.items():
        if quirk.get("tag") not in tags:
            continue
        qemu, qmig = quirk.get("qemu", []), quirk.get("qmig", [])
        if ("*" in qemu or result.qemu in qemu) and ("*" in qmig or result.qmig in qmig):
            return str(name)
    return None


# --- the campaign -------------------------------------------------------------------------


@dataclass
class DifferentialReport:
    version: str
    seed: int
    results: list[Result] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def unexplained(self) -> list[Result]:
        return [result for result in self.results if not result.explained]

    def as_json(self) -> dict[str, Any]:
        return {
            "target": "differential",
            "qemu_version": self.version,
            "seed": self.seed,
            "cases": len(self.results),
            "seconds": round(self.seconds, 2),
            "agree": sum(result.agree for result in self.results),
            "explained_by_quirks": sum(
                1 for result in self.results if not result.agree and result.quirk
            ),
            "unexplained": [result.as_json() for result in self.unexplained],
            "quirks_seen": sorted({r.quirk for r in self.results if r.quirk}),
        }


def run_cases(
    cases: Sequence[Case],
    version: str,
    *,
    jobs: int = 2,
    workdir: Path | None = None,
    progress: Callable[[Result], None] | None = None,
) -> list[Result]:
    """Every case against QEMU (``jobs`` at once) and against qmig."""
    blocks = fixture_blocks()
    with tempfile.TemporaryDirectory(prefix="qmig-diff-", dir=workdir) as tmp:
        root = Path(tmp)

        def one(case: Case) -> Result:
            workdir = root / f"case{case.number}"
            qemu, qemu_line = qemu_verdict(case.data, workdir, "dest", version)
            ours = qmig_verdict(case.data, version, blocks)
            result = Result(
                case, qemu, ours.verdict, qemu_line, ours.line, None, ours.offset, ours.also
            )
            if not result.agree:
                result.quirk = explain(result, version)
            if progress is not None:
                progress(result)
            return result

        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            return list(pool.map(one, cases))


def campaign(
    runs: int, version: str, seed: int, jobs: int = 2, seconds: float | None = None,
    progress: Callable[[Result], None] | None = None,
) -> DifferentialReport:  # fmt: skip
    rng = random.Random(seed)
    builder = CaseBuilder(version, rng)
    report = DifferentialReport(schema_for(version).profile.name, seed)
    started = time.monotonic()
    number = 0
    while number < runs:
        if seconds is not None and time.monotonic() - started > seconds:
            break
        batch = [builder.case(number + i) for i in range(min(jobs * 4, runs - number))]
        number += len(batch)
        report.results += run_cases(batch, version, jobs=jobs, progress=progress)
    report.seconds = time.monotonic() - started
    return report


def run_cli(args: argparse.Namespace) -> int:
    from rich.console import Console

    version = args.qemu_version or "7.2"
    runs = args.runs if args.runs is not None else (10_000 if args.seconds else 40)
    console = Console(stderr=True, highlight=False)

    def show(result: Result) -> None:
        if not args.json and not result.explained:
            console.print(
                f"case {result.case.number}: QEMU {result.qemu}, qmig {result.qmig}: "
                f"{' '.join(result.case.steps)}"
            )

    report = campaign(runs, version, args.seed, args.jobs, args.seconds, show)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        for result in report.unexplained:
            path = args.out / f"differential-{result.case.number}.bin"
            path.write_bytes(result.case.data)
            with (args.out / "failures.txt").open("a") as summary:
                summary.write(
                    f"{path.name}\tdifferential\tdisagreement\tQEMU {result.qemu} "
                    f"({result.qemu_detail}); qmig {result.qmig} ({result.qmig_detail})\n"
                )
    summary = report.as_json()
    if args.json:
        json.dump(summary, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        console.print(
            f"differential (QEMU {version}): {summary['cases']} cases in {summary['seconds']} s, "
            f"{summary['agree']} agree, {summary['explained_by_quirks']} explained by quirks "
            f"({', '.join(summary['quirks_seen']) or 'none'}), "
            f"{len(report.unexplained)} unexplained"
        )
    return 1 if report.unexplained else 0
