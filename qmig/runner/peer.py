"""The destination half of ``qmig simulate``, run in its own process, and its parent's side.

The child accepts one connection on a listening socket inherited from the parent, runs a
destination onto userfaultfd RAM with a guest workload, and prints its report as one JSON
line on stdout. Errors print one line on stderr.

Before accepting it prints ``ready`` on a line of its own: the parent starts the source only
then, as a QEMU source is started against a destination already waiting with ``-incoming``,
so that the migration's time does not include this process starting up.

With ``--hold``, once the migration is complete the child keeps its RAM mapped (unregistered:
a missing page now reads as zero), adds where each block lies to its report, and waits for
its stdin to close. The parent compares that memory with the source's page by page, reading
it straight out of the child (``process_vm_readv``): no dump file, one copy (:class:`Peer`).
Where the host refuses that, the parent writes ``send`` to the child's stdin and the child
writes its RAM down its stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

from qmig.errors import QmigError, TransportError, VerificationError
from qmig.protocol.destination import Destination
from qmig.protocol.preempt import PREEMPT_CHANNEL, VARIANT_NAMES, PreemptVariant
from qmig.protocol.ram_config import RamConfig, parse_blocks
from qmig.ram.blocks import HOST_PAGE_SIZE
from qmig.ram.workload import Pattern, Workload
from qmig.runner.channels import PREEMPT, Channels
from qmig.runner.destination import IDLE_TIMEOUT, DestinationRunner
from qmig.runner.multifd_recv import channel_kind
from qmig.sizes import parse_size
from qmig.transport import Connection
from qmig.wire.profiles import target_page_size

READY = "ready"
MAX_LISTED = 4096  # differing pages located; more are counted only
SEND = "send"  # asks a holding destination for its RAM down its stdout
SEND_CHUNK = 4 << 20
SEND_TIMEOUT = 30.0
PAGE = target_page_size()


class Peer:
    """The destination child, seen from the parent: started, ready, its report, its RAM
    compared with the source's, and its end (with its one error line, if it failed)."""

    def __init__(self, arguments: list[str], listener: socket.socket) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "qmig.runner.peer", "--fd", str(listener.fileno()), *arguments],
            pass_fds=(listener.fileno(),),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            bufsize=0,
        )
        self._pending = b""  # stdout read past the last line taken

    def _line(self, timeout: float) -> bytes:
        """The next line on its stdout (b"" once it ended or the time ran out)."""
        stdout = self.process.stdout
        assert stdout is not None
        deadline = time.monotonic() + timeout
        while b"\n" not in self._pending:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([stdout], [], [], left)[0]:
                return b""
            data = os.read(stdout.fileno(), 1 << 16)
            if not data:
                return b""
            self._pending += data
        line, _, self._pending = self._pending.partition(b"\n")
        return line

    def wait_until_ready(self, timeout: float) -> None:
        """Wait for its ``ready`` line (it is about to accept the connection)."""
        line = self._line(timeout).strip()
        if line != READY.encode():
            # It failed to start (its error is on stderr) or said something else: either way
            # the source has nothing to connect to.
            said = f" (it said {line.decode(errors='replace')!r})" if line else ""
            raise QmigError("simulate", f"the destination did not start{said}")

    def report(self, timeout: float) -> dict[str, Any] | None:
        """Its report, or None when it failed (:meth:`finish` then says why)."""
        line = self._line(timeout)
        try:
            report = json.loads(line) if line else None
        except ValueError:
            return None
        return report if isinstance(report, dict) else None

    def compare(
        self, blocks: Iterable[tuple[str, Any]], report: dict[str, Any], *, direct: bool = True
    ) -> tuple[int, list[tuple[str, int]]]:
        """How many pages of its RAM differ from ``blocks`` ((idstr, buffer) pairs), and the
        first of them (block, offset). It runs with ``--hold``. Its memory is read straight
        out of it; where the host refuses that (``process_vm_readv`` needs the right to trace
        it, which Yama or a sandbox may withhold), or with ``direct=False``, it sends its RAM
        down its stdout instead."""
        from qmig.ram._uffd import ffi, lib

        mine = dict(blocks)
        unknown = [idstr for idstr in mine if idstr not in report["ram"]]
        if unknown:
            raise VerificationError("verify", f"the destination has no block {unknown[0]!r}")
        if not direct:
            return self._compare_sent(mine, report)
        total, located = 0, []
        for idstr, memory in mine.items():
            local = ffi.from_buffer(memory)
            found = ffi.new("uint64_t[]", MAX_LISTED)
            differ = lib.qmig_compare_remote(
                report["pid"], report["ram"][idstr], int(ffi.cast("uintptr_t", local)),
                len(local), PAGE, found, MAX_LISTED,
            )  # fmt: skip
            if differ in (-errno.EPERM, -errno.EACCES, -errno.ENOSYS):
                return self._compare_sent(mine, report)
            if differ < 0:
                raise VerificationError(
                    "verify", f"reading the destination's {idstr!r}: {os.strerror(-differ)}"
                )
            total += differ
            located += [(idstr, int(found[k])) for k in range(min(differ, MAX_LISTED))]
        return total, located

    def _compare_sent(
        self, mine: dict[str, Any], report: dict[str, Any]
    ) -> tuple[int, list[tuple[str, int]]]:
        """The same comparison, with the destination writing its RAM down its stdout (every
        block of its report, in order)."""
        stdin, stdout = self.process.stdin, self.process.stdout
        assert stdin is not None and stdout is not None
        stdin.write(SEND.encode() + b"\n")
        stdin.flush()
        total, located = 0, []
        for idstr in report["ram"]:
            size = report["blocks"][idstr]
            local = memoryview(mine[idstr]) if idstr in mine else None
            for at in range(0, size, SEND_CHUNK):
                chunk = self._exactly(min(SEND_CHUNK, size - at))
                if local is None or chunk == local[at : at + len(chunk)]:
                    continue
                for page in range(0, len(chunk), PAGE):
                    if chunk[page : page + PAGE] != local[at + page : at + page + PAGE]:
                        if total < MAX_LISTED:
                            located.append((idstr, at + page))
                        total += 1
        return total, located

    def _exactly(self, size: int) -> bytes:
        stdout = self.process.stdout
        assert stdout is not None
        data = bytearray(self._pending[:size])
        self._pending = self._pending[size:]
        while len(data) < size:
            if not select.select([stdout], [], [], SEND_TIMEOUT)[0]:
                raise VerificationError(
                    "verify", f"the destination sent none of its RAM for {SEND_TIMEOUT:.0f} s"
                )
            more = os.read(stdout.fileno(), min(1 << 20, size - len(data)))
            if not more:
                raise VerificationError("verify", "the destination stopped sending its RAM")
            data += more
        return bytes(data)

    def finish(self, timeout: float) -> str:
        """Let it go (close its stdin) and wait. Returns "" when it succeeded, else its error
        line as it printed it (``qmig: error: ...``)."""
        process = self.process
        try:
            _, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            return "qmig: error: destination: did not finish in time"
        if process.returncode == 0:
            return ""
        lines = [line for line in stderr.decode(errors="replace").splitlines() if line.strip()]
        return lines[-1] if lines else f"qmig: error: exited with status {process.returncode}"

    def kill(self) -> None:
        """End it now, if it still runs (its stderr stays for :meth:`finish`)."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def report_json(runner: DestinationRunner) -> dict[str, object]:
    report = runner.report
    return {
        "started": report.started,
        "running_at": report.running_at,
        "finished": report.finished,
        "postcopy": report.postcopy,
        "bytes_received": report.bytes_received,
        "blocks": report.blocks,
        "devices": len(report.devices),
        "requests": report.requests,
        "request_sent_ns": report.request_sent_ns,
        "request_sent_at_ns": report.request_sent_at_ns,
        "faults": report.faults,
        "workload": report.workload,
        "discarded_pages": report.discarded_pages,
        "first_discard_at": report.first_discard_at,
        "listen_at": report.listen_at,
        "placed_pages": report.placed_pages,
        "placing_ns": report.placing_ns,
        "notices": report.notices,
        "block_pages": report.block_pages,
        "request_log": report.request_log,
        "pongs": runner.dest.pongs_sent,
        "recoveries": report.recoveries,
        "paused_s": report.paused_s,
        "pauses": [dataclasses.asdict(pause) for pause in report.pauses],
        "fast_path": report.fast_path,
        "fast_path_wait_ns": report.fast_path_wait_ns,
        "preempt_pages": report.preempt_pages,
        "preempt_bytes": report.preempt_bytes,
        "multifd_pages": report.multifd_pages,
        "multifd": report.multifd or None,
        "state": runner.dest.state.name,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qmig-simulation-destination")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--qemu-version")
    parser.add_argument("--pattern", default="random", choices=[p.name.lower() for p in Pattern])
    parser.add_argument("--vcpus", type=int, default=2)
    parser.add_argument("--touches", type=int)
    parser.add_argument("--hold", action="store_true", help="keep RAM for the parent to read")
    parser.add_argument("--precopy-only", action="store_true")
    # The destination's own RAM, as a QEMU destination has it from its command line.
    parser.add_argument("--blocks", type=parse_blocks, help="NAME:SIZE,... (default: MEM_SIZE's)")
    parser.add_argument("--ram-page-size", type=parse_size, default=HOST_PAGE_SIZE)
    parser.add_argument("--accept-timeout", type=float, default=30.0)
    parser.add_argument(
        "--idle-timeout", type=float, default=IDLE_TIMEOUT, help="fail when the source stalls"
    )
    parser.add_argument(
        "--recover-timeout",
        type=float,
        default=0.0,
        help="paused in postcopy: wait this long for the source's new channel (0: fail)",
    )
    parser.add_argument("--preempt", choices=VARIANT_NAMES, help="postcopy-preempt's variant")
    parser.add_argument(
        "--multifd", type=int, default=0, help="the source's multifd channels (0: none)"
    )
    parser.add_argument("--no-fast-path", action="store_true", help="no C receive thread")
    args = parser.parse_args(argv)
    listener = socket.socket(fileno=args.fd)
    print(READY, flush=True)
    try:
        listener.settimeout(args.accept_timeout)
        sock = _accept(listener, args.accept_timeout)
        if not args.recover_timeout and not args.preempt and not args.multifd:
            listener.close()
        destination = Destination(
            args.qemu_version,
            postcopy_ram=not args.precopy_only,
            ram=RamConfig(page_size=args.ram_page_size, blocks=args.blocks),
            preempt=PreemptVariant(args.preempt) if args.preempt else None,
        )
        workload = Workload(Pattern[args.pattern.upper()], touches=args.touches)
        with Connection(SOURCE_NAME, sock=sock) as connection:
            reopen = None
            if args.recover_timeout:

                def reopen(timeout: float) -> Connection:
                    return Connection(SOURCE_NAME, sock=_accept(listener, timeout))

            openers = {}
            if args.preempt:
                openers[PREEMPT] = lambda timeout: Connection(
                    f"{SOURCE_NAME} ({PREEMPT_CHANNEL})", sock=_accept(listener, timeout)
                )
            openers.update(multifd_openers(listener, args.multifd))
            runner = DestinationRunner(
                Channels(connection, reopen, openers, adopt=_as_main),
                destination,
                recover_timeout=args.recover_timeout,
                workload=workload,
                vcpus=args.vcpus,
                idle_timeout=args.idle_timeout,
                keep_ram=args.hold,
                multifd_channels=args.multifd,
                fast_path=not args.no_fast_path,
            )
            runner.run()
    except QmigError as error:
        print(f"qmig: error: {error.one_line()}", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"qmig: error: destination: {error.strerror or error}", file=sys.stderr)
        return 1
    report = report_json(runner)
    session = runner.session if args.hold else None
    if session is not None:
        report["pid"] = os.getpid()
        report["ram"] = {block.idstr: block.host_address for block in session.blocks}
    print(json.dumps(report), flush=True)
    if session is not None:
        # Until the parent has compared and closes our stdin; where it cannot read our
        # memory itself, it asks for it.
        for line in sys.stdin:
            if line.strip() == SEND:
                send_ram(runner)
        session.close()
    return 0


SOURCE_NAME = "simulation source"


def multifd_openers(
    listener: socket.socket, count: int
) -> dict[str, Callable[[float], Connection]]:
    """The source's multifd channels: the connections after the main one, taken in order
    (the source opens them one after the other, each sending its handshake at once)."""

    def opener(index: int) -> Callable[[float], Connection]:
        return lambda timeout: Connection(
            f"{SOURCE_NAME} ({channel_kind(index)})", sock=_accept(listener, timeout)
        )

    return {channel_kind(index): opener(index) for index in range(count)}


def _as_main(connection: Connection) -> Connection:
    """A connection accepted as a preempt channel that is the source's next main one."""
    connection.name = SOURCE_NAME
    return connection


def _accept(listener: socket.socket, timeout: float) -> socket.socket:
    listener.settimeout(timeout)
    try:
        sock, _ = listener.accept()
    except OSError as error:
        raise TransportError(SOURCE_NAME, f"no connection: {error.strerror or error}") from None
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def send_ram(runner: DestinationRunner) -> None:
    """Every block's bytes down stdout, in the report's order (the blocks are no longer
    registered: a page that never came reads as zero, and is found to differ)."""
    from qmig.ram._uffd import ffi

    session = runner.session
    assert session is not None
    out = sys.stdout.buffer
    for idstr, used in runner.report.blocks.items():
        address = session.block(idstr).host_address
        for at in range(0, used, SEND_CHUNK):
            out.write(ffi.buffer(ffi.cast("char *", address + at), min(SEND_CHUNK, used - at)))
    out.flush()


if __name__ == "__main__":
    raise SystemExit(main())
