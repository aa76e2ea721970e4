"""A thin, typed binding of Linux userfaultfd over the cffi module ``qmig.ram._uffd``.

Opening follows the kernel's two doors: the ``userfaultfd`` syscall, then ``/dev/userfaultfd``
(USERFAULTFD_IOC_NEW) when the syscall is refused (``vm.unprivileged_userfaultfd=0`` without
CAP_SYS_PTRACE, or a seccomp filter). UFFDIO_API can be done once per descriptor, so the set of
features the kernel offers is learnt from a throwaway descriptor (:func:`probe`) before the real
one asks for the subset it wants.

Placement results separate the outcomes that matter in practice: EEXIST means the page was
already there (a duplicate arrival, counted, not an error), EAGAIN is retried in C, and
ENOENT/ESRCH mean the faulting side went away (:class:`FaultingSideGoneError`).
"""

from __future__ import annotations

import errno
import os
import threading
from dataclasses import dataclass
from typing import Any, NamedTuple

from qmig.errors import HostSupportError
from qmig.ram._uffd import ffi, lib
from qmig.ram.errors import FaultingSideGoneError, UffdCallError
from qmig.wire.profiles import target_page_size

FEATURE_NAMES = {
    1 << 0: "PAGEFAULT_FLAG_WP",
    1 << 1: "EVENT_FORK",
    1 << 2: "EVENT_REMAP",
    1 << 3: "EVENT_REMOVE",
    1 << 4: "MISSING_HUGETLBFS",
    1 << 5: "MISSING_SHMEM",
    1 << 6: "EVENT_UNMAP",
    1 << 7: "SIGBUS",
    1 << 8: "THREAD_ID",
    1 << 9: "MINOR_HUGETLBFS",
    1 << 10: "MINOR_SHMEM",
    1 << 11: "EXACT_ADDRESS",
    1 << 12: "WP_HUGETLBFS_SHMEM",
    1 << 13: "WP_UNPOPULATED",
    1 << 14: "POISON",
    1 << 15: "WP_ASYNC",
    1 << 16: "MOVE",
}
FEATURE_THREAD_ID = 1 << 8
FEATURE_MISSING_HUGETLBFS = 1 << 4
FEATURE_SIGBUS = 1 << 7

IOCTL_NAMES = {
    lib._UFFDIO_REGISTER: "REGISTER",
    lib._UFFDIO_UNREGISTER: "UNREGISTER",
    lib._UFFDIO_WAKE: "WAKE",
    lib._UFFDIO_COPY: "COPY",
    lib._UFFDIO_ZEROPAGE: "ZEROPAGE",
    6: "WRITEPROTECT",
    7: "CONTINUE",
    8: "POISON",
    9: "MOVE",
    lib._UFFDIO_API: "API",
}
# What postcopy needs: on the descriptor, and on every registered range.
REQUIRED_API_IOCTLS = ("REGISTER", "UNREGISTER")
REQUIRED_RANGE_IOCTLS = ("WAKE", "COPY", "ZEROPAGE")
# Huge-page ranges never offer ZEROPAGE; their zero pages are copied from a zeroed buffer.
REQUIRED_HUGE_RANGE_IOCTLS = ("WAKE", "COPY")

MODE_MISSING = lib.UFFDIO_REGISTER_MODE_MISSING
COPY_DONTWAKE = lib.UFFDIO_COPY_MODE_DONTWAKE
EVENT_PAGEFAULT = lib.UFFD_EVENT_PAGEFAULT
# The messages other than page faults, each only with the feature that asks for it (qmig
# asks for none; a descriptor handed over by another process may have).
EVENT_NAMES = {
    lib.UFFD_EVENT_PAGEFAULT: "PAGEFAULT",
    lib.UFFD_EVENT_FORK: "FORK",
    lib.UFFD_EVENT_REMAP: "REMAP",
    lib.UFFD_EVENT_REMOVE: "REMOVE",
    lib.UFFD_EVENT_UNMAP: "UNMAP",
}
FEATURE_EVENT_REMOVE = 1 << 3
FLAG_WRITE = lib.UFFD_PAGEFAULT_FLAG_WRITE

