"""cffi builder for ``qmig.ram._uffd``: userfaultfd ioctls, page placement, faults, vCPU loops.

Out-of-line API mode, compiled against the kernel's ``<linux/userfaultfd.h>`` at install time
(``pip install -e .`` runs it through setup.py's ``cffi_modules``). API mode releases the GIL
around every call, which is what lets a C "vCPU" block on a missing page while the Python fault
thread keeps running. Everything here is byte-level and loop-heavy on purpose: Python decides,
C does the per-page work.
"""

from cffi import FFI

CDEF = """
#define UFFD_API ...
#define UFFDIO_REGISTER_MODE_MISSING ...
#define UFFDIO_COPY_MODE_DONTWAKE ...
#define UFFDIO_ZEROPAGE_MODE_DONTWAKE ...
#define UFFD_EVENT_PAGEFAULT ...
#define UFFD_PAGEFAULT_FLAG_WRITE ...
#define _UFFDIO_REGISTER ...
#define _UFFDIO_UNREGISTER ...
#define _UFFDIO_WAKE ...
#define _UFFDIO_COPY ...
#define _UFFDIO_ZEROPAGE ...
#define _UFFDIO_API ...
#define MADV_DONTNEED ...
#define MADV_HUGEPAGE ...
#define MADV_NOHUGEPAGE ...
#define MCL_CURRENT ...
#define MCL_FUTURE ...

/* One fault message, flattened for Python; t_ns is CLOCK_MONOTONIC right after read(). */
struct qmig_fault {
    uint64_t address;
    uint64_t flags;
    uint64_t t_ns;
    uint32_t tid;
    uint32_t event;
};

/* Outcome of placing a run of pages. */
struct qmig_place_result {
    uint64_t placed;        /* pages this call put in place */
    uint64_t existing;      /* pages that were already there (EEXIST or already marked) */
    uint64_t error_page;    /* index of the page that failed, when the call returns < 0 */
    uint64_t t_ns;          /* CLOCK_MONOTONIC when the last page went in */
};

/* A vCPU-like workload: configuration in, results out. */
struct qmig_workload {
    uint64_t base;            /* first byte the workload may touch */
    uint64_t length;          /* bytes from base */
    uint64_t stride;          /* touch granularity, normally 4096 */
    uint64_t touches;         /* how many page touches in all */
    uint64_t seed;
    uint64_t hot_pages;       /* HOTSET: pages at the start of the range that are hot */
    uint32_t hot_percent;     /* HOTSET: share of touches that go to the hot pages */
    uint32_t pattern;         /* 0 sequential, 1 random, 2 hot set */
    uint32_t write;           /* 0 read only, 1 read then write */
    uint32_t check;           /* 1: every page must start with tag_xor ^ (tag_base + offset) */
    uint64_t rate;            /* touches per second, 0 = as fast as possible */
    uint64_t tag_base;        /* block offset of base, for the tag check */
    uint64_t tag_xor;
    int32_t *abort;           /* set to 1 by the owner; checked after every touch */
    /* results */
    uint64_t done;
    uint64_t mismatches;
    uint64_t first_mismatch;  /* offset from base of the first page whose tag was wrong */
    uint64_t checksum;
    uint64_t t_start_ns;
    uint64_t t_end_ns;
    int32_t tid;
    int32_t aborted;
};

int qmig_uffd_open_syscall(int flags);
int qmig_uffd_open_dev(int flags);
int qmig_uffd_api(int fd, uint64_t features, uint64_t *out_features, uint64_t *out_ioctls);
int qmig_uffd_register(int fd, uint64_t start, uint64_t len, uint64_t mode, uint64_t *out_ioctls);
int qmig_uffd_unregister(int fd, uint64_t start, uint64_t len);
int qmig_uffd_wake(int fd, uint64_t start, uint64_t len);
int qmig_uffd_copy(int fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode,
                   int64_t *copied);
int qmig_uffd_zeropage(int fd, uint64_t dst, uint64_t len, uint64_t mode, int64_t *zeroed);
int qmig_place(int fd, uint64_t dst, uint64_t src, uint64_t src_stride, uint64_t page_size,
               uint64_t count, uint64_t max_run, int zeropage, uint64_t mode, uint8_t *bitmap,
               uint64_t first_bit, uint64_t bits_per_page, struct qmig_place_result *res);
int qmig_fault_wait(int uffd, int quitfd, int timeout_ms, struct qmig_fault *out, int max,
                    int *quit);
int qmig_fault_spin(int uffd, uint64_t spin_ns, struct qmig_fault *out, int max);
int64_t qmig_serve_from(int uffd, int quitfd, uint64_t base, uint64_t len, uint64_t src,
                        uint64_t page_size, uint64_t spin_ns, uint64_t *latency_ns,
                        uint64_t latency_cap);

uint64_t qmig_map_anon(uint64_t len, uint64_t huge_page_size, int *err);
int qmig_huge_zero_page_works(void);
int64_t qmig_compare_remote(int pid, uint64_t remote, uint64_t local, uint64_t len,
                            uint64_t *mismatches, uint64_t max_mismatches);
int qmig_unmap(uint64_t addr, uint64_t len);
int qmig_madvise(uint64_t addr, uint64_t len, int advice);
int64_t qmig_resident_pages(uint64_t addr, uint64_t len);
int qmig_mlockall(int flags);
int qmig_munlockall(void);
void qmig_memcpy(uint64_t dst, uint64_t src, uint64_t len);
void qmig_fill_tags(uint64_t dst, uint64_t len, uint64_t stride, uint64_t tag_base,
                    uint64_t tag_xor);
uint64_t qmig_now_ns(void);
int qmig_gettid(void);

void qmig_bitmap_set(uint8_t *map, uint64_t start, uint64_t count);
void qmig_bitmap_clear(uint8_t *map, uint64_t start, uint64_t count);
uint64_t qmig_bitmap_count(const uint8_t *map, uint64_t start, uint64_t count);
uint64_t qmig_bitmap_next_clear(const uint8_t *map, uint64_t start, uint64_t end);

int qmig_workload_run(struct qmig_workload *w);

/* A block as the batched placement sees it. Python owns the memory behind every pointer. */
struct qmig_block {
    int32_t fd;               /* the userfaultfd it is registered with; -1: write directly */
    int32_t zeropage;         /* 1: UFFDIO_ZEROPAGE works here (not on hugetlb) */
    uint64_t host;            /* first byte of the mapping */
    uint64_t length;          /* used length */
    uint64_t page_size;       /* host page size */
    uint64_t max_run;         /* target pages per placing ioctl, at most QMIG_SCRATCH_PAGES */
    uint8_t *bitmap;          /* received, one bit per target page */
    uint64_t *placed_ns;      /* per host page: when it went in (registered only), or NULL */
    uint8_t *staging;         /* huge pages: the host page being gathered (page_size bytes) */
    uint8_t *staged;          /* huge pages: one flag per target page of that host page */
    uint64_t staging_page;    /* the host page being gathered; UINT64_MAX: none */
    uint64_t staged_count;
    uint64_t served;          /* host pages placed by qmig_serve_blocks */
    uint8_t *touched;         /* target pages qmig wrote directly (before registration), or
                                 NULL; the rest of a fresh mapping is known to be zero */
    uint8_t *regions;         /* per 2 MiB of address space from the block's start (rounded
                                 down), while THP is on: a REGION_* state; NULL: off */
    uint64_t max_data_run;    /* registered: data pages per UFFDIO_COPY at most; 0: max_run */
};

/* Outcome of one qmig_place_records call. */
struct qmig_records_result {
    uint64_t placed;          /* host pages placed by ioctl */
    uint64_t zero;            /* of which zero pages */
    uint64_t written;         /* target pages written directly (not registered yet) */
    uint64_t existing;        /* records whose page was already in place */
    uint64_t ioctls;          /* placing ioctls issued */
    uint64_t first_page;      /* host pages placed by ioctl lie in [first_page, end_page) */
    uint64_t end_page;
    uint64_t t_ns;            /* CLOCK_MONOTONIC at the end */
    uint64_t error_record;    /* the record that failed, when the call returns < 0 */
};

#define QMIG_SCRATCH_PAGES ...

int qmig_place_records(struct qmig_block *b, const uint8_t *data, uint64_t data_base,
                       const uint64_t *headers, const uint64_t *bodies, uint64_t count,
                       uint64_t page_flag, int replace, struct qmig_records_result *res);
int qmig_block_sweep(struct qmig_block *b);
int64_t qmig_block_discard(struct qmig_block *b, const uint8_t *ranges, uint64_t n, int drop,
                           uint64_t *bad);

/* One fault as qmig_serve_blocks saw it. */
struct qmig_served {
    uint64_t read_ns;         /* CLOCK_MONOTONIC right after read() */
    uint64_t placed_ns;       /* when its page went in; 0: it was in place already (late) */
    uint64_t address;
    uint32_t tid;             /* 0 unless UFFD_FEATURE_THREAD_ID */
    int32_t block;            /* index into blocks; -1: in no block (stray), or not a fault */
};

int64_t qmig_serve_blocks(int uffd, int quitfd, struct qmig_block **blocks,
                          uint8_t **sources, int nblocks, uint64_t spin_ns,
                          struct qmig_served *log, uint64_t log_cap, int *stop);
"""

