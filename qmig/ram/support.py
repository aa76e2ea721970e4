"""The host-support check run before postcopy, and the mlock dance around it.

:func:`check_host` answers, one row each: can we open a userfaultfd (and how), what does the
API handshake offer, do the ioctls postcopy needs work on a registered test area (a real
COPY, a duplicate COPY that must come back EEXIST, a ZEROPAGE), are there huge pages for every
block page size that differs from the host's, is memory locked, and how transparent huge pages
are set. Nothing here blocks: the test areas are filled with ioctls, never touched while
missing.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from qmig.errors import HostSupportError, QmigError
from qmig.host import HOST_PAGE_SIZE as HOST_PAGE_SIZE  # re-exported
from qmig.ram._uffd import ffi, lib
from qmig.ram.blocks import size_text
from qmig.ram.uffd import (
    FEATURE_MISSING_HUGETLBFS,
    FEATURE_THREAD_ID,
    REQUIRED_API_IOCTLS,
    REQUIRED_HUGE_RANGE_IOCTLS,
    REQUIRED_RANGE_IOCTLS,
    ApiInfo,
    Userfaultfd,
    ioctl_names,
    missing,
    open_descriptor,
    probe,
)
from qmig.sizes import parse_size as parse_size  # the one size parser, for old callers

Status = Literal["ok", "warn", "fail", "skip"]

THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")
HUGEPAGES_SYSFS = Path("/sys/kernel/mm/hugepages")


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class SupportReport:
    checks: list[Check] = field(default_factory=list)
    errors: list[HostSupportError] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def as_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "checks": [asdict(check) for check in self.checks],
            "errors": [error.one_line() for error in self.errors],
        }

    def add(self, name: str, status: Status, detail: str, **data: Any) -> None:
        self.checks.append(Check(name, status, detail, data))

    def fail(self, name: str, error: HostSupportError, **data: Any) -> None:
        self.errors.append(error)
        self.add(name, "fail", error.detail, **data)


def mapping_fields(address: int) -> dict[str, str]:
    """What the kernel says of this process's mapping that holds ``address`` (its
    /proc/self/smaps entry: field name -> text, e.g. "Rss" -> "48 kB"); {} if none does."""
    fields: dict[str, str] = {}
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split(" ", 1)[0]
        if "-" in head and ":" not in head:
            if inside:
                break
            start, end = (int(part, 16) for part in head.split("-"))
            inside = start <= address < end
        elif inside:
            name, _, value = line.partition(":")
            fields[name] = value.strip()
    return fields


def memory_locked_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmLck:"):
            return int(line.split()[1]) * 1024
    return 0


def unlock_memory() -> int:
    """munlockall() if anything is locked; returns the mlockall flags to restore later (0 if
    nothing was locked). A locked mapping is populated up front and would never fault."""
    if memory_locked_bytes() == 0:
        return 0
    ret = lib.qmig_munlockall()
    if ret < 0:
        raise HostSupportError("mlock", f"munlockall failed: {os.strerror(-ret)}")
    return int(lib.MCL_CURRENT | lib.MCL_FUTURE)


def lock_memory_again(flags: int) -> None:
    ret = lib.qmig_mlockall(flags)
    if ret < 0:
        raise HostSupportError("mlock", f"mlockall failed again: {os.strerror(-ret)}")


class _TestArea:
    """A small anonymous mapping, unmapped on exit."""

    def __init__(self, length: int, huge_page_size: int = 0) -> None:
        error = ffi.new("int *")
        self.length = length
        self.address = int(lib.qmig_map_anon(length, huge_page_size, error))
        self.errno = int(error[0])

    def __enter__(self) -> _TestArea:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.address:
            lib.qmig_unmap(self.address, self.length)


def _exercise(uffd: Userfaultfd, page_size: int, huge: bool) -> tuple[int, list[str]]:
    """Register a two-page test area, place pages by COPY and ZEROPAGE (or a zero COPY),
    check EEXIST on a duplicate and the bytes that landed. Returns (range ioctls, problems)."""
    problems: list[str] = []
    with _TestArea(2 * page_size, page_size if huge else 0) as area:
        if not area.address:
            return 0, [f"cannot map a test area: {os.strerror(area.errno)}"]
        resident_before = int(lib.qmig_resident_pages(area.address, area.length))
        ioctls = uffd.register(area.address, area.length)
        required = REQUIRED_HUGE_RANGE_IOCTLS if huge else REQUIRED_RANGE_IOCTLS
        try:
            if missing(required, ioctls):
                return ioctls, []  # the caller names what is missing
            source = ffi.new("char[]", b"\xa5" * page_size)
            src = int(ffi.cast("uintptr_t", source))
            if not uffd.copy(area.address, src, page_size):
                problems.append("UFFDIO_COPY into a missing page said EEXIST")
            if uffd.copy(area.address, src, page_size):
                problems.append("a duplicate UFFDIO_COPY did not say EEXIST")
            if huge:
                zero = ffi.new("char[]", page_size)
                uffd.copy(area.address + page_size, int(ffi.cast("uintptr_t", zero)), page_size)
            else:
                uffd.zeropage(area.address + page_size, page_size)
            uffd.wake(area.address, area.length)
            landed = ffi.buffer(ffi.cast("char *", area.address), 2 * page_size)
            if landed[0:1] != b"\xa5" or landed[page_size : page_size + 1] != b"\x00":
                problems.append("placed pages do not hold the bytes placed")
        finally:
            uffd.unregister(area.address, area.length)
        if resident_before:
            problems.append(f"{resident_before} pages were resident before any was placed")
    return ioctls, problems


def _check_open(report: SupportReport) -> bool:
    sysctl = Path("/proc/sys/vm/unprivileged_userfaultfd")
    unprivileged = sysctl.read_text().strip() if sysctl.exists() else "absent"
    facts = f"euid {os.geteuid()}, vm.unprivileged_userfaultfd={unprivileged}"
    try:
        fd, how = open_descriptor()
    except HostSupportError as error:
        report.fail("userfaultfd", error)
        return False
    os.close(fd)
    report.add("userfaultfd", "ok", f"opened via {how} ({facts})", opened_via=how)
    return True


def _check_api(report: SupportReport) -> ApiInfo | None:
    try:
        offered = probe()
    except HostSupportError as error:
        report.fail("API handshake", error)
        return None
    report.add(
        "API handshake",
        "ok",
        "features offered: " + (", ".join(offered.feature_list) or "none"),
        features=offered.feature_list,
        ioctls=offered.ioctl_list,
    )
    lacking = missing(REQUIRED_API_IOCTLS, offered.ioctls)
    if lacking:
        report.fail(
            "descriptor ioctls",
            HostSupportError(
                "userfaultfd",
                f"missing userfault ioctls: {', '.join(lacking)} (use a newer kernel)",
            ),
        )
        return None
    if offered.features & FEATURE_THREAD_ID:
        report.add("thread ids", "ok", "THREAD_ID offered: faults name their thread")
    else:
        report.add("thread ids", "warn", "THREAD_ID not offered: blocktime is not per vCPU")
    return offered


def _check_ioctls(report: SupportReport) -> None:
    try:
        with Userfaultfd() as uffd:
            ioctls, problems = _exercise(uffd, HOST_PAGE_SIZE, huge=False)
    except QmigError as error:
        report.fail("range ioctls", HostSupportError("userfaultfd", error.one_line()))
        return
    names = ioctl_names(ioctls)
    lacking = missing(REQUIRED_RANGE_IOCTLS, ioctls)
    if lacking:
        report.fail(
            "range ioctls",
            HostSupportError(
                "userfaultfd",
                f"missing userfault ioctls on a registered area: {', '.join(lacking)} "
                "(use a newer kernel)",
            ),
            ioctls=names,
        )
    elif problems:
        report.fail("range ioctls", HostSupportError("userfaultfd", "; ".join(problems)))
    else:
        report.add(
            "range ioctls",
            "ok",
            f"{', '.join(names)} on a registered {HOST_PAGE_SIZE // 1024} KiB test area; "
            "COPY, duplicate COPY (EEXIST) and ZEROPAGE behave",
            ioctls=names,
        )


def huge_page_sizes() -> dict[int, tuple[int, int]]:
    """Huge-page sizes the kernel offers, each with (total, free) pages."""
    sizes: dict[int, tuple[int, int]] = {}
    if HUGEPAGES_SYSFS.is_dir():
        for directory in sorted(HUGEPAGES_SYSFS.iterdir()):
            size = int(directory.name.removeprefix("hugepages-").removesuffix("kB")) * 1024
            total = int((directory / "nr_hugepages").read_text())
            free = int((directory / "free_hugepages").read_text())
            sizes[size] = (total, free)
    return sizes


def _check_huge(report: SupportReport, page_size: int, offered: ApiInfo) -> None:
    name = f"huge pages {size_text(page_size)}"
    sizes = huge_page_sizes()
    if page_size not in sizes:
        report.fail(
            name,
            HostSupportError(
                "huge pages",
                f"this kernel offers no {size_text(page_size)} huge pages (offered: "
                f"{', '.join(size_text(size) for size in sizes) or 'none'})",
            ),
        )
        return
    total, free = sizes[page_size]
    sysfs = HUGEPAGES_SYSFS / f"hugepages-{page_size // 1024}kB" / "nr_hugepages"
    if free < 2:
        report.fail(
            name,
            HostSupportError(
                "huge pages",
                f"{free} of {total} {size_text(page_size)} huge pages are free and the check "
                f"needs 2; reserve them as root: echo {total + 2 - free} > {sysfs}",
            ),
            total=total,
            free=free,
        )
        return
    if not offered.features & FEATURE_MISSING_HUGETLBFS:
        report.fail(
            name,
            HostSupportError(
                "userfaultfd", "missing userfault features: MISSING_HUGETLBFS (use a newer kernel)"
            ),
        )
        return
    try:
        with Userfaultfd(need_features=FEATURE_MISSING_HUGETLBFS) as uffd:
            ioctls, problems = _exercise(uffd, page_size, huge=True)
    except QmigError as error:
        report.fail(name, HostSupportError("huge pages", error.one_line()))
        return
    names = ioctl_names(ioctls)
    lacking = missing(REQUIRED_HUGE_RANGE_IOCTLS, ioctls)
    if lacking or problems:
        detail = "; ".join(problems + [f"missing ioctls: {', '.join(lacking)}"] * bool(lacking))
        report.fail(name, HostSupportError("huge pages", detail))
        return
    report.add(
        name,
        "ok",
        f"{free} of {total} free; registered and placed by COPY ({', '.join(names)}); "
        "zero pages are copied, ZEROPAGE does not apply",
        total=total,
        free=free,
    )


def _check_mlock(report: SupportReport) -> None:
    locked = memory_locked_bytes()
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    limit = "unlimited" if soft == resource.RLIM_INFINITY else f"{soft} bytes"
    if locked:
        report.add(
            "mlock",
            "warn",
            f"{locked} bytes locked: qmig unlocks memory before registering RAM (locked "
            "pages never fault) and locks it again at the end",
            locked=locked,
        )
    else:
        report.add(
            "mlock",
            "ok",
            f"no memory locked (RLIMIT_MEMLOCK {limit}); registered RAM stays unpopulated "
            "until its pages are placed",
            locked=0,
        )


def _check_thp(report: SupportReport) -> None:
    if not THP_ENABLED.exists():
        report.add("transparent huge pages", "skip", "not built into this kernel")
        return
    setting = THP_ENABLED.read_text().strip()
    mode = setting[setting.find("[") + 1 : setting.find("]")] if "[" in setting else setting
    with _TestArea(4 << 20) as area:
        off = lib.qmig_madvise(area.address, area.length, lib.MADV_NOHUGEPAGE)
        on = lib.qmig_madvise(area.address, area.length, lib.MADV_HUGEPAGE)
    if off < 0 or on < 0:
        report.add(
            "transparent huge pages",
            "warn",
            f"mode {mode}, but MADV_NOHUGEPAGE/MADV_HUGEPAGE failed: {os.strerror(-min(off, on))}",
            mode=mode,
        )
        return
    from qmig.ram.blocks import maps_huge_zero_page

    huge_zero = maps_huge_zero_page()
    when = (
        "from the first discard, as QEMU does; zero memory is mapped by the huge zero page "
        "until then"
        if huge_zero
        else "from mapping (no huge zero page here: writes would allocate huge pages)"
    )
    report.add(
        "transparent huge pages",
        "ok",
        f"mode {mode}; qmig turns THP off on RAM blocks {when}",
        mode=mode,
        huge_zero_page=huge_zero,
    )


def check_host(page_sizes: Iterable[int] = ()) -> SupportReport:
    """Every check postcopy needs, for blocks with the given page sizes."""
    report = SupportReport()
    huge_sizes = sorted({size for size in page_sizes if size != HOST_PAGE_SIZE})
    if _check_open(report):
        offered = _check_api(report)
        if offered is not None:
            _check_ioctls(report)
            for size in huge_sizes:
                _check_huge(report, size, offered)
    if not huge_sizes:
        available = huge_page_sizes()
        counts = (f"{size_text(size)}: {free}/{total}" for size, (total, free) in available.items())
        report.add(
            "huge pages",
            "skip",
            "no block page size differs from the host's; free: " + ", ".join(counts),
            sizes={str(size): {"total": t, "free": f} for size, (t, f) in available.items()},
        )
    _check_mlock(report)
    _check_thp(report)
    return report
