/* The userfaultfd kernel interface: opening, UFFDIO_API/REGISTER/COPY/ZEROPAGE, placing runs
   of pages, reading fault messages, and a bare fault loop (the benchmark's ceiling). Every
   call returns 0 (or a count) on success and -errno on failure: Python names the error. */
#define _GNU_SOURCE
#include "uffd_internal.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <sched.h>
#include <stdint.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#include <linux/userfaultfd.h>

#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC_NEW _IO(0xAA, 0x00)
#endif

/* Placing ioctls that keep answering EAGAIN (the mm keeps changing) give up after this many
   tries without progress. */
#define EAGAIN_RETRIES 100000

uint64_t qmig_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

int qmig_gettid(void) { return (int)syscall(SYS_gettid); }

/* The calling thread's name as ps, top and perf show it (15 bytes at most, cut there). */
void qmig_name_thread(const char *name)
{
    char cut[16];
    snprintf(cut, sizeof cut, "%s", name);
    pthread_setname_np(pthread_self(), cut);
}

int qmig_uffd_open_syscall(int flags)
{
#ifdef SYS_userfaultfd
    long fd = syscall(SYS_userfaultfd, flags);
    return fd < 0 ? -errno : (int)fd;
#else
    (void)flags;
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

/* One placing ioctl over [dst, dst+len); returns 0 or -errno, *done = bytes placed. */
static int place_once(int fd, uint64_t dst, uint64_t src, uint64_t len, int zeropage,
                      uint64_t mode, int64_t *done)
{
    if (zeropage)
        return qmig_uffd_zeropage(fd, dst, len, mode ? UFFDIO_ZEROPAGE_MODE_DONTWAKE : 0, done);
    return qmig_uffd_copy(fd, dst, src, len, mode, done);
}

static inline int page_marked(const uint8_t *bitmap, uint64_t first_bit, uint64_t bits_per_page,
                              uint64_t page)
{
    return bitmap && bit_test(bitmap, first_bit + page * bits_per_page);
}

/* Pages from page i on that one ioctl can place: not marked, at most max_run (0: no limit).
   A same-source copy cannot span pages: the source does not advance. */
static uint64_t place_run(uint64_t i, uint64_t count, uint64_t max_run, int spans,
                          const uint8_t *bitmap, uint64_t first_bit, uint64_t bits_per_page)
{
    uint64_t run = 1;
    if (spans)
        while (i + run < count && (!max_run || run < max_run) &&
               !page_marked(bitmap, first_bit, bits_per_page, i + run))
            run++;
    return run;
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
    int spans = src_stride == page_size || zeropage;
    res->placed = res->existing = 0;
    while (i < count) {
        if (page_marked(bitmap, first_bit, bits_per_page, i)) {
            res->existing++;
            i++;
            continue;
        }
        uint64_t run = place_run(i, count, max_run, spans, bitmap, first_bit, bits_per_page);
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
            if (ret == -EAGAIN && !whole && ++retries > EAGAIN_RETRIES) {
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

/* One message as Python reads it. Only a page fault's arguments are pagefault's: the others
   share the union with other layouts (a REMOVE's start lies where a fault's flags do). */
static void flatten(const struct uffd_msg *msg, struct qmig_fault *out, uint64_t now)
{
    out->event = msg->event;
    out->t_ns = now;
    out->address = out->flags = out->end = 0;
    out->tid = 0;
    switch (msg->event) {
    case UFFD_EVENT_PAGEFAULT:
        out->address = msg->arg.pagefault.address;
        out->flags = msg->arg.pagefault.flags;
        out->tid = msg->arg.pagefault.feat.ptid;
        break;
    case UFFD_EVENT_REMOVE:
    case UFFD_EVENT_UNMAP:
        out->address = msg->arg.remove.start;
        out->end = msg->arg.remove.end;
        break;
    case UFFD_EVENT_REMAP:
        out->address = msg->arg.remap.from;
        out->end = msg->arg.remap.from + msg->arg.remap.len;
        break;
    case UFFD_EVENT_FORK:
        /* A descriptor for the child's copy of the ranges, installed in this process: nobody
           serves the child, so it goes (its ranges then fault as if never registered). */
        close((int)msg->arg.fork.ufd);
        break;
    }
}

/* Read up to `max` messages in one read() (the descriptor is non-blocking). */
static int read_faults(int uffd, struct qmig_fault *out, int max)
{
    struct uffd_msg msgs[QMIG_FAULT_BATCH];
    if (max > QMIG_FAULT_BATCH)
        max = QMIG_FAULT_BATCH;
    ssize_t got = read(uffd, msgs, sizeof(msgs[0]) * (size_t)max);
    uint64_t now = qmig_now_ns();
    if (got < 0)
        return (errno == EAGAIN || errno == EINTR) ? 0 : -errno;
    int n = (int)(got / (ssize_t)sizeof(msgs[0]));
    for (int k = 0; k < n; k++)
        flatten(&msgs[k], &out[k], now);
    return n;
}

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

/* A fault loop entirely in C, serving [base, base+len) from a same-layout copy at src, until
   quitfd is readable. The benchmark's baseline for the Python fault thread, and a page source
   for local use. Returns faults served, or -errno. */
int64_t qmig_serve_from(int uffd, int quitfd, uint64_t base, uint64_t len, uint64_t src,
                        uint64_t page_size, uint64_t spin_ns, uint64_t *latency_ns,
                        uint64_t latency_cap)
{
    struct qmig_fault faults[QMIG_FAULT_BATCH];
    struct qmig_place_result res;
    int quit = 0;
    int64_t served = 0;
    int n = 0;
    while (!quit) {
        n = (n > 0 && spin_ns) ? qmig_fault_spin(uffd, spin_ns, faults, QMIG_FAULT_BATCH) : 0;
        if (n == 0)
            n = qmig_fault_wait(uffd, quitfd, -1, faults, QMIG_FAULT_BATCH, &quit);
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