C_SOURCE = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>
#include <linux/userfaultfd.h>

#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC_NEW _IO(0xAA, 0x00)
#endif
#ifndef MAP_HUGE_SHIFT
#define MAP_HUGE_SHIFT 26
#endif
#ifndef MAP_HUGETLB
#define MAP_HUGETLB 0x40000
#endif

struct qmig_fault {
    uint64_t address;
    uint64_t flags;
    uint64_t t_ns;
    uint32_t tid;
    uint32_t event;
};

struct qmig_place_result {
    uint64_t placed;
    uint64_t existing;
    uint64_t error_page;
    uint64_t t_ns;
};

struct qmig_workload {
    uint64_t base, length, stride, touches, seed, hot_pages;
    uint32_t hot_percent, pattern, write, check;
    uint64_t rate, tag_base, tag_xor;
    int32_t *abort;
    uint64_t done, mismatches, first_mismatch, checksum, t_start_ns, t_end_ns;
    int32_t tid, aborted;
};

uint64_t qmig_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

int qmig_gettid(void) { return (int)syscall(SYS_gettid); }

int qmig_uffd_open_syscall(int flags)
{
#ifdef SYS_userfaultfd
    long fd = syscall(SYS_userfaultfd, flags);
    return fd < 0 ? -errno : (int)fd;
#else
    return -ENOSYS;
#endif
}

int qmig_uffd_open_dev(int flags)
{
    int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
    if (dev < 0)
        return -errno;
    int fd = ioctl(dev, USERFAULTFD_IOC_NEW, flags);
    int err = errno;
    close(dev);
    return fd < 0 ? -err : fd;
}

int qmig_uffd_api(int fd, uint64_t features, uint64_t *out_features, uint64_t *out_ioctls)
{
    struct uffdio_api api = { .api = UFFD_API, .features = features };
    if (ioctl(fd, UFFDIO_API, &api) < 0)
        return -errno;
    *out_features = api.features;
    *out_ioctls = api.ioctls;
    return 0;
}

int qmig_uffd_register(int fd, uint64_t start, uint64_t len, uint64_t mode, uint64_t *out_ioctls)
{
    struct uffdio_register reg = { .range = { .start = start, .len = len }, .mode = mode };
    if (ioctl(fd, UFFDIO_REGISTER, &reg) < 0)
        return -errno;
    *out_ioctls = reg.ioctls;
    return 0;
}

int qmig_uffd_unregister(int fd, uint64_t start, uint64_t len)
{
    struct uffdio_range range = { .start = start, .len = len };
    return ioctl(fd, UFFDIO_UNREGISTER, &range) < 0 ? -errno : 0;
}

int qmig_uffd_wake(int fd, uint64_t start, uint64_t len)
{
    struct uffdio_range range = { .start = start, .len = len };
    return ioctl(fd, UFFDIO_WAKE, &range) < 0 ? -errno : 0;
}

int qmig_uffd_copy(int fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode,
                   int64_t *copied)
{
    struct uffdio_copy copy = { .dst = dst, .src = src, .len = len, .mode = mode };
    int ret = ioctl(fd, UFFDIO_COPY, &copy) < 0 ? -errno : 0;
    *copied = copy.copy > 0 ? copy.copy : 0;
    return ret;
}

int qmig_uffd_zeropage(int fd, uint64_t dst, uint64_t len, uint64_t mode, int64_t *zeroed)
{
    struct uffdio_zeropage zero = { .range = { .start = dst, .len = len }, .mode = mode };
    int ret = ioctl(fd, UFFDIO_ZEROPAGE, &zero) < 0 ? -errno : 0;
    *zeroed = zero.zeropage > 0 ? zero.zeropage : 0;
    return ret;
}

/* Bitmaps are shared between the thread placing pages and the fault thread, so bits change
   with atomic byte operations: a plain read-modify-write would lose a neighbour's bit. */
static inline int bit_test(const uint8_t *map, uint64_t bit)
{
    return (__atomic_load_n(&map[bit >> 3], __ATOMIC_ACQUIRE) >> (bit & 7)) & 1;
}

void qmig_bitmap_set(uint8_t *map, uint64_t start, uint64_t count)
{
    for (uint64_t bit = start; bit < start + count; bit++)
        __atomic_fetch_or(&map[bit >> 3], (uint8_t)(1u << (bit & 7)), __ATOMIC_RELEASE);
}

void qmig_bitmap_clear(uint8_t *map, uint64_t start, uint64_t count)
{
    for (uint64_t bit = start; bit < start + count; bit++)
        __atomic_fetch_and(&map[bit >> 3], (uint8_t)~(1u << (bit & 7)), __ATOMIC_RELEASE);
}

uint64_t qmig_bitmap_count(const uint8_t *map, uint64_t start, uint64_t count)
{
    uint64_t n = 0;
    for (uint64_t bit = start; bit < start + count; bit++)
        n += bit_test(map, bit);
    return n;
}

uint64_t qmig_bitmap_next_clear(const uint8_t *map, uint64_t start, uint64_t end)
{
    uint64_t bit = start;
    while (bit < end && (bit & 7))
        if (!bit_test(map, bit)) return bit; else bit++;
    while (bit + 8 <= end && __atomic_load_n(&map[bit >> 3], __ATOMIC_ACQUIRE) == 0xff)
        bit += 8;
    for (; bit < end; bit++)
        if (!bit_test(map, bit))
            return bit;
    return end;
}

