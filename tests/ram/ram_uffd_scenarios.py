"""userfaultfd scenarios, each run in its own process by ram_uffd_harness.run_scenario.

A scenario that freezes (the failure mode userfaultfd invites) is killed by the harness's
timeout instead of hanging the test run. Each prints one JSON document with its findings;
the tests assert on it. ``{"skip": reason}`` means the host genuinely cannot run it.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from array import array
from collections.abc import Callable, Sequence
from typing import Any

from qmig.ram._uffd import ffi, lib

from qmig.errors import HostSupportError, QmigError
from qmig.ram.blocks import TARGET_PAGE_SIZE, BlockSpec, RamBlock
from qmig.ram.errors import FaultingSideGoneError, RamError
from qmig.ram.faults import PageRequest
from qmig.ram.handoff import HandedOver, send_userfaultfd
from qmig.ram.session import RamSession
from qmig.ram.support import huge_page_sizes, mapping_fields, memory_locked_bytes
from qmig.ram.uffd import Userfaultfd, probe
from qmig.ram.workload import Pattern, Workload, tagged_pages

MiB = 1 << 20
HUGE = 2 * MiB
P = TARGET_PAGE_SIZE
TAG = 0x0DDC0FFEE0DDF00D
SCENARIOS: dict[str, Callable[[], dict[str, Any]]] = {}


def scenario(function: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
    SCENARIOS[function.__name__] = function
    return function


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.005)
    return False


def vm_flags(address: int) -> list[str]:
    """The VmFlags of the mapping that holds ``address`` (hg: THP asked, nh: THP refused)."""
    return mapping_fields(address).get("VmFlags", "").split()


def smaps_kib(address: int, field: str) -> int:
    """A size field of the mapping that holds ``address``, in KiB."""
    return int(mapping_fields(address)[field].split()[0])


def serve_from(session: RamSession, source: bytes | bytearray) -> Callable[[PageRequest], None]:
    """A page source in the same process: answers each request with the source's bytes."""
    view = memoryview(source)

    def serve(request: PageRequest) -> None:
        block = session.block(request.block)
        block.receive_target_pages(
            request.offset, view[request.offset : request.offset + request.length]
        )

    return serve


def read_all_served(session: RamSession, source: bytes | bytearray) -> tuple[Any, bool, Any]:
    """One vCPU reads all of pc.ram while every fault is served from ``source``: its results,
    whether the block is complete after, and the fault thread's stats."""
    faults = session.start_faults(serve_from(session, source))
    session.start_vcpu("pc.ram", Workload())
    results = session.vcpus.join(30)
    complete = session.blocks.wait_complete(10)
    faults.stop()
    return results, complete, faults.stats()


def results_json(session: RamSession) -> list[dict[str, Any]]:
    return [
        {"touches": r.touches, "mismatches": r.mismatches, "aborted": r.aborted, "tid": r.thread_id}
        for r in session.results
    ]


@scenario
def handshake() -> dict[str, Any]:
    offered = probe()
    try:  # a feature no kernel has yet: the missing-feature path, for real
        Userfaultfd(need_features=1 << 40).close()
        missing_feature = None
    except HostSupportError as error:
        missing_feature = str(error)
    with Userfaultfd() as uffd:
        return {
            "offered": offered.feature_list,
            "api_ioctls": offered.ioctl_list,
            "opened_via": uffd.opened_via,
            "thread_id": uffd.has_thread_id,
            "missing_feature": missing_feature,
        }


@scenario
def handshake_refused() -> dict[str, Any]:
    """Run as a user without access: one clear message, at once."""
    try:
        Userfaultfd().close()
    except HostSupportError as error:
        return {"message": str(error)}
    return {"skip": "this user may open a userfaultfd (vm.unprivileged_userfaultfd=1?)"}


@scenario
def raw_faults() -> dict[str, Any]:
    """Faults read straight from the descriptor, in batches, with addresses and thread ids."""
    with RamSession([BlockSpec("pc.ram", 1 * MiB)]) as session:
        block = session.block("pc.ram")
        assert session.uffd is not None
        for index in range(3):
            session.start_vcpu("pc.ram", Workload(), index * 2 * P, P)
        messages = []
        deadline = time.monotonic() + 10
        while len(messages) < 3 and time.monotonic() < deadline:
            messages += session.uffd.read_faults(timeout_ms=100)
        for message in messages:
            block.receive_zero(message.address - block.host_address)
        results = session.vcpus.join(10)
        session.close()
        return {
            "offsets": sorted(m.address - block.host_address for m in messages),
            "flags": [m.flags for m in messages],
            "events": [m.event for m in messages],
            "message_tids": sorted(m.thread_id for m in messages),
            "vcpu_tids": sorted(r.thread_id for r in results),
            "aborted": [r.aborted for r in results],
        }