_OPEN_FLAGS = os.O_CLOEXEC | os.O_NONBLOCK
# The size of the pages a stream carries, as QEMU's targets define it: the C code takes it from
# here (struct qmig_block's target_page), never builds it in.
TARGET_PAGE_SIZE = target_page_size()
# Pages per placing ioctl (the C scratch buffer's size): 2 MiB of 4 KiB pages. Larger runs gain
# little throughput and hold the mm's lock longer, which is time a faulting vCPU waits.
MAX_RUN_PAGES = int(lib.QMIG_SCRATCH_PAGES)
_GONE = (errno.ENOENT, errno.ESRCH)
ACCESS_HINT = "run as root, grant access to /dev/userfaultfd, or set vm.unprivileged_userfaultfd=1"


def name_this_thread() -> None:
    """Give the calling thread's Python name to its OS thread, which ps, top and perf show
    (and a user renices or pins it by)."""
    lib.qmig_name_thread(threading.current_thread().name.encode())


def event_name(event: int) -> str:
    """UFFD_EVENT_REMOVE and the like, or the number of one this kernel header lacked."""
    return f"UFFD_EVENT_{EVENT_NAMES.get(event, f'0x{event:x}')}"


def feature_names(mask: int) -> list[str]:
    names = [name for bit, name in FEATURE_NAMES.items() if mask & bit]
    unknown = mask & ~sum(FEATURE_NAMES)
    if unknown:
        names.append(f"0x{unknown:x}")
    return names


def ioctl_names(mask: int) -> list[str]:
    return [name for bit, name in sorted(IOCTL_NAMES.items()) if mask & (1 << bit)]


def _strerror(code: int) -> str:
    return f"{errno.errorcode.get(code, str(code))} ({os.strerror(code)})"


def open_descriptor() -> tuple[int, str]:
    """Open a userfaultfd, returning ``(fd, how)``; how is ``"syscall"`` or the device path."""
    fd = lib.qmig_uffd_open_syscall(_OPEN_FLAGS)
    if fd >= 0:
        return fd, "syscall"
    syscall_error = -fd
    fd = lib.qmig_uffd_open_dev(_OPEN_FLAGS)
    if fd >= 0:
        return fd, "/dev/userfaultfd"
    device_error = -fd
    if syscall_error == errno.ENOSYS and device_error == errno.ENOENT:
        reason = (
            "the kernel has no userfaultfd (needs Linux 4.3 or later built with "
            "CONFIG_USERFAULTFD; use a newer kernel)"
        )
    else:
        reason = (
            f"the userfaultfd syscall was refused with {_strerror(syscall_error)} and "
            f"/dev/userfaultfd with {_strerror(device_error)} ({ACCESS_HINT})"
        )
    raise HostSupportError("userfaultfd", f"not available: {reason}")


@dataclass(frozen=True)
class ApiInfo:
    """What UFFDIO_API answered: the features (offered or enabled) and descriptor ioctls."""

    features: int
    ioctls: int

    @property
    def feature_list(self) -> list[str]:
        return feature_names(self.features)

    @property
    def ioctl_list(self) -> list[str]:
        return ioctl_names(self.ioctls)


def _handshake(fd: int, features: int) -> ApiInfo:
    out_features = ffi.new("uint64_t *")
    out_ioctls = ffi.new("uint64_t *")
    ret = lib.qmig_uffd_api(fd, features, out_features, out_ioctls)
    if ret < 0:
        raise HostSupportError(
            "userfaultfd",
            f"API handshake failed: {_strerror(-ret)} (kernel too old for the requested "
            f"features {feature_names(features)}; use a newer kernel)",
        )
    return ApiInfo(int(out_features[0]), int(out_ioctls[0]))