/* One placing ioctl over [dst, dst+len); returns 0 or -errno, *done = bytes placed. */
static int place_once(int fd, uint64_t dst, uint64_t src, uint64_t len, int zeropage,
                      uint64_t mode, int64_t *done)
{
    if (zeropage)
        return qmig_uffd_zeropage(fd, dst, len, mode ? UFFDIO_ZEROPAGE_MODE_DONTWAKE : 0, done);
    return qmig_uffd_copy(fd, dst, src, len, mode, done);
}

/* Place `count` pages of `page_size` at dst, page i from src + i * src_stride (stride 0 copies
   the same page again, used to zero huge pages), or with UFFDIO_ZEROPAGE, at most max_run
   pages per ioctl (0: no limit; each ioctl holds the mm's lock, delaying faults). Pages already
   marked in `bitmap` (bits_per_page bits each from first_bit) are skipped; EEXIST marks the
   page and moves on (another thread placed it first); EAGAIN retries. Returns 0, or -errno
   with res->error_page set; ENOENT/ESRCH mean the faulting side is gone. */
int qmig_place(int fd, uint64_t dst, uint64_t src, uint64_t src_stride, uint64_t page_size,
               uint64_t count, uint64_t max_run, int zeropage, uint64_t mode, uint8_t *bitmap,
               uint64_t first_bit, uint64_t bits_per_page, struct qmig_place_result *res)
{
    uint64_t i = 0;
    unsigned retries = 0;
    res->placed = res->existing = 0;
    while (i < count) {
        if (bitmap && bit_test(bitmap, first_bit + i * bits_per_page)) {
            res->existing++;
            i++;
            continue;
        }
        uint64_t run = 1;
        /* A same-source copy cannot span pages: the source does not advance. */
        if (src_stride == page_size || zeropage)
            while (i + run < count && (!max_run || run < max_run) &&
                   !(bitmap && bit_test(bitmap, first_bit + (i + run) * bits_per_page)))
                run++;
        int64_t done = 0;
        int ret = place_once(fd, dst + i * page_size, src + i * src_stride, run * page_size,
                             zeropage, mode, &done);
        uint64_t whole = (uint64_t)done / page_size;
        if (whole) {
            if (bitmap)
                qmig_bitmap_set(bitmap, first_bit + i * bits_per_page, whole * bits_per_page);
            res->placed += whole;
            i += whole;
            retries = 0;
        }
        if (ret == 0 || ret == -EAGAIN) {
            if (ret == -EAGAIN && !whole && ++retries > 100000) {
                res->error_page = i;
                return ret;
            }
            if (ret == -EAGAIN)
                sched_yield();
            continue;
        }
        if (ret == -EEXIST) {
            if (bitmap)
                qmig_bitmap_set(bitmap, first_bit + i * bits_per_page, bits_per_page);
            res->existing++;
            i++;
            continue;
        }
        res->error_page = i;
        res->t_ns = qmig_now_ns();
        return ret;
    }
    res->t_ns = qmig_now_ns();
    return 0;
}

static int read_faults(int uffd, struct qmig_fault *out, int max);
int qmig_fault_spin(int uffd, uint64_t spin_ns, struct qmig_fault *out, int max);

/* Wait until the userfaultfd has messages or quitfd is readable, then read up to `max`
   messages in one read(). Returns the number read (0 on timeout or quit), or -errno. */
int qmig_fault_wait(int uffd, int quitfd, int timeout_ms, struct qmig_fault *out, int max,
                    int *quit)
{
    struct pollfd fds[2] = { { .fd = uffd, .events = POLLIN }, { .fd = quitfd, .events = POLLIN } };
    *quit = 0;
    int ready = poll(fds, 2, timeout_ms);
    if (ready < 0)
        return errno == EINTR ? 0 : -errno;
    if (fds[1].revents)
        *quit = 1;
    if (!(fds[0].revents & POLLIN))
        return (fds[0].revents & (POLLERR | POLLHUP | POLLNVAL)) ? -EBADF : 0;
    return read_faults(uffd, out, max);
}

/* A fault loop entirely in C, serving [base, base+len) from a same-layout copy at src, until
   quitfd is readable. The benchmark's baseline for the Python fault thread, and a page source
   for local use. Returns faults served, or -errno. */
int64_t qmig_serve_from(int uffd, int quitfd, uint64_t base, uint64_t len, uint64_t src,
                        uint64_t page_size, uint64_t spin_ns, uint64_t *latency_ns,
                        uint64_t latency_cap)
{
    struct qmig_fault faults[64];
    struct qmig_place_result res;
    int quit = 0;
    int64_t served = 0;
    int n = 0;
    while (!quit) {
        n = (n > 0 && spin_ns) ? qmig_fault_spin(uffd, spin_ns, faults, 64) : 0;
        if (n == 0)
            n = qmig_fault_wait(uffd, quitfd, -1, faults, 64, &quit);
        if (n < 0)
            return n;
        for (int k = 0; k < n; k++) {
            uint64_t addr = faults[k].address;
            if (faults[k].event != UFFD_EVENT_PAGEFAULT || addr < base || addr >= base + len)
                continue;
            uint64_t offset = (addr - base) & ~(page_size - 1);
            int ret = qmig_place(uffd, base + offset, src + offset, page_size, page_size, 1, 1,
                                 0, 0, NULL, 0, 1, &res);
            if (ret < 0)
                return ret;
            if (latency_ns && (uint64_t)served < latency_cap)
                latency_ns[served] = res.t_ns - faults[k].t_ns;
            served++;
        }
    }
    return served;
}

static int read_faults(int uffd, struct qmig_fault *out, int max)
{
    struct uffd_msg msgs[64];
    if (max > 64)
        max = 64;
    ssize_t got = read(uffd, msgs, sizeof(msgs[0]) * (size_t)max);
    uint64_t now = qmig_now_ns();
    if (got < 0)
        return (errno == EAGAIN || errno == EINTR) ? 0 : -errno;
    int n = (int)(got / (ssize_t)sizeof(msgs[0]));
    for (int k = 0; k < n; k++) {
        out[k].event = msgs[k].event;
        out[k].address = msgs[k].arg.pagefault.address;
        out[k].flags = msgs[k].arg.pagefault.flags;
        out[k].tid = msgs[k].arg.pagefault.feat.ptid;
        out[k].t_ns = now;
    }
    return n;
}

/* Busy-read the (non-blocking) userfaultfd for up to spin_ns. Right after a fault the next one
   often follows within microseconds; catching it here spares the faulting thread the wake-up
   of a sleeping reader, which on virtual machines costs far more than the spin. */
int qmig_fault_spin(int uffd, uint64_t spin_ns, struct qmig_fault *out, int max)
{
    uint64_t until = qmig_now_ns() + spin_ns;
    do {
        int n = read_faults(uffd, out, max);
        if (n != 0)
            return n;
    } while (qmig_now_ns() < until);
    return 0;
}

#define QMIG_REGION (2ull << 20)  /* what one page-table entry at the PMD level maps */

/* Anonymous memory for a block. 4 KiB blocks start on a 2 MiB boundary, as a VMM aligns guest
   RAM: only a whole aligned 2 MiB can be mapped by one huge page (or the huge zero page). */