@scenario
def copy_modes() -> dict[str, Any]:
    """COPY with DONTWAKE leaves the waiter asleep until WAKE; duplicates say EEXIST."""
    with RamSession([BlockSpec("pc.ram", 1 * MiB)]) as session:
        block = session.block("pc.ram")
        uffd = session.uffd
        assert uffd is not None
        faults = session.start_faults()
        session.start_vcpu("pc.ram", Workload(tag_xor=TAG), 0, TARGET_PAGE_SIZE)
        request = faults.requests.get(timeout=10)
        page = tagged_pages(0, TARGET_PAGE_SIZE, TAG)
        source = ffi.from_buffer(page)
        placed = uffd.copy(block.host_address, int(ffi.cast("uintptr_t", source)), P, wake=False)
        time.sleep(0.2)
        asleep_after_dontwake = session.vcpus.threads[0].alive
        uffd.wake(block.host_address, TARGET_PAGE_SIZE)
        woke = session.vcpus.threads[0].join(10)
        duplicate = uffd.copy(block.host_address, int(ffi.cast("uintptr_t", source)), P)
        # The block-level path: the same page twice, then a zero page twice.
        first = block.receive_target_page(P, bytes(tagged_pages(P, P, TAG)))
        again = block.receive_target_page(P, bytes(tagged_pages(P, P, TAG)))
        zero = block.receive_zero(2 * P)
        zero_again = block.receive_zero(2 * P)
        results = session.close()
        return {
            "request": [request.block, request.offset, request.length],
            "placed": placed,
            "asleep_after_dontwake": asleep_after_dontwake,
            "woke_after_wake": woke,
            "duplicate_copy_placed": duplicate,
            "block_first": list(first[:2]),
            "block_again": list(again[:2]),
            "zero": list(zero[:2]),
            "zero_again": list(zero_again[:2]),
            "mismatches": results[0].mismatches,
            "aborted": results[0].aborted,
            "stats": vars(block.stats),
        }


@scenario
def concurrent() -> dict[str, Any]:
    """Eight vCPUs, four sharing pages and four on their own, against a background stream that
    pushes every page while the fault thread serves faults out of order."""
    size = 16 * MiB
    pages = size // TARGET_PAGE_SIZE
    source = tagged_pages(0, size, TAG)
    with RamSession([BlockSpec("pc.ram", size)]) as session:
        block = session.block("pc.ram")
        faults = session.start_faults(serve_from(session, source))
        for seed in range(4):  # the same 4 MiB, random order, so they collide
            session.start_vcpu(
                "pc.ram",
                Workload(Pattern.RANDOM, touches=512, seed=seed + 1, tag_xor=TAG),
                0,
                4 * MiB,
            )
        for index in range(4):  # each its own 3 MiB, sequential, writing
            session.start_vcpu(
                "pc.ram", Workload(write=True, tag_xor=TAG), 4 * MiB + index * 3 * MiB, 3 * MiB
            )
        attempts = 0
        for offset in range(0, size, 64 * TARGET_PAGE_SIZE):  # the background stream
            block.receive_target_pages(
                offset, memoryview(source)[offset : offset + 64 * TARGET_PAGE_SIZE]
            )
            attempts += 64
        results = session.vcpus.join(30)
        # Once the stream has placed everything no new request can start; let the fault
        # thread finish the ones it is serving.
        settled = wait_for(lambda: faults.stats().pending == 0)
        stats = faults.stats()
        complete = block.complete
        resent = block.receive_target_pages(0, source)  # the whole block again: all EEXIST
        session.close()
        return {
            "pages": pages,
            "attempts": attempts,
            "placed": block.stats.placed_pages,
            "duplicates": block.stats.duplicate_pages,
            "resent": list(resent[:2]),
            "complete": complete,
            "settled": settled,
            "requests": stats.requests,
            "faults": stats.faults,
            "pending": stats.pending,
            "strays": stats.stray_faults,
            "latency_count": stats.latency.count,
            "results": [
                {"touches": r.touches, "mismatches": r.mismatches, "aborted": r.aborted}
                for r in results
            ],
            "fault_error": repr(faults.error) if faults.error else None,
        }


