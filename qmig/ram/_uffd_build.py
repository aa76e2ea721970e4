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
"""

C_SOURCE = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
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

uint64_t qmig_map_anon(uint64_t len, uint64_t huge_page_size, int *err)
{
    int flags = MAP_PRIVATE | MAP_ANONYMOUS;
    if (huge_page_size)
        flags |= MAP_HUGETLB | ((__builtin_ctzll(huge_page_size)) << MAP_HUGE_SHIFT);
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, flags, -1, 0);
    if (p == MAP_FAILED) {
        *err = errno;
        return 0;
    }
    *err = 0;
    return (uint64_t)(uintptr_t)p;
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