uint64_t qmig_map_anon(uint64_t len, uint64_t huge_page_size, int *err)
{
    /* NORESERVE: a claimed block costs address space, not commit; memory follows pages.
     * Huge pages keep their reservation, so that too few of them fail here, not by SIGBUS. */
    int flags = MAP_PRIVATE | MAP_ANONYMOUS | (huge_page_size ? 0 : MAP_NORESERVE);
    if (huge_page_size)
        flags |= MAP_HUGETLB | ((__builtin_ctzll(huge_page_size)) << MAP_HUGE_SHIFT);
    uint64_t slack = huge_page_size || len < QMIG_REGION ? 0 : QMIG_REGION;
    void *p = mmap(NULL, len + slack, PROT_READ | PROT_WRITE, flags, -1, 0);
    if (p == MAP_FAILED) {
        *err = errno;
        return 0;
    }
    uint64_t start = (uint64_t)(uintptr_t)p;
    if (slack) {
        uint64_t aligned = (start + QMIG_REGION - 1) & ~(QMIG_REGION - 1);
        if (aligned > start)
            munmap(p, aligned - start);
        if (aligned + len < start + len + slack)
            munmap((void *)(uintptr_t)(aligned + len), start + len + slack - aligned - len);
        start = aligned;
    }
    *err = 0;
    return start;
}

/* Whether reading untouched memory under MADV_HUGEPAGE maps the huge zero page here (THP
   enabled for madvised memory, use_zero_page on): then one read maps 2 MiB of zeros, where
   mapping them page by page costs ~0.6 us per 4 KiB. */
int qmig_huge_zero_page_works(void)
{
    int err;
    uint64_t at = qmig_map_anon(QMIG_REGION, 0, &err);
    if (!at)
        return 0;
    unsigned char vec[QMIG_REGION / 4096];
    int works = 0;
    if (madvise((void *)(uintptr_t)at, QMIG_REGION, MADV_HUGEPAGE) == 0) {
        (void)*(volatile uint8_t *)(uintptr_t)at;
        if (mincore((void *)(uintptr_t)at, QMIG_REGION, vec) == 0) {
            works = 1;
            for (size_t k = 0; k < sizeof(vec); k++)
                works &= vec[k] & 1;
        }
    }
    munmap((void *)(uintptr_t)at, QMIG_REGION);
    return works;
}

/* Compare len bytes at remote in process pid with local memory, 4 KiB page by page, reading
   the other process's memory directly (process_vm_readv) a few MiB at a time: no file, one
   copy. Offsets of differing pages go to mismatches (up to max_mismatches). Returns how many
   pages differ, or -errno (ESRCH: no such process; EFAULT: not mapped there). */
#define QMIG_COMPARE_CHUNK (4ull << 20)
int64_t qmig_compare_remote(int pid, uint64_t remote, uint64_t local, uint64_t len,
                            uint64_t *mismatches, uint64_t max_mismatches)
{
    uint8_t *buffer = malloc(QMIG_COMPARE_CHUNK);
    if (!buffer)
        return -ENOMEM;
    int64_t differ = 0;
    for (uint64_t done = 0; done < len;) {
        uint64_t want = len - done < QMIG_COMPARE_CHUNK ? len - done : QMIG_COMPARE_CHUNK;
        struct iovec here = { buffer, want };
        struct iovec there = { (void *)(uintptr_t)(remote + done), want };
        ssize_t got = process_vm_readv(pid, &here, 1, &there, 1, 0);
        if (got <= 0) {
            int error = got < 0 ? errno : EFAULT;
            free(buffer);
            return -error;
        }
        const uint8_t *mine = (const uint8_t *)(uintptr_t)(local + done);
        if (memcmp(buffer, mine, (size_t)got) != 0) {
            for (uint64_t at = 0; at < (uint64_t)got; at += 4096) {
                uint64_t size = (uint64_t)got - at < 4096 ? (uint64_t)got - at : 4096;
                if (memcmp(buffer + at, mine + at, size) == 0)
                    continue;
                if ((uint64_t)differ < max_mismatches)
                    mismatches[differ] = done + at;
                differ++;
            }
        }
        done += (uint64_t)got;
    }
    free(buffer);
    return differ;
}

int qmig_unmap(uint64_t addr, uint64_t len)
{
    return munmap((void *)(uintptr_t)addr, len) < 0 ? -errno : 0;
}

int qmig_madvise(uint64_t addr, uint64_t len, int advice)
{
    return madvise((void *)(uintptr_t)addr, len, advice) < 0 ? -errno : 0;
}

int64_t qmig_resident_pages(uint64_t addr, uint64_t len)
{
    long page = sysconf(_SC_PAGESIZE);
    uint64_t pages = (len + page - 1) / page;
    unsigned char vec[4096];
    int64_t resident = 0;
    for (uint64_t first = 0; first < pages; first += sizeof(vec)) {
        uint64_t n = pages - first < sizeof(vec) ? pages - first : sizeof(vec);
        if (mincore((void *)(uintptr_t)(addr + first * page), n * page, vec) < 0)
            return -errno;
        for (uint64_t k = 0; k < n; k++)
            resident += vec[k] & 1;
    }
    return resident;
}

int qmig_mlockall(int flags) { return mlockall(flags) < 0 ? -errno : 0; }
int qmig_munlockall(void) { return munlockall() < 0 ? -errno : 0; }

void qmig_memcpy(uint64_t dst, uint64_t src, uint64_t len)
{
    memcpy((void *)(uintptr_t)dst, (const void *)(uintptr_t)src, len);
}

void qmig_fill_tags(uint64_t dst, uint64_t len, uint64_t stride, uint64_t tag_base,
                    uint64_t tag_xor)
{
    for (uint64_t off = 0; off + sizeof(uint64_t) <= len; off += stride)
        *(uint64_t *)(uintptr_t)(dst + off) = tag_xor ^ (tag_base + off);
}

/* --- batched placement of stream records ---------------------------------------------- */

#define QMIG_TARGET_PAGE 4096ull
#define QMIG_SCRATCH_PAGES 512
#define QMIG_MADV_POPULATE_WRITE 23  /* Linux 5.14; older kernels say EINVAL */
#define QMIG_MADV_POPULATE_READ 22

struct qmig_block {
    int32_t fd, zeropage;
    uint64_t host, length, page_size, max_run;
    uint8_t *bitmap;
    uint64_t *placed_ns;
    uint8_t *staging, *staged;
    uint64_t staging_page, staged_count, served;
    uint8_t *touched;
    uint8_t *regions;
    uint64_t max_data_run;
};

struct qmig_records_result {
    uint64_t placed, zero, written, existing, ioctls, first_page, end_page, t_ns, error_record;
};

/* Pages are gathered into one contiguous buffer so that a run of them costs one ioctl: the
   records' bodies sit 8+ bytes apart in the stream, and a memcpy (~10 GiB/s) is much cheaper
   than the per-ioctl cost it saves. One buffer per thread, kept for the thread's life, since
   several threads may place into 4 KiB blocks at once. */
static pthread_key_t scratch_key;
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;

static void scratch_key_make(void) { pthread_key_create(&scratch_key, free); }