def probe() -> ApiInfo:
    """The features and ioctls the kernel offers, learnt on a throwaway descriptor."""
    fd, _ = open_descriptor()
    try:
        return _handshake(fd, 0)
    finally:
        os.close(fd)


def missing(names: tuple[str, ...], mask: int) -> list[str]:
    present = set(ioctl_names(mask))
    return [name for name in names if name not in present]


class PlaceResult(NamedTuple):
    """Pages placed by one call, and pages that were already there (duplicates).

    A named tuple rather than a dataclass: one is made per placement, on the hot path."""

    placed: int
    existing: int
    t_ns: int


class FaultMessage(NamedTuple):
    """One UFFD_EVENT_PAGEFAULT (or other event) as read from the descriptor."""

    address: int
    flags: int
    thread_id: int
    read_ns: int  # CLOCK_MONOTONIC right after read()
    event: int
    end: int = 0  # not a page fault: the event's range is [address, end)


class Userfaultfd:
    """An open, handshaken userfaultfd. Close it with :meth:`close` (or use ``with``)."""

    def __init__(self, *, want_features: int = FEATURE_THREAD_ID, need_features: int = 0) -> None:
        offered = probe()
        lacking = need_features & ~offered.features
        if lacking:
            raise HostSupportError(
                "userfaultfd",
                f"missing userfault features: {', '.join(feature_names(lacking))} "
                "(use a newer kernel)",
            )
        lacking_ioctls = missing(REQUIRED_API_IOCTLS, offered.ioctls)
        if lacking_ioctls:
            raise HostSupportError(
                "userfaultfd",
                f"missing userfault ioctls: {', '.join(lacking_ioctls)} (use a newer kernel)",
            )
        self.offered = offered
        self.fd, self.opened_via = open_descriptor()
        try:
            self.api = _handshake(self.fd, (want_features & offered.features) | need_features)
        except BaseException:
            os.close(self.fd)
            raise
        self.enabled_features = (want_features & offered.features) | need_features

    @classmethod
    def adopt(cls, fd: int, enabled_features: int = 0) -> Userfaultfd:
        """A descriptor another process opened, handshook and registered, then handed over."""
        uffd = cls.__new__(cls)
        uffd.fd = fd
        uffd.opened_via = "handed over"
        uffd.offered = ApiInfo(enabled_features, 0)
        uffd.api = ApiInfo(enabled_features, 0)
        uffd.enabled_features = enabled_features
        return uffd

    @property
    def closed(self) -> bool:
        return self.fd < 0

    @property
    def has_thread_id(self) -> bool:
        return bool(self.enabled_features & FEATURE_THREAD_ID)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Userfaultfd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def register(self, start: int, length: int) -> int:
        """Register ``[start, start+length)`` in MISSING mode; returns the range's ioctl mask."""
        out = ffi.new("uint64_t *")
        ret = lib.qmig_uffd_register(self.fd, start, length, MODE_MISSING, out)
        if ret < 0:
            raise UffdCallError("REGISTER", -ret, f"{_strerror(-ret)} for 0x{start:x}+0x{length:x}")
        return int(out[0])

    def unregister(self, start: int, length: int) -> None:
        ret = lib.qmig_uffd_unregister(self.fd, start, length)
        if ret < 0:
            raise UffdCallError("UNREGISTER", -ret, _strerror(-ret))

    def wake(self, start: int, length: int) -> None:
        ret = lib.qmig_uffd_wake(self.fd, start, length)
        if ret < 0:
            raise UffdCallError("WAKE", -ret, _strerror(-ret))

    def read_faults(self, timeout_ms: int = 0, limit: int = 64) -> list[FaultMessage]:
        """Up to ``limit`` (at most 64) pending messages in one read(), waiting at most
        ``timeout_ms`` (-1: forever) for the first."""
        messages = ffi.new("struct qmig_fault[]", limit)
        quit_flag = ffi.new("int *")
        count = lib.qmig_fault_wait(self.fd, -1, timeout_ms, messages, limit, quit_flag)
        if count < 0:
            raise UffdCallError("read", -count, _strerror(-count))
        return [
            FaultMessage(m.address, m.flags, m.tid, m.t_ns, m.event, m.end)
            for m in (messages[index] for index in range(count))
        ]

    def copy(self, dst: int, src: int, length: int, *, wake: bool = True) -> bool:
        """One UFFDIO_COPY of whole pages. True if placed, False if already there (EEXIST)."""
        return self._single("COPY", dst, src, length, zeropage=False, wake=wake)

    def zeropage(self, dst: int, length: int, *, wake: bool = True) -> bool:
        """One UFFDIO_ZEROPAGE. True if placed, False if already there (EEXIST)."""
        return self._single("ZEROPAGE", dst, 0, length, zeropage=True, wake=wake)

    def _single(
        self, call: str, dst: int, src: int, length: int, *, zeropage: bool, wake: bool
    ) -> bool:
        mode = 0 if wake else COPY_DONTWAKE
        copied = ffi.new("int64_t *")
        while True:
            if zeropage:
                ret = lib.qmig_uffd_zeropage(self.fd, dst, length, mode, copied)
            else:
                ret = lib.qmig_uffd_copy(self.fd, dst, src, length, mode, copied)
            done = int(copied[0])
            if ret == 0 and done == length:
                return True
            if ret == 0 or ret == -errno.EAGAIN:
                dst, src, length = dst + done, src + (0 if zeropage else done), length - done
                continue
            if ret == -errno.EEXIST:
                return False
            raise _placement_error(call, -ret, dst)

    def place(
        self,
        dst: int,
        src: int,
        page_size: int,
        count: int,
        *,
        src_stride: int | None = None,
        max_run: int = MAX_RUN_PAGES,
        zeropage: bool = False,
        wake: bool = True,
        bitmap: Any = ffi.NULL,
        first_bit: int = 0,
        bits_per_page: int = 1,
    ) -> PlaceResult:
        """Place ``count`` pages in one C loop (see ``qmig_place``), honouring EEXIST, with at
        most ``max_run`` pages per ioctl (0: no limit)."""
        stride = page_size if src_stride is None else src_stride
        mode = 0 if wake else COPY_DONTWAKE
        return place_pages(
            self.fd, dst, src, stride, page_size, count, max_run, zeropage, mode, bitmap,
            first_bit, bits_per_page
        )  # fmt: skip


