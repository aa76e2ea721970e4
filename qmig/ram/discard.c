/* Dropping a block's memory so that it faults again: the sweep at registration, and
   POSTCOPY_RAM_DISCARD's ranges. */
#define _GNU_SOURCE
#include "uffd_internal.h"

#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

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
    if (!block_sizes_valid(b))
        return -EINVAL;
    uint64_t per = b->page_size / b->target_page;
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
    memcpy(&v, p, sizeof v);
    return __builtin_bswap64(v);
}

/* A discard range is two be64s, start and length, as POSTCOPY_RAM_DISCARD carries them. */
enum { RANGE = 2 * sizeof(uint64_t) };

static inline uint64_t range_start(const uint8_t *ranges, uint64_t i)
{
    return load_be64(ranges + RANGE * i);
}

static inline uint64_t range_length(const uint8_t *ranges, uint64_t i)
{
    return load_be64(ranges + RANGE * i + sizeof(uint64_t));
}

/* The index of the first range not aligned to the block's pages or not inside it; n if none. */
static uint64_t first_bad_range(const struct qmig_block *b, const uint8_t *ranges, uint64_t n)
{
    for (uint64_t i = 0; i < n; i++) {
        uint64_t start = range_start(ranges, i), length = range_length(ranges, i);
        if (start % b->page_size || length % b->page_size || length > b->length ||
            start > b->length - length)
            return i;
    }
    return n;
}

/* Forget host pages [first, first + pages): received bits, placement times, and a host page
   being gathered among them. Bits first: a fault on a dropped page must never find its bit
   still set. */
static void forget_pages(struct qmig_block *b, uint64_t first, uint64_t pages)
{
    uint64_t per = b->page_size / b->target_page;
    qmig_bitmap_clear(b->bitmap, first * per, pages * per);
    if (b->placed_ns)
        memset(b->placed_ns + first, 0, pages * sizeof *b->placed_ns);
    if (b->staging_page != UINT64_MAX && first <= b->staging_page &&
        b->staging_page < first + pages) {
        b->staging_page = UINT64_MAX;
        b->staged_count = 0;
    }
}

/* Discard n ranges of a block in one call: ranges holds (be64 start, be64 length) byte
   pairs, as POSTCOPY_RAM_DISCARD carries them. Each range's pages are forgotten
   (forget_pages); with drop (the block is or was registered) they are then dropped so that
   they fault, adjacent ranges coalesced and the MADV_DONTNEEDs batched. Before registration
   only bits change: the sweep at registration drops the memory. A range not aligned to the
   block's pages or not inside it: nothing is changed, *bad is its index, -EINVAL. Returns
   target pages discarded, or -errno. */
int64_t qmig_block_discard(struct qmig_block *b, const uint8_t *ranges, uint64_t n, int drop,
                           uint64_t *bad)
{
    static __thread struct qmig_drop batch;
    uint64_t run_start = 0, run_end = 0, total = 0;
    int ret = 0;
    *bad = block_sizes_valid(b) ? first_bad_range(b, ranges, n) : 0;
    if (*bad < n || !block_sizes_valid(b))
        return -EINVAL;
    batch.n = 0;
    for (uint64_t i = 0; i < n && !ret; i++) {
        uint64_t start = range_start(ranges, i), length = range_length(ranges, i);
        if (!length)
            continue;
        uint64_t first = start / b->page_size, pages = length / b->page_size;
        forget_pages(b, first, pages);
        total += pages * (b->page_size / b->target_page);
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