@scenario
def faults_only() -> dict[str, Any]:
    """Every page arrives through a fault, exactly once, with latency and blocktime."""
    size = 8 * MiB
    source = tagged_pages(0, size, TAG)
    with RamSession([BlockSpec("pc.ram", size)]) as session:
        block = session.block("pc.ram")
        faults = session.start_faults(serve_from(session, source))
        for index in range(2):
            session.start_vcpu("pc.ram", Workload(tag_xor=TAG), index * size // 2, size // 2)
        results = session.vcpus.join(30)
        placed_all = session.blocks.wait_complete(10)
        faults.stop()  # the pages were placed on the fault thread: its accounting is done
        stats = faults.stats()
        digest_ok = placed_all and block.digest() is not None
        session.close()
        return {
            "pages": size // TARGET_PAGE_SIZE,
            "placed": block.stats.placed_pages,
            "duplicates": block.stats.duplicate_pages,
            "requests": stats.requests,
            "faults": stats.faults,
            "latency": vars(stats.latency),
            "blocktime": stats.blocktime_ns,
            "threads": sorted(stats.blocktime_ns_by_thread),
            "vcpu_tids": sorted(r.thread_id for r in results),
            "mismatches": sum(r.mismatches for r in results),
            "digest_ok": digest_ok,
        }


@scenario
def discard_refault() -> dict[str, Any]:
    size = 4 * MiB
    source = tagged_pages(0, size, TAG)
    with RamSession([BlockSpec("pc.ram", size)]) as session:
        block = session.block("pc.ram")
        faults = session.start_faults(serve_from(session, source))
        block.receive_target_pages(0, source)  # all at once, one C loop
        session.start_vcpu("pc.ram", Workload(tag_xor=TAG))
        session.vcpus.join(30)
        faults_before = faults.stats().faults
        thp_before = vm_flags(block.host_address)
        errors = []
        for start, length in ((size - P, 2 * P), (100, P), (0, 0)):
            try:
                block.discard(start, length)
            except RamError as error:
                errors.append(str(error))
        session.discard("pc.ram", 1 * MiB, 1 * MiB)
        thp_after = vm_flags(block.host_address)
        after_discard = block.received.count()
        try:
            block.read(1 * MiB, 8)
            read_refused = False
        except RamError:
            read_refused = True
        session.vcpus.threads.clear()
        session.start_vcpu("pc.ram", Workload(tag_xor=TAG))
        results = session.vcpus.join(30)
        session.blocks.wait_complete(10)
        faults.stop()
        stats = faults.stats()
        tag = int.from_bytes(block.read(1 * MiB, 8), "little")
        session.close()
        return {
            "pages": size // P,
            "faults_before": faults_before,
            "after_discard": after_discard,
            "faults_after": stats.faults,
            "requests_after": stats.requests,
            "errors": errors,
            "read_refused": read_refused,
            "complete_again": block.complete,
            "mismatches": results[0].mismatches,
            "tag_ok": tag == TAG ^ (1 * MiB),
            "discarded": block.stats.discarded_target_pages,
            "thp_before": "hg" in thp_before and "nh" not in thp_before,
            "thp_off_after_discard": "nh" in thp_after and "hg" not in thp_after,
        }


@scenario
def zero_pages() -> dict[str, Any]:
    size = 1 * MiB
    with RamSession([BlockSpec("pc.ram", size)]) as session:
        block = session.block("pc.ram")
        faults = session.start_faults(lambda r: block.receive_zero(r.offset, r.length))
        block.receive_zero(0, size // 2)  # one call, one UFFDIO_ZEROPAGE run
        session.start_vcpu("pc.ram", Workload(write=True))
        results = session.vcpus.join(30)
        session.blocks.wait_complete(10)
        faults.stop()  # pages are placed on the fault thread: let its accounting finish
        # The writer dirtied word 1 of each page; word 0 must still be zero.
        words = [int.from_bytes(block.read(offset, 8), "little") for offset in range(0, size, P)]
        session.close()
        return {
            "zero_pages": block.stats.zero_pages,
            "pages": size // P,
            "checksum": results[0].checksum,
            "first_words_zero": not any(words),
            "aborted": results[0].aborted,
        }


@scenario
def huge_pages() -> dict[str, Any]:
    free = huge_page_sizes().get(HUGE, (0, 0))[1]
    if free < 4:
        reserve = "echo 16 > /proc/sys/vm/nr_hugepages"
        return {"skip": f"needs 4 free 2 MiB huge pages, {free} free ({reserve})"}
    size = 2 * HUGE
    source = tagged_pages(0, size, TAG)
    with RamSession(
        [BlockSpec("big.ram", size, HUGE), BlockSpec("lazy.ram", size, HUGE)]
    ) as session:
        big, lazy = session.block("big.ram"), session.block("lazy.ram")
        view = memoryview(source)
        for offset in range(0, HUGE - P, P):  # all but the last target page of page 0
            big.receive_target_page(offset, view[offset : offset + P])
        before_last = big.is_received(0) or big.stats.placed_pages
        big.receive_target_page(HUGE - P, view[HUGE - P : HUGE])
        after_last = big.is_received(0, HUGE)
        for offset in range(HUGE, size, P):  # host page 1: all zero, no ZEROPAGE on hugetlb
            big.receive_zero(offset)
        zero_word = int.from_bytes(big.read(HUGE + 2 * P, 8), "little")
        requests: list[list[int]] = []

        def serve(request: PageRequest) -> None:
            requests.append([request.offset, request.length])
            lazy.receive_target_pages(
                request.offset, view[request.offset : request.offset + request.length]
            )

        faults = session.start_faults(serve)
        session.start_vcpu("lazy.ram", Workload(Pattern.RANDOM, touches=2000, tag_xor=TAG))
        results = session.vcpus.join(30)
        session.blocks.wait_complete(10)
        faults.stop()
        stats = faults.stats()
        tag_ok = int.from_bytes(big.read(P, 8), "little") == TAG ^ P
        session.close()
        return {
            "placed_before_last": bool(before_last),
            "placed_after_last": after_last,
            "big_stats": vars(big.stats),
            "zero_word": zero_word,
            "tag_ok": tag_ok,
            "requests": sorted(requests),
            "lazy_stats": vars(lazy.stats),
            "mismatches": results[0].mismatches,
            "faults": stats.faults,
        }


@scenario
def huge_pages_unavailable() -> dict[str, Any]:
    """A block whose huge-page size the host lacks fails at once, with a way out."""
    errors = []
    for page_size in (HUGE, 1 << 30):
        try:
            RamSession(
                [BlockSpec("big.ram", 4096 * HUGE if page_size == HUGE else 1 << 30, page_size)]
            ).close()
            errors.append(None)
        except HostSupportError as error:
            errors.append(str(error))
    return {"errors": errors}


@scenario
def shutdown_pending() -> dict[str, Any]:
    """vCPUs wait on pages that never come; close() must release every one, as an error."""
    with RamSession([BlockSpec("pc.ram", 4 * MiB)]) as session:
        faults = session.start_faults(lambda request: None)  # a source that never answers
        for index in range(4):
            session.start_vcpu("pc.ram", Workload(tag_xor=TAG), index * MiB, MiB)
        all_waiting = wait_for(lambda: faults.stats().requests >= 4)
        started = time.monotonic()
        results = session.close()
        return {
            "all_waiting": all_waiting,
            "close_seconds": time.monotonic() - started,
            "results": [
                {"aborted": r.aborted, "mismatches": r.mismatches, "touches": r.touches}
                for r in results
            ],
            "pending": faults.stats().pending,
        }


@scenario
def stray_fault() -> dict[str, Any]:
    """A fault on a registered area that is no block is reported with its address."""
    with RamSession([BlockSpec("pc.ram", 1 * MiB)]) as session:
        assert session.uffd is not None
        outsider = RamBlock("outsider", 1 * MiB)
        outsider.attach(session.uffd)
        reported: list[int] = []
        faults = session.start_faults(on_stray=lambda stray: reported.append(stray.address))
        session.vcpus.start(outsider, Workload(tag_xor=TAG), 2 * P, P)
        seen = wait_for(lambda: bool(reported))
        session.vcpus.abort()
        outsider.detach()
        results = session.close()
        outsider.close()
        return {
            "seen": seen,
            "reported": reported,
            "expected": outsider.host_address + 2 * P,
            "strays": faults.stats().stray_faults,
            "requests": faults.stats().requests,
            "aborted": results[0].aborted,
            "mismatches": results[0].mismatches,
        }


@scenario
def faulting_side_gone() -> dict[str, Any]:
    """ESRCH: the process that owned the area exited; ENOENT: the area was unmapped."""
    parent, child = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # the faulting side: hands its userfaultfd over, as a vhost-user back end does
        parent.close()
        uffd = Userfaultfd()
        error = ffi.new("int *")
        address = int(lib.qmig_map_anon(MiB, 0, error))
        uffd.register(address, MiB)
        socket.send_fds(child, [address.to_bytes(8, "little")], [uffd.fd])
        child.recv(1)
        os._exit(0)
    child.close()
    message, fds, _, _ = socket.recv_fds(parent, 8, 1)
    address = int.from_bytes(message, "little")
    parent.send(b"x")
    os.waitpid(pid, 0)
    page = ffi.new("char[]", P)
    gone = []
    with Userfaultfd() as mine:
        mine.fd, foreign = fds[0], mine.fd
        try:
            mine.copy(address, int(ffi.cast("uintptr_t", page)), P)
            gone.append(None)
        except FaultingSideGoneError as error:
            gone.append(str(error))
        os.close(mine.fd)
        mine.fd = foreign
        block = RamBlock("pc.ram", MiB)
        block.attach(mine)
        block.detach()
        lib.qmig_unmap(block.host_address, MiB)
        block.uffd = mine
        try:
            block.receive_target_page(0, bytes(P))
            gone.append(None)
        except FaultingSideGoneError as error:
            gone.append(str(error))
    return {"gone": gone}


@scenario
def gil_trap() -> dict[str, Any]:
    """What the read guard prevents: Python touching a missing page with the GIL held. The
    fault thread can never run, so this freezes; the harness must kill it."""
    with RamSession([BlockSpec("pc.ram", 1 * MiB)]) as session:
        block = session.block("pc.ram")
        session.start_faults(lambda request: block.receive_zero(request.offset, request.length))
        print("touching", flush=True, file=sys.stderr)
        raw = ffi.buffer(ffi.cast("char *", block.host_address), P)
        return {"byte": raw[0:1].hex()}


@scenario
def read_guard() -> dict[str, Any]:
    with RamSession([BlockSpec("pc.ram", 1 * MiB)]) as session:
        block = session.block("pc.ram")
        refused = []
        for attempt in (lambda: block.read(0, 8), block.digest, lambda: block.read(4090, 10)):
            try:
                attempt()
                refused.append(None)
            except RamError as error:
                refused.append(str(error))
        block.receive_zero(0, P)
        allowed = block.read(0, 8).hex()
        return {"refused": refused, "allowed": allowed}


@scenario
def mlocked() -> dict[str, Any]:
    """A process under mlockall(MCL_CURRENT | MCL_FUTURE) still gets faults: the session
    unlocks before mapping its blocks and locks again at the end."""
    if lib.qmig_mlockall(lib.MCL_CURRENT | lib.MCL_FUTURE) < 0:
        return {"skip": "mlockall is not permitted here (needs CAP_IPC_LOCK or RLIMIT_MEMLOCK)"}
    locked_before = memory_locked_bytes()
    size = 2 * MiB
    source = tagged_pages(0, size, TAG)
    with RamSession([BlockSpec("pc.ram", size)]) as session:
        block = session.block("pc.ram")
        locked_during = memory_locked_bytes()
        resident = int(lib.qmig_resident_pages(block.host_address, size))
        faults = session.start_faults(serve_from(session, source))
        session.start_vcpu("pc.ram", Workload(tag_xor=TAG))
        results = session.vcpus.join(30)
        served = faults.stats().faults
        session.close()
    return {
        "locked_before": locked_before,
        "locked_during": locked_during,
        "resident_at_start": resident,
        "faults": served,
        "pages": size // P,
        "mismatches": results[0].mismatches,
        "locked_after": memory_locked_bytes(),
    }


@scenario
def workloads() -> dict[str, Any]:
    size = 4 * MiB
    source = tagged_pages(0, size, TAG)
    with RamSession([BlockSpec("pc.ram", size)]) as session:
        block = session.block("pc.ram")
        block.receive_target_pages(0, source)
        kinds = {
            "sequential": Workload(tag_xor=TAG, touches=3000),
            "random": Workload(Pattern.RANDOM, tag_xor=TAG, touches=3000, seed=7),
            "hotset": Workload(Pattern.HOTSET, tag_xor=TAG, touches=3000, hot_fraction=0.01),
            "readwrite": Workload(write=True, tag_xor=TAG, touches=1024),
            "dirtier": Workload.dirtier(rate=2000, touches=200),
        }
        out: dict[str, Any] = {}
        for name, workload in kinds.items():
            session.vcpus.threads.clear()
            session.start_vcpu("pc.ram", workload)
            (result,) = session.vcpus.join(30)
            out[name] = {
                "touches": result.touches,
                "mismatches": result.mismatches,
                "seconds": result.elapsed_ns / 1e9,
            }
        out["dirtied_word"] = int.from_bytes(block.read(P + 8, 8), "little")
        return out


# --- batched placement (RamBlock.place_records) ------------------------------------------

PAGE_FLAG = 0x08  # QEMU's RAM_SAVE_FLAG_PAGE
ZERO_FLAG = 0x02  # RAM_SAVE_FLAG_ZERO: a page filled with one byte
CONTINUE = 0x20
Body = bytes | int  # 4 KiB of data, or a fill byte


class Records:
    """Records laid out as on the wire (be64 header, then the body), with their header and
    body-offset arrays, as the stream reader hands them over; offsets absolute from ``base``."""

    def __init__(self, records: Sequence[tuple[int, Body]], base: int = 12345) -> None:
        buffer = bytearray()
        self.headers = array("Q")
        self.bodies = array("Q")
        for offset, body in records:
            header = offset | CONTINUE | (ZERO_FLAG if isinstance(body, int) else PAGE_FLAG)
            buffer += header.to_bytes(8, "big")
            self.headers.append(header)
            self.bodies.append(base + len(buffer))
            buffer += bytes([body]) if isinstance(body, int) else body
        self.data = memoryview(buffer)
        self.base = base

    def place(self, block: RamBlock, *, replace: bool = False) -> Any:
        return block.place_records(
            self.headers, self.bodies, self.data, self.base, PAGE_FLAG, replace=replace
        )


def place_one_by_one(block: RamBlock, records: Sequence[tuple[int, Body]], replace: bool) -> None:
    """The per-page path the destination runner used before the batched one."""
    for offset, body in records:
        if replace and block.is_received(offset):
            block.discard(offset, TARGET_PAGE_SIZE)
        if body == 0:
            block.receive_zero(offset)
        elif isinstance(body, int):
            block.receive_target_pages(offset, bytes([body]) * TARGET_PAGE_SIZE)
        else:
            block.receive_target_pages(offset, body)


def page_of(value: int) -> bytes:
    return value.to_bytes(8, "little") * (TARGET_PAGE_SIZE // 8)


def apply_model(
    model: dict[int, bytes], records: Sequence[tuple[int, Body]], replace: bool, per: int = 1
) -> None:
    """What memory must hold: a page already in place stays unless replaced (host pages of
    ``per`` target pages count as in place once all their target pages are)."""
    for offset, body in records:
        data = bytes([body]) * TARGET_PAGE_SIZE if isinstance(body, int) else bytes(body)
        host = offset - offset % (per * TARGET_PAGE_SIZE)
        in_place = all(host + k * TARGET_PAGE_SIZE in model for k in range(per))
        if replace or not in_place:
            model[offset] = data


def compare(blocks: list[RamBlock], model: dict[int, bytes]) -> dict[str, Any]:
    bitmaps = [bytes(block.received._bytes) for block in blocks]
    received = [
        [bit * TARGET_PAGE_SIZE for bit in range(block.target_pages) if block.received.test(bit)]
        for block in blocks
    ]
    wrong = [
        [off for off in received[index] if block.read(off, TARGET_PAGE_SIZE) != model.get(off)]
        for index, block in enumerate(blocks)
    ]
    return {
        "bitmaps_equal": all(bitmap == bitmaps[0] for bitmap in bitmaps),
        "received_is_model": all(sorted(model) == pages for pages in received),
        "wrong_pages": wrong,
    }


@scenario
def batched_agrees() -> dict[str, Any]:
    """The batched path and the per-page path, fed the same records, end with the same bitmap
    and memory, and both match a model: coalesced runs, zero and fill pages, duplicates
    within a run and across runs, EEXIST from a page placed behind the bitmap's back,
    discard then re-send, and precopy-style replacement."""
    size = 2 * MiB
    with RamSession([BlockSpec("a.ram", size), BlockSpec("b.ram", size)]) as session:
        one, batched = session.block("a.ram"), session.block("b.ram")
        uffd = session.uffd
        assert uffd is not None
        model: dict[int, bytes] = {}
        ioctls = []

        def both(records: Sequence[tuple[int, Body]], replace: bool = False) -> None:
            place_one_by_one(one, records, replace)
            ioctls.append(Records(records).place(batched, replace=replace).ioctls)
            apply_model(model, records, replace)

        P = TARGET_PAGE_SIZE
        both(
            [(k * P, page_of(k + 1)) for k in range(64)]  # one run: one UFFDIO_COPY
            + [(k * P, 0) for k in range(64, 96)]  # one UFFDIO_ZEROPAGE
            + [(k * P, 0x5A) for k in range(96, 100)]  # fill pages join a copy run
            + [(200 * P, page_of(200)), (202 * P, page_of(202)), (201 * P, page_of(201))]
            + [(5 * P, page_of(0xBAD))]  # a duplicate of a page placed above
            + [(400 * P, page_of(400)), (400 * P, page_of(0xBAD))]  # twice in one run
        )
        # EEXIST: page 450 is put in place behind the bitmap's back (as by another placer).
        behind = page_of(0xE1)
        source = ffi.from_buffer(behind)
        for block in (one, batched):
            uffd.copy(block.host_address + 450 * P, int(ffi.cast("uintptr_t", source)), P)
        model[450 * P] = behind
        both([(k * P, page_of(0xE2)) for k in range(449, 452)])
        # Discarded pages come again and are placed again.
        for block in (one, batched):
            block.discard(0, 16 * P)
        for k in range(16):
            del model[k * P]
        both([(k * P, page_of(0xD0 + k)) for k in range(16)])
        # Precopy re-sends after registration: the new contents replace the old.
        both([(k * P, page_of(0xF0)) for k in range(62, 68)], replace=True)
        found = compare([one, batched], model)
        try:
            Records([(size, page_of(1))]).place(batched)
            range_error = None
        except RamError as error:
            range_error = str(error)
        return {
            **found,
            "ioctls": ioctls,
            "stats": vars(batched.stats),
            "range_error": range_error,
        }


@scenario
def batched_huge() -> dict[str, Any]:
    """Huge-page blocks: target pages are gathered, across calls, into whole host pages."""
    free = huge_page_sizes().get(HUGE, (0, 0))[1]
    if free < 4:
        return {"skip": f"needs 4 free 2 MiB huge pages, {free} free"}
    P, per = TARGET_PAGE_SIZE, HUGE // TARGET_PAGE_SIZE
    with RamSession([BlockSpec("a.ram", 2 * HUGE, HUGE), BlockSpec("b.ram", 2 * HUGE, HUGE)]) as s:
        one, batched = s.block("a.ram"), s.block("b.ram")
        model: dict[int, bytes] = {}
        steps: list[bool] = []

        def both(records: Sequence[tuple[int, Body]]) -> None:
            place_one_by_one(one, records, False)
            Records(records).place(batched)
            apply_model(model, records, False, per)

        page0: list[tuple[int, Body]] = [(k * P, page_of(k + 7)) for k in range(per)]
        page0[300:310] = [(k * P, 0) for k in range(300, 310)]
        page0[400:402] = [(k * P, 0x11) for k in range(400, 402)]
        both(page0[:299])  # most of host page 0: nothing is placed yet
        steps.append(batched.is_received(0) or bool(batched.stats.placed_pages))
        both(page0[299:])  # the rest, in another call: placed whole
        steps.append(batched.is_received(0, HUGE))
        both([(HUGE + k * P, 0) for k in range(per)])  # host page 1, all zero: copied zeros
        both([(k * P, page_of(0xBAD)) for k in range(3)])  # host page 0 again: duplicates
        # Interleaved host pages are refused, as QEMU refuses them; the first carries on.
        for block in (one, batched):
            block.discard(0, 2 * HUGE)
        model.clear()
        errors = []
        for block in (one, batched):
            block.receive_target_pages(HUGE, page_of(1))
            try:
                block.receive_target_pages(0, page_of(2))
            except RamError as error:
                errors.append(str(error))
        model[HUGE] = page_of(1)
        both([(HUGE + k * P, page_of(k)) for k in range(1, per)])
        both([(k * P, page_of(k + 3)) for k in range(per)])
        found = compare([one, batched], model)
        return {**found, "steps": steps, "errors": errors, "stats": vars(batched.stats)}


@scenario
def listen_registration() -> dict[str, Any]:
    """Registered at LISTEN: precopy pages are written directly (re-sends overwrite), a
    discard drops pages, registration drops populated pages that hold nothing received, and
    from then on exactly the pages not received fault, and are served."""
    size = 8 * MiB
    P = TARGET_PAGE_SIZE
    source = tagged_pages(0, size, TAG)
    view = memoryview(source)
    never = set(range(256, 384)) | set(range(1000, 2048, 37))  # never sent in precopy
    zeros = set(range(600, 640))
    with RamSession([BlockSpec("pc.ram", size)], register=False) as session:
        block = session.block("pc.ram")
        block.set_thp(True)  # THP may fill whole 2 MiB areas around the pages written
        discarded = set(range(3 * MiB // P, (3 * MiB + 256 * 1024) // P))
        precopy: list[tuple[int, Body]] = [
            (
                k * P,
                0
                if k in zeros
                else page_of(0xBAD)
                if k in discarded
                else view[k * P : (k + 1) * P],
            )
            for k in range(size // P)
            if k not in never
        ]
        # Sent once, then changed: page 10 comes again with data, page 600 as a zero page,
        # which must clear what is there although zero pages skip memory that is zero.
        Records([(10 * P, page_of(0xBAD)), (600 * P, page_of(0xBAD))]).place(block)
        Records(precopy).place(block)
        overwritten = block.read(10 * P, 8) == bytes(view[10 * P : 10 * P + 8])
        written = block.stats.written_pages
        registered_before = block.registered
        session.discard("pc.ram", 3 * MiB, 256 * 1024)  # changed after it was sent
        resident_never = sum(lib.qmig_resident_pages(block.host_address + k * P, P) for k in never)
        session.register()
        resident_after = sum(lib.qmig_resident_pages(block.host_address + k * P, P) for k in never)
        results, complete, stats = read_all_served(session, source)
        expected = {k * P: bytes(view[k * P : (k + 1) * P]) for k in range(size // P)}
        for k in zeros - discarded:
            expected[k * P] = bytes(P)
        wrong = [off for off in range(0, size, P) if block.read(off, P) != expected[off]]
        session.close()
        return {
            "registered_before": registered_before,
            "written": written,
            "precopy_records": len(precopy) + 2,
            "overwritten": overwritten,
            "resident_never_before": resident_never,
            "resident_never_after": resident_after,
            "faults": stats.faults,
            "requests": stats.requests,
            "expected_faults": len(never | discarded),
            "complete": complete,
            "wrong": wrong[:10],
            "aborted": results[0].aborted,
            "touches": results[0].touches,
        }


@scenario
def huge_precopy() -> dict[str, Any]:
    """Huge-page blocks before registration: each record is written directly, one target page
    at a time (a re-send overwrites); after registration only the host page never sent
    faults, and is served whole."""
    free = huge_page_sizes().get(HUGE, (0, 0))[1]
    if free < 2:
        return {"skip": f"needs 2 free 2 MiB huge pages, {free} free"}
    P, per = TARGET_PAGE_SIZE, HUGE // TARGET_PAGE_SIZE
    size = 2 * HUGE
    source = tagged_pages(0, size, TAG)
    view = memoryview(source)
    fills = {k: 0 for k in range(100, 110)} | {200: 0x11}
    records: list[tuple[int, Body]] = [
        (k * P, fills[k] if k in fills else view[k * P : (k + 1) * P]) for k in range(per)
    ]
    with RamSession([BlockSpec("pc.ram", size, HUGE)], register=False) as session:
        block = session.block("pc.ram")
        Records([(5 * P, page_of(0xBAD)), (101 * P, page_of(0xBAD))]).place(block)
        Records(records).place(block)
        written = block.stats.written_pages
        received_before = block.is_received(0, HUGE)
        session.register()
        results, complete, stats = read_all_served(session, source)
        expected = {k * P: bytes(view[k * P : (k + 1) * P]) for k in range(size // P)}
        expected |= {k * P: bytes([fill]) * P for k, fill in fills.items()}
        wrong = [off for off in range(0, size, P) if block.read(off, P) != expected[off]]
        session.close()
        return {
            "written": written,
            "records": len(records) + 2,
            "received_before": received_before,
            "requests": stats.requests,
            "complete": complete,
            "wrong": wrong[:10],
            "aborted": results[0].aborted,
        }


@scenario
def huge_zero_precopy() -> dict[str, Any]:
    """Precopy with THP on, as the destination runner leaves it until the first discard: zero
    pages cost no memory (the huge zero page maps them, 2 MiB at a time), data pages cost one
    4 KiB page each and never a huge page, and after registration only the pages never
    received fault."""
    size = 16 * HUGE
    P = TARGET_PAGE_SIZE
    per = HUGE // P
    data_pages = {per * 1 + 5, per * 1 + 300, per * 2 + 17, per * 3 + 511} | {
        per * 4 + k for k in range(0, per, 64)
    }
    never = {per * 15 + k for k in range(per)}  # one region never sent
    source = tagged_pages(0, size, TAG)
    view = memoryview(source)
    records: list[tuple[int, Body]] = [
        (k * P, view[k * P : (k + 1) * P] if k in data_pages else 0)
        for k in range(size // P)
        if k not in never
    ]
    with RamSession([BlockSpec("pc.ram", size)], register=False) as session:
        block = session.block("pc.ram")
        block.set_thp(True)
        huge_zero = block.maps_huge_zero_page
        for at in range(0, len(records), 100):  # in pieces, as sections come
            Records(records[at : at + 100]).place(block)
        rss_kib = smaps_kib(block.host_address, "Rss")
        anon_huge_kib = smaps_kib(block.host_address, "AnonHugePages")
        received = [k for k in range(size // P) if k not in never]
        mapped = sum(lib.qmig_resident_pages(block.host_address + k * P, P) for k in received)
        session.register()
        results, complete, stats = read_all_served(session, source)
        expected = {
            k * P: bytes(view[k * P : (k + 1) * P]) if k in data_pages | never else bytes(P)
            for k in range(size // P)
        }
        wrong = [off for off in range(0, size, P) if block.read(off, P) != expected[off]]
        session.close()
        return {
            "huge_zero": huge_zero,
            "data_pages": len(data_pages),
            "rss_kib": rss_kib,
            "anon_huge_kib": anon_huge_kib,
            "received": len(received),
            "mapped": mapped,
            "requests": stats.requests,
            "never": len(never),
            "complete": complete,
            "wrong": wrong[:10],
            "aborted": results[0].aborted,
        }


@scenario
def data_runs() -> dict[str, Any]:
    """Registered, with data runs limited: one UFFDIO_COPY per data page, zero pages still
    coalesced; unlimited, one ioctl per run of each kind. The pages are the same either way."""
    P = TARGET_PAGE_SIZE
    records: list[tuple[int, Body]] = [(k * P, page_of(k + 1)) for k in range(8)]
    records += [(k * P, 0) for k in range(8, 24)]
    found: dict[str, Any] = {}
    for limit in (1, 0):
        with RamSession([BlockSpec("pc.ram", 1 * MiB)]) as session:
            block = session.block("pc.ram")
            block.limit_data_runs(limit)
            result = Records(records).place(block)
            found[f"ioctls_{limit}"] = result.ioctls
            found[f"placed_{limit}"] = result.placed
            found[f"right_{limit}"] = all(
                block.read(k * P, P) == (page_of(k + 1) if k < 8 else bytes(P)) for k in range(24)
            )
    return found


@scenario
def c_served() -> dict[str, Any]:
    """The fault thread serving from in-process sources in C: vCPUs on a 4 KiB and a huge-page
    block, a background stream placing pages at the same time, then a stray fault."""
    size = 8 * MiB
    source = tagged_pages(0, size, TAG)
    specs = [BlockSpec("pc.ram", size)]
    huge = huge_page_sizes().get(HUGE, (0, 0))[1] >= 2
    if huge:
        specs.append(BlockSpec("big.ram", 2 * HUGE, HUGE))
    with RamSession(specs) as session:
        block = session.block("pc.ram")
        assert session.uffd is not None
        sources = {"pc.ram": source, "big.ram": tagged_pages(0, 2 * HUGE, TAG)}
        reported: list[int] = []
        faults = session.start_faults(
            on_stray=lambda stray: reported.append(stray.address),
            sources={spec.idstr: sources[spec.idstr] for spec in specs},
        )
        for index in range(2):
            session.start_vcpu("pc.ram", Workload(tag_xor=TAG), index * size // 2, size // 2)
        if huge:
            session.start_vcpu("big.ram", Workload(Pattern.RANDOM, touches=3000, tag_xor=TAG))
        stream = 0
        for offset in range(size - 2 * MiB, size, 64 * TARGET_PAGE_SIZE):  # meanwhile
            stream += block.receive_target_pages(
                offset, memoryview(source)[offset : offset + 64 * TARGET_PAGE_SIZE]
            ).placed
        results = session.vcpus.join(30)
        complete = session.blocks.wait_complete(10)
        outsider = RamBlock("outsider", 1 * MiB)
        outsider.attach(session.uffd)
        session.vcpus.threads.clear()
        session.vcpus.start(outsider, Workload(), 2 * P, P)
        seen = wait_for(lambda: bool(reported))
        session.vcpus.abort()
        outsider.detach()
        faults.stop()
        stats = faults.stats()
        placed = {spec.idstr: session.block(spec.idstr).stats.placed_pages for spec in specs}
        session.close()
        outsider.close()
        return {
            "pages": size // TARGET_PAGE_SIZE,
            "huge": huge,
            "complete": complete,
            "stream": stream,
            "placed": placed,
            "faults": stats.faults,
            "requests": stats.requests,
            "late": stats.late_faults,
            "strays": stats.stray_faults,
            "latencies": stats.latency.count,
            "p50": stats.latency.p50_ns,
            "threads": len(stats.blocktime_ns_by_thread),
            "mismatches": sum(r.mismatches for r in results),
            "aborted": sum(r.aborted for r in results),
            "stray_seen": seen and reported == [outsider.host_address + 2 * P],
        }


@scenario
def separate_process() -> dict[str, Any]:
    """The fault handler in another process: the owner registers its block and hands the
    userfaultfd over a UNIX socket (SCM_RIGHTS); the handler serves every fault from there."""
    size = 8 * MiB
    owner, handler = socket.socketpair()
    pid = os.fork()  # before the owner opens its userfaultfd: the child has no copy of it
    if pid == 0:
        owner.close()
        try:
            handed = HandedOver.receive(handler)
            faults = handed.serve({"pc.ram": tagged_pages(0, size, TAG)})
            handler.recv(1)  # the owner's vCPUs are done
            faults.stop()
            stats = faults.stats()
            block = handed.blocks["pc.ram"]
            try:
                block.read(0, 8)
                refused = None
            except RamError as error:
                refused = str(error)
            report = {
                "faults": stats.faults,
                "requests": stats.requests,
                "placed": block.stats.placed_pages,
                "complete": block.complete,
                "p50": stats.latency.p50_ns,
                "threads": sorted(stats.blocktime_ns_by_thread),
                "read_refused": refused,
                "opened_via": handed.uffd.opened_via,
            }
            handed.close()
            handler.sendall(json.dumps(report).encode())
        finally:
            os._exit(0)
    handler.close()
    with RamSession([BlockSpec("pc.ram", size)]) as session:
        assert session.uffd is not None
        send_userfaultfd(owner, session.uffd, session.blocks)
        for index in range(2):
            session.start_vcpu("pc.ram", Workload(tag_xor=TAG), index * size // 2, size // 2)
        results = session.vcpus.join(30)
        owner.sendall(b"x")
        found = json.loads(owner.recv(1 << 16))
        os.waitpid(pid, 0)
        session.close()
    return {
        "handler": found,
        "pages": size // TARGET_PAGE_SIZE,
        "vcpu_tids": sorted(r.thread_id for r in results),
        "mismatches": sum(r.mismatches for r in results),
        "aborted": sum(r.aborted for r in results),
        "touches": sum(r.touches for r in results),
    }


def main() -> None:
    name = sys.argv[1]
    try:
        found = SCENARIOS[name]()
    except HostSupportError as error:
        found = {"skip": str(error)}
    except QmigError as error:
        found = {"error": str(error)}
    print(json.dumps(found))
    sys.stdout.flush()
    os._exit(0)  # do not wait on daemon threads a failed scenario may have left behind


if __name__ == "__main__":
    main()