def place_pages(
    fd: int,
    dst: int,
    src: int,
    src_stride: int,
    page_size: int,
    count: int,
    max_run: int,
    zeropage: bool,
    mode: int,
    bitmap: Any,
    first_bit: int,
    bits_per_page: int,
) -> PlaceResult:
    """:meth:`Userfaultfd.place` with every argument positional: the per-page hot path."""
    # Per call, not per descriptor: several threads may place pages at once.
    result = ffi.new("struct qmig_place_result *")
    ret = lib.qmig_place(
        fd, dst, src, src_stride, page_size, count, max_run, zeropage, mode, bitmap, first_bit,
        bits_per_page, result
    )  # fmt: skip
    if ret < 0:
        failed_at = dst + int(result.error_page) * page_size
        raise _placement_error("ZEROPAGE" if zeropage else "COPY", -ret, failed_at)
    return PlaceResult(result.placed, result.existing, result.t_ns)


def _placement_error(call: str, code: int, address: int) -> Exception:
    if code in _GONE:
        return FaultingSideGoneError(
            f"UFFDIO_{call} at 0x{address:x}: {_strerror(code)}: the faulting side went away "
            "(its area was unmapped or its process exited)"
        )
    return UffdCallError(call, code, f"{_strerror(code)} at 0x{address:x}")