static uint8_t *scratch_buffer(void)
{
    pthread_once(&scratch_once, scratch_key_make);
    uint8_t *buffer = pthread_getspecific(scratch_key);
    if (!buffer) {
        if (posix_memalign((void **)&buffer, QMIG_TARGET_PAGE,
                           QMIG_SCRATCH_PAGES * QMIG_TARGET_PAGE))
            return NULL;
        pthread_setspecific(scratch_key, buffer);
    }
    return buffer;
}

static void note_placed(struct qmig_block *b, uint64_t host_page, uint64_t pages, uint64_t now,
                        struct qmig_records_result *res)
{
    if (b->placed_ns)
        for (uint64_t k = 0; k < pages; k++)
            b->placed_ns[host_page + k] = now;
    if (host_page < res->first_page)
        res->first_page = host_page;
    if (host_page + pages > res->end_page)
        res->end_page = host_page + pages;
}

/* Place `pages` host pages from host page `host_page` on, from src (contiguous) or as zero
   pages, with as few ioctls as the kernel allows. A page already there (EEXIST: another
   thread, or a duplicate arrival) is marked and skipped; EAGAIN (the mm is changing) retries.
   Bits are set after each ioctl, never before: a set bit promises the page is readable. */
static int place_host_pages(struct qmig_block *b, uint64_t host_page, const uint8_t *src,
                            uint64_t pages, int zero, struct qmig_records_result *res)
{
    uint64_t per = b->page_size / QMIG_TARGET_PAGE;
    uint64_t i = 0;
    unsigned retries = 0;
    while (i < pages) {
        uint64_t dst = b->host + (host_page + i) * b->page_size;
        uint64_t len = (pages - i) * b->page_size;
        int64_t done = 0;
        int ret = zero ? qmig_uffd_zeropage(b->fd, dst, len, 0, &done)
                       : qmig_uffd_copy(b->fd, dst, (uint64_t)(uintptr_t)(src + i * b->page_size),
                                        len, 0, &done);
        res->ioctls++;
        uint64_t whole = (uint64_t)done / b->page_size;
        if (whole) {
            uint64_t now = qmig_now_ns();
            qmig_bitmap_set(b->bitmap, (host_page + i) * per, whole * per);
            note_placed(b, host_page + i, whole, now, res);
            res->placed += whole;
            if (zero)
                res->zero += whole;
            i += whole;
            retries = 0;
        }
        if (ret == 0)
            continue;
        if (ret == -EAGAIN) {
            if (!whole && ++retries > 100000)
                return ret;
            sched_yield();
            continue;
        }
        if (ret == -EEXIST) {
            qmig_bitmap_set(b->bitmap, (host_page + i) * per, per);
            res->existing++;
            i++;
            continue;
        }
        return ret;
    }
    return 0;
}

static inline const uint8_t *record_body(const uint8_t *data, uint64_t data_base,
                                         const uint64_t *bodies, uint64_t i)
{
    return data + (bodies[i] - data_base);
}

/* Before registration: write straight into the mapping, as QEMU does in precopy. Zero pages
   are written too, not skipped: the write populates the page, so that after registration it
   can never fault with its bit set, and a page discarded before LISTEN still holds its old
   bytes until the sweep (a clear bit says nothing about the contents). */
static int page_is_zero(const uint8_t *page)
{
    const uint64_t *word = (const uint64_t *)page;
    for (size_t i = 0; i < QMIG_TARGET_PAGE / sizeof(uint64_t); i++)
        if (word[i])
            return 0;
    return 1;
}

/* Zero pages of memory qmig never wrote are not written: they read as zero already. They
   are mapped, though, to the kernel's shared zero page, in bulk and without allocating:
   once the block is registered, touching an unmapped page would be a MISSING fault for a
   page already received. */
static void map_zero_pages(struct qmig_block *b, uint64_t first, uint64_t count)
{
    uint8_t *start = (uint8_t *)(uintptr_t)(b->host + first * QMIG_TARGET_PAGE);
    if (madvise(start, count * QMIG_TARGET_PAGE, QMIG_MADV_POPULATE_READ) != 0) {
        for (uint64_t k = 0; k < count; k++)  /* older kernels: a read maps it just the same */
            (void)*(volatile uint8_t *)(start + k * QMIG_TARGET_PAGE);
    }
}

/* While THP is on (precopy, before any discard), every 2 MiB of the block is read once before
   qmig writes into it: untouched, that read maps the huge zero page over all of it, so its zero
   pages need nothing more. Writing into the huge zero page would allocate and clear a whole
   huge page (Linux 6.x does, as it does for a write into untouched THP memory), so the first
   write into such a region drops the page it writes (MADV_DONTNEED on 4 KiB), which splits the
   mapping into 4 KiB zero pages: the write then allocates one page. Region states: */
enum { REGION_UNREAD, REGION_HUGE_ZERO, REGION_PARTLY_MAPPED, REGION_SPLIT };

/* Reads the regions over [offset, offset + len) not read yet; returns 1 when every one of
   them is wholly mapped (mincore says so: a region written before, or in swap, may not be). */
static int prepare_regions(struct qmig_block *b, uint64_t offset, uint64_t len)
{
    if (!b->regions)
        return 0;
    uint64_t base = b->host & ~(QMIG_REGION - 1);
    uint64_t first = (b->host + offset - base) / QMIG_REGION;
    uint64_t last = (b->host + offset + len - 1 - base) / QMIG_REGION;
    int all = 1;
    for (uint64_t r = first; r <= last; r++) {
        if (b->regions[r] == REGION_UNREAD) {
            uint64_t from = base + r * QMIG_REGION, to = from + QMIG_REGION;
            from = from < b->host ? b->host : from;
            to = to > b->host + b->length ? b->host + b->length : to;
            (void)*(volatile uint8_t *)(uintptr_t)from;
            unsigned char vec[QMIG_REGION / QMIG_TARGET_PAGE];
            int mapped = mincore((void *)(uintptr_t)from, to - from, vec) == 0;
            for (uint64_t k = 0; mapped && k < (to - from) / QMIG_TARGET_PAGE; k++)
                mapped = vec[k] & 1;
            b->regions[r] = mapped ? REGION_HUGE_ZERO : REGION_PARTLY_MAPPED;
        }
        all &= b->regions[r] == REGION_HUGE_ZERO || b->regions[r] == REGION_SPLIT;
    }
    return all;
}

/* Before qmig writes [offset, offset + len): split the huge zero page under it (see above). */
static void split_regions(struct qmig_block *b, uint64_t offset, uint64_t len)
{
    if (!b->regions)
        return;
    uint64_t base = b->host & ~(QMIG_REGION - 1);
    uint64_t first = (b->host + offset - base) / QMIG_REGION;
    uint64_t last = (b->host + offset + len - 1 - base) / QMIG_REGION;
    for (uint64_t r = first; r <= last; r++) {
        if (b->regions[r] != REGION_HUGE_ZERO)
            continue;
        uint64_t at = base + r * QMIG_REGION;
        at = at < b->host + offset ? b->host + offset : at;
        madvise((void *)(uintptr_t)at, QMIG_TARGET_PAGE, MADV_DONTNEED);
        b->regions[r] = REGION_SPLIT;
    }
}

static void write_direct(struct qmig_block *b, uint64_t offset, const uint8_t *body, int is_data)
{
    uint8_t *dst = (uint8_t *)(uintptr_t)(b->host + offset);
    if (is_data) {
        split_regions(b, offset, QMIG_TARGET_PAGE);
        memcpy(dst, body, QMIG_TARGET_PAGE);
    } else if (body[0] != 0 || !page_is_zero(dst)) {
        /* A zero page is only written where memory is not zero already, as QEMU does:
           reading an untouched page maps the kernel's shared zero page, while writing it
           would allocate and clear a page for nothing (most of a guest's RAM is zero). */
        split_regions(b, offset, QMIG_TARGET_PAGE);
        memset(dst, body[0], QMIG_TARGET_PAGE);
    }
    if (b->touched)
        qmig_bitmap_set(b->touched, offset / QMIG_TARGET_PAGE, 1);
    qmig_bitmap_set(b->bitmap, offset / QMIG_TARGET_PAGE, 1);
}

/* Huge host pages: gather target pages in the block's staging page and place the host page
   with one UFFDIO_COPY once all of them are there. Postcopy sends a host page's target pages
   together (QEMU checks it), so one staging page per block suffices; another host page
   arriving while one is incomplete is -EBUSY. */
static int stage_target_page(struct qmig_block *b, uint64_t offset, const uint8_t *body,
                             int is_data, struct qmig_records_result *res)
{
    uint64_t per = b->page_size / QMIG_TARGET_PAGE;
    uint64_t host_page = offset / b->page_size;
    uint64_t index = (offset % b->page_size) / QMIG_TARGET_PAGE;
    if (bit_test(b->bitmap, host_page * per)) {
        res->existing++;
        return 0;
    }
    if (b->staging_page != host_page) {
        if (b->staging_page != UINT64_MAX && b->staged_count)
            return -EBUSY;
        b->staging_page = host_page;
        b->staged_count = 0;
        memset(b->staged, 0, per);
    }
    uint8_t *slot = b->staging + index * QMIG_TARGET_PAGE;
    if (is_data)
        memcpy(slot, body, QMIG_TARGET_PAGE);
    else
        memset(slot, body[0], QMIG_TARGET_PAGE);
    if (!b->staged[index]) {
        b->staged[index] = 1;
        b->staged_count++;
    }
    if (b->staged_count < per)
        return 0;
    b->staging_page = UINT64_MAX;
    b->staged_count = 0;
    return place_host_pages(b, host_page, b->staging, 1, 0, res);
}

/* Place a run of ZERO/PAGE records into block b in one call. Record i's header is its target
   page offset | flags (page_flag set: a data page, else a fill-byte page); its body (4 KiB of
   data, or the fill byte) is at data + bodies[i] - data_base.

   Registered 4 KiB blocks: consecutive not-yet-received pages are coalesced into one
   UFFDIO_COPY (data, via the per-thread scratch buffer) or UFFDIO_ZEROPAGE (zero fill), up to
   max_run pages. With `replace` (precopy re-sends after registration), a page already in
   place is dropped first (MADV_DONTNEED) and placed again; without it, it is a duplicate.
   Registered huge blocks: whole-host-page assembly (stage_target_page). Not registered (fd
   < 0): direct writes. Returns 0, or -errno with res->error_record set (-ERANGE: an offset
   outside the block; -EBUSY: interleaved huge host pages; ENOENT/ESRCH: faulting side gone). */
int qmig_place_records(struct qmig_block *b, const uint8_t *data, uint64_t data_base,
                       const uint64_t *headers, const uint64_t *bodies, uint64_t count,
                       uint64_t page_flag, int replace, struct qmig_records_result *res)
{
    const uint64_t mask = QMIG_TARGET_PAGE - 1;
    memset(res, 0, sizeof(*res));
    res->first_page = UINT64_MAX;
    int huge = b->page_size != QMIG_TARGET_PAGE;
    uint64_t max_run = b->max_run && b->max_run < QMIG_SCRATCH_PAGES ? b->max_run
                                                                      : QMIG_SCRATCH_PAGES;
    uint8_t *scratch = NULL;
    int ret = 0;
    uint64_t i = 0;
    while (i < count) {
        uint64_t offset = headers[i] & ~mask;
        if (offset >= b->length || b->length - offset < QMIG_TARGET_PAGE) {
            ret = -ERANGE;
            break;
        }
        const uint8_t *body = record_body(data, data_base, bodies, i);
        int is_data = (headers[i] & page_flag) != 0;
        if (b->fd < 0) {
            int zero_fill = !is_data && body[0] == 0;
            /* A run of pages not yet here is handled together. Zero pages: a page of the
               fresh mapping that qmig never wrote is zero already, so it needs no write, only
               a mapping (the huge zero page over its region, else the zero page, in bulk).
               Whether it is resident says nothing (it may be in swap): the touched bitmap
               does. Pages with content: populated with one madvise first, since allocating
               pages in bulk beats taking a page fault on each first write. */
            if (!huge && !bit_test(b->bitmap, offset / QMIG_TARGET_PAGE)) {
                uint64_t run = 1;
                while (i + run < count && run < QMIG_SCRATCH_PAGES &&
                       (headers[i + run] & ~mask) == offset + run * QMIG_TARGET_PAGE &&
                       (headers[i + run] & ~mask) < b->length &&
                       !bit_test(b->bitmap, offset / QMIG_TARGET_PAGE + run) &&
                       zero_fill == (!(headers[i + run] & page_flag) &&
                                     record_body(data, data_base, bodies, i + run)[0] == 0))
                    run++;
                int mapped = prepare_regions(b, offset, run * QMIG_TARGET_PAGE);
                if (zero_fill && b->touched) {
                    uint64_t first = offset / QMIG_TARGET_PAGE, untouched = 0;
                    for (uint64_t k = 0; k <= run; k++) {
                        if (k < run && !bit_test(b->touched, first + k)) {
                            untouched++;
                            continue;
                        }
                        if (untouched) {
                            uint64_t from = first + k - untouched;
                            qmig_bitmap_set(b->bitmap, from, untouched);
                            if (!mapped)
                                map_zero_pages(b, from, untouched);
                            untouched = 0;
                        }
                        if (k < run)
                            write_direct(b, offset + k * QMIG_TARGET_PAGE,
                                         record_body(data, data_base, bodies, i + k), 0);
                    }
                    res->written += run;
                    i += run;
                    continue;
                }
                if (run >= 16 && !zero_fill) {
                    split_regions(b, offset, run * QMIG_TARGET_PAGE);
                    madvise((void *)(uintptr_t)(b->host + offset), run * QMIG_TARGET_PAGE,
                            QMIG_MADV_POPULATE_WRITE);  /* a hint: failure costs nothing */
                }
                for (uint64_t k = 0; k < run; k++)
                    write_direct(b, (headers[i + k] & ~mask),
                                 record_body(data, data_base, bodies, i + k),
                                 (headers[i + k] & page_flag) != 0);
                res->written += run;
                i += run;
                continue;
            }
            prepare_regions(b, offset, QMIG_TARGET_PAGE);
            write_direct(b, offset, body, is_data);
            res->written++;
            i++;
            continue;
        }
        if (huge) {
            ret = stage_target_page(b, offset, body, is_data, res);
            if (ret < 0)
                break;
            i++;
            continue;
        }
        uint64_t page = offset / QMIG_TARGET_PAGE;
        if (bit_test(b->bitmap, page)) {
            if (!replace) {
                res->existing++;
                i++;
                continue;
            }
            qmig_bitmap_clear(b->bitmap, page, 1);
            ret = qmig_madvise(b->host + offset, QMIG_TARGET_PAGE, MADV_DONTNEED);
            if (ret < 0)
                break;
        }
        int zero = !is_data && body[0] == 0 && b->zeropage;
        /* Extend the run over following records: the next page, same kind, not yet here. */
        uint64_t run = 1;
        /* Fewer data pages per copy where the runner asks for it: a vCPU waiting on the
           first page of a chunk is then woken once that page is in, not the whole chunk. */
        uint64_t limit = !zero && b->max_data_run && b->max_data_run < max_run ? b->max_data_run
                                                                              : max_run;
        while (i + run < count && run < limit) {
            uint64_t next = headers[i + run];
            const uint8_t *next_body = record_body(data, data_base, bodies, i + run);
            int next_data = (next & page_flag) != 0;
            int next_zero = !next_data && next_body[0] == 0 && b->zeropage;
            if ((next & ~mask) != offset + run * QMIG_TARGET_PAGE || next_zero != zero ||
                (next & ~mask) >= b->length || bit_test(b->bitmap, page + run))
                break;
            run++;
        }
        const uint8_t *src = NULL;
        if (run == 1 && is_data) {
            src = body;  /* a lone page: straight from the stream (COPY takes any alignment) */
        } else if (!zero) {
            if (!scratch && !(scratch = scratch_buffer())) {
                ret = -ENOMEM;
                break;
            }
            for (uint64_t k = 0; k < run; k++) {
                const uint8_t *from = record_body(data, data_base, bodies, i + k);
                if (headers[i + k] & page_flag)
                    memcpy(scratch + k * QMIG_TARGET_PAGE, from, QMIG_TARGET_PAGE);
                else
                    memset(scratch + k * QMIG_TARGET_PAGE, from[0], QMIG_TARGET_PAGE);
            }
            src = scratch;
        }
        ret = place_host_pages(b, page, src, run, zero, res);
        if (ret < 0)
            break;
        i += run;
    }
    if (ret < 0)
        res->error_record = i;
    if (res->first_page == UINT64_MAX)
        res->first_page = res->end_page = 0;
    res->t_ns = qmig_now_ns();
    return ret;
}

/* MADV_DONTNEED over many ranges. process_madvise() takes up to 1024 ranges per call and,
   on recent kernels, flushes the TLB once for all of them instead of once per range: discards
   come by the tens of thousands, scattered, and each flush interrupts every CPU this process
   runs on. Falls back to one madvise() per range where process_madvise() is refused. */
#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef SYS_process_madvise
#define SYS_process_madvise 440
#endif
#define QMIG_IOV_MAX 1024

struct qmig_drop { struct iovec iov[QMIG_IOV_MAX]; int n; };

static int drop_flush(struct qmig_drop *d)
{
    static int pidfd = -2;  /* -2: not tried yet; -1: process_madvise unavailable */
    int n = d->n;
    d->n = 0;
    if (!n)
        return 0;
    if (pidfd == -2) {
        long fd = syscall(SYS_pidfd_open, getpid(), 0);
        pidfd = fd < 0 ? -1 : (int)fd;
    }
    if (pidfd >= 0) {
        size_t total = 0;
        for (int k = 0; k < n; k++)
            total += d->iov[k].iov_len;
        long done = syscall(SYS_process_madvise, pidfd, d->iov, (size_t)n, MADV_DONTNEED, 0);
        if (done == (long)total)
            return 0;
        if (done < 0 && errno != EINVAL && errno != ENOSYS && errno != EPERM)
            return -errno;
        /* Refused or partial: madvise() below is idempotent, do them all. */
    }
    for (int k = 0; k < n; k++)
        if (madvise(d->iov[k].iov_base, d->iov[k].iov_len, MADV_DONTNEED) < 0)
            return -errno;
    return 0;
}

static int drop_add(struct qmig_drop *d, uint64_t start, uint64_t len)
{
    d->iov[d->n].iov_base = (void *)(uintptr_t)start;
    d->iov[d->n].iov_len = len;
    return ++d->n == QMIG_IOV_MAX ? drop_flush(d) : 0;
}

/* At registration: drop every host page that holds no received target page
   (MADV_DONTNEED), so that it faults. These are the pages discarded before LISTEN (a discard
   before registration only clears bits and leaves the dropping to this sweep, batched), and
   neighbours that precopy's direct writes populated (a transparent huge page is filled
   whole): a populated page never faults, so after registration it would be read as stale
   data or zeros instead of being requested. The sweep walks the bitmap's clear bits, not the
   whole mapping: after a precopy pass they are few, and dropping a page that is not populated
   costs next to nothing (mincore() over every page cost 25 ms per GiB of downtime). Runs of
   such host pages are dropped whole, batched. Returns host pages dropped, or -errno. */
int qmig_block_sweep(struct qmig_block *b)
{
    static __thread struct qmig_drop drop;
    uint64_t per = b->page_size / QMIG_TARGET_PAGE;
    uint64_t pages = b->length / b->page_size;
    uint64_t bits = pages * per;
    uint64_t dropped = 0, page = 0;
    int ret = 0;
    drop.n = 0;
    while (page < pages && !ret) {
        uint64_t bit = qmig_bitmap_next_clear(b->bitmap, page * per, bits);
        if (bit >= bits)
            break;
        page = bit / per;
        uint64_t end = page;
        while (end < pages && !qmig_bitmap_count(b->bitmap, end * per, per))
            end++;
        if (end == page) {  /* partly received: a huge page whose other parts arrived */
            page++;
            continue;
        }
        ret = drop_add(&drop, b->host + page * b->page_size, (end - page) * b->page_size);
        dropped += end - page;
        page = end;
    }
    if (!ret)
        ret = drop_flush(&drop);
    return ret < 0 ? ret : (int)dropped;
}

static inline uint64_t load_be64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
    return __builtin_bswap64(v);
}

/* Discard n ranges of a block in one call: ranges holds (be64 start, be64 length) byte
   pairs, as POSTCOPY_RAM_DISCARD carries them. Each range's received bits are cleared, its
   placement times reset and a host page being gathered in it starts over; with drop (the
   block is or was registered) its pages are then dropped so that they fault, adjacent
   ranges coalesced and the MADV_DONTNEEDs batched. Before registration only bits change:
   the sweep at registration drops the memory. A range not aligned to the block's pages or
   not inside it: nothing is changed, *bad is its index, -EINVAL. Returns target pages
   discarded, or -errno. */
int64_t qmig_block_discard(struct qmig_block *b, const uint8_t *ranges, uint64_t n, int drop,
                           uint64_t *bad)
{
    static __thread struct qmig_drop batch;
    uint64_t per = b->page_size / QMIG_TARGET_PAGE;
    uint64_t run_start = 0, run_end = 0, total = 0;
    int ret = 0;
    for (uint64_t i = 0; i < n; i++) {
        uint64_t start = load_be64(ranges + 16 * i), length = load_be64(ranges + 16 * i + 8);
        if (start % b->page_size || length % b->page_size || length > b->length ||
            start > b->length - length) {
            *bad = i;
            return -EINVAL;
        }
    }
    batch.n = 0;
    for (uint64_t i = 0; i < n && !ret; i++) {
        uint64_t start = load_be64(ranges + 16 * i), length = load_be64(ranges + 16 * i + 8);
        if (!length)
            continue;
        uint64_t first = start / b->page_size, pages = length / b->page_size;
        /* Bits first: a fault on a dropped page must never find its bit still set. */
        qmig_bitmap_clear(b->bitmap, first * per, pages * per);
        total += pages * per;
        if (b->placed_ns)
            memset(b->placed_ns + first, 0, pages * sizeof *b->placed_ns);
        if (b->staging_page != UINT64_MAX && first <= b->staging_page &&
            b->staging_page < first + pages) {
            b->staging_page = UINT64_MAX;
            b->staged_count = 0;
        }
        if (!drop)
            continue;
        if (run_end == start && run_end != run_start) {
            run_end += length;
            continue;
        }
        if (run_end != run_start)
            ret = drop_add(&batch, b->host + run_start, run_end - run_start);
        run_start = start;
        run_end = start + length;
    }
    if (!ret && run_end != run_start)
        ret = drop_add(&batch, b->host + run_start, run_end - run_start);
    if (!ret)
        ret = drop_flush(&batch);
    return ret < 0 ? ret : (int64_t)total;
}

struct qmig_served {
    uint64_t read_ns, placed_ns, address;
    uint32_t tid;
    int32_t block;
};

/* The fault loop of an in-process page source, entirely in C: read faults in batches, place
   each missing host page from sources[block] (same layout as the block) with UFFDIO_COPY,
   keep the bitmap, and log every fault with its times for the Python side's statistics.
   No Python object per fault, no GIL. Stops, returning the faults logged, when quitfd is
   readable (*stop = 0), the log is full (1), or after a fault in no block (2: the last entry,
   block -1, for Python to report). Returns -errno on a failed read or placement. */
int64_t qmig_serve_blocks(int uffd, int quitfd, struct qmig_block **blocks,
                          uint8_t **sources, int nblocks, uint64_t spin_ns,
                          struct qmig_served *log, uint64_t log_cap, int *stop)
{
    struct qmig_fault faults[64];
    struct qmig_records_result res;
    uint64_t n = 0;
    int got = 0, quit = 0;
    *stop = 0;
    while (n < log_cap) {
        int room = log_cap - n < 64 ? (int)(log_cap - n) : 64;
        got = (got > 0 && spin_ns) ? qmig_fault_spin(uffd, spin_ns, faults, room) : 0;
        if (got == 0) {
            if (quit)
                return (int64_t)n;
            got = qmig_fault_wait(uffd, quitfd, -1, faults, room, &quit);
        }
        if (got < 0)
            return got;
        for (int k = 0; k < got; k++) {
            struct qmig_served *entry = &log[n++];
            uint64_t addr = faults[k].address;
            entry->read_ns = faults[k].t_ns;
            entry->address = addr;
            entry->tid = faults[k].tid;
            entry->placed_ns = 0;
            entry->block = -1;
            if (faults[k].event != UFFD_EVENT_PAGEFAULT)
                continue;
            for (int i = 0; i < nblocks; i++) {
                struct qmig_block *b = blocks[i];
                if (addr < b->host || addr >= b->host + b->length)
                    continue;
                entry->block = i;
                uint64_t host_page = (addr - b->host) / b->page_size;
                uint64_t per = b->page_size / QMIG_TARGET_PAGE;
                if (bit_test(b->bitmap, host_page * per))
                    break;  /* placed between the fault and our read: already woken */
                memset(&res, 0, sizeof(res));
                res.first_page = UINT64_MAX;
                int ret = place_host_pages(b, host_page, sources[i] + host_page * b->page_size,
                                           1, 0, &res);
                if (ret < 0)
                    return ret;
                __atomic_fetch_add(&b->served, res.placed, __ATOMIC_RELAXED);
                entry->placed_ns = res.placed ? b->placed_ns ? b->placed_ns[host_page]
                                                             : qmig_now_ns()
                                              : 0;
                break;
            }
            if (entry->block < 0)
                *stop = 2;  /* reported after this batch: its messages are read already */
        }
        if (*stop == 2)
            return (int64_t)n;
        if (quit)
            return (int64_t)n;
    }
    *stop = 1;
    return (int64_t)n;
}

static inline uint64_t xorshift(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *s = x;
    return x * 0x2545F4914F6CDD1Dull;
}

static void pace(struct qmig_workload *w, uint64_t i)
{
    uint64_t due = w->t_start_ns + (uint64_t)((double)i * 1e9 / (double)w->rate);
    for (;;) {
        uint64_t now = qmig_now_ns();
        if (now >= due || __atomic_load_n(w->abort, __ATOMIC_ACQUIRE))
            return;
        uint64_t wait = due - now;
        if (wait > 10000000ull)
            wait = 10000000ull;  /* wake up now and then to notice an abort */
        struct timespec ts = { .tv_sec = 0, .tv_nsec = (long)wait };
        nanosleep(&ts, NULL);
    }
}

/* Touch guest memory like a vCPU. Runs with the GIL released, so a touch of a missing page
   blocks only this thread. The abort flag is read after each touch: when the owner tears the
   area down, a blocked touch is released onto a fresh zero page, and the flag is what tells
   us that value is not the guest's. */
int qmig_workload_run(struct qmig_workload *w)
{
    uint64_t pages = w->length / w->stride;
    uint64_t state = w->seed ? w->seed : 0x9E3779B97F4A7C15ull;
    w->tid = qmig_gettid();
    w->done = w->mismatches = w->checksum = 0;
    w->first_mismatch = UINT64_MAX;
    w->aborted = 0;
    w->t_start_ns = qmig_now_ns();
    if (!pages) {
        w->t_end_ns = w->t_start_ns;
        return 0;
    }
    for (uint64_t i = 0; i < w->touches; i++) {
        if (w->rate)
            pace(w, i);
        uint64_t page;
        switch (w->pattern) {
        case 1:
            page = xorshift(&state) % pages;
            break;
        case 2: {
            uint64_t hot = w->hot_pages && w->hot_pages <= pages ? w->hot_pages : pages;
            if (xorshift(&state) % 100 < w->hot_percent)
                page = xorshift(&state) % hot;
            else
                page = xorshift(&state) % pages;
            break;
        }
        default:
            page = i % pages;
        }
        uint64_t off = page * w->stride;
        volatile uint64_t *word = (volatile uint64_t *)(uintptr_t)(w->base + off);
        uint64_t value = word[0];
        /* The flag must be read after the touch, never before: a full fence, not just acquire. */
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        if (__atomic_load_n(w->abort, __ATOMIC_ACQUIRE)) {
            w->aborted = 1;
            break;
        }
        if (w->check && value != (w->tag_xor ^ (w->tag_base + off))) {
            if (!w->mismatches)
                w->first_mismatch = off;
            w->mismatches++;
        }
        w->checksum += value;
        if (w->write && w->stride >= 16)
            word[1] = i;  /* dirty the page, leaving its tag intact */
        w->done++;
    }
    w->t_end_ns = qmig_now_ns();
    return w->aborted ? -EINTR : 0;
}
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source("qmig.ram._uffd", C_SOURCE, extra_compile_args=["-O2"])

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
