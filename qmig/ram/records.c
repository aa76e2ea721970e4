/* Runs of stream records (ZERO/PAGE) into a block, in one call: before registration as
   direct writes (precopy), after it as coalesced UFFDIO_COPY/ZEROPAGE runs (postcopy), and
   into huge host pages by gathering their target pages first. The target page size is the
   block's target_page, set by Python from the profile. */
#define _GNU_SOURCE
#include "uffd_internal.h"

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22  /* Linux 5.14; older kernels say EINVAL */
#endif
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

/* Placing ioctls that keep answering EAGAIN (the mm keeps changing) give up after this many
   tries without progress. */
#define EAGAIN_RETRIES 100000
/* Direct runs of data pages at least this long are populated with one madvise first; for
   shorter ones a fault per page costs no more. */
#define POPULATE_MIN_RUN 16

/* --- the per-thread scratch buffer ---------------------------------------------------- */

/* Pages are gathered into one contiguous buffer so that a run of them costs one ioctl: the
   records' bodies sit a header apart in the stream, and a memcpy (~10 GiB/s) is much cheaper
   than the per-ioctl cost it saves. One buffer per thread, kept for the thread's life, since
   several threads may place into small-page blocks at once. */
struct scratch {
    uint64_t size;
    uint8_t *data;
};

static pthread_key_t scratch_key;
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;

static void scratch_free(void *p)
{
    struct scratch *s = p;
    free(s->data);
    free(s);
}

static void scratch_key_make(void) { pthread_key_create(&scratch_key, scratch_free); }

static uint8_t *scratch_buffer(uint64_t target_page)
{
    uint64_t size = QMIG_SCRATCH_PAGES * target_page;
    pthread_once(&scratch_once, scratch_key_make);
    struct scratch *s = pthread_getspecific(scratch_key);
    if (!s) {
        if (!(s = calloc(1, sizeof *s)))
            return NULL;
        pthread_setspecific(scratch_key, s);
    }
    if (s->size < size) {
        void *data;
        if (posix_memalign(&data, target_page, size))
            return NULL;
        free(s->data);
        s->data = data;
        s->size = size;
    }
    return s->data;
}

/* --- placing whole host pages by ioctl ------------------------------------------------- */

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
int qmig_place_host_pages(struct qmig_block *b, uint64_t host_page, const uint8_t *src,
                          uint64_t pages, int zero, struct qmig_records_result *res)
{
    uint64_t per = b->page_size / b->target_page;
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
            if (!whole && ++retries > EAGAIN_RETRIES)
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

/* --- direct writes, before registration -------------------------------------------------- */

static int page_is_zero(const uint8_t *page, uint64_t size)
{
    const uint64_t *word = (const uint64_t *)page;
    for (size_t i = 0; i < size / sizeof *word; i++)
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
    uint8_t *start = (uint8_t *)(uintptr_t)(b->host + first * b->target_page);
    if (madvise(start, count * b->target_page, MADV_POPULATE_READ) != 0) {
        for (uint64_t k = 0; k < count; k++)  /* older kernels: a read maps it just the same */
            (void)*(volatile uint8_t *)(start + k * b->target_page);
    }
}

/* While THP is on (precopy, before any discard), every 2 MiB of the block is read once before
   qmig writes into it: untouched, that read maps the huge zero page over all of it, so its zero
   pages need nothing more. Writing into the huge zero page would allocate and clear a whole
   huge page (Linux 6.x does, as it does for a write into untouched THP memory), so the first
   write into such a region drops the page it writes (MADV_DONTNEED), which splits the mapping
   into small zero pages: the write then allocates one page. Region states: */
enum { REGION_UNREAD, REGION_HUGE_ZERO, REGION_PARTLY_MAPPED, REGION_SPLIT };

/* Whether [from, to) is wholly mapped (mincore says so: a region written before, or in swap,
   may not be). Regions are kept for blocks of the system's page size only. */
static int wholly_mapped(const struct qmig_block *b, uint64_t from, uint64_t to)
{
    unsigned char vec[QMIG_REGION / b->page_size];
    int mapped = mincore((void *)(uintptr_t)from, to - from, vec) == 0;
    for (uint64_t k = 0; mapped && k < (to - from) / b->page_size; k++)
        mapped = vec[k] & 1;
    return mapped;
}

/* Reads the regions over [offset, offset + len) not read yet; returns 1 when every one of
   them is wholly mapped. */
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
            b->regions[r] = wholly_mapped(b, from, to) ? REGION_HUGE_ZERO : REGION_PARTLY_MAPPED;
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
        madvise((void *)(uintptr_t)at, b->target_page, MADV_DONTNEED);
        b->regions[r] = REGION_SPLIT;
    }
}

/* Before registration: write straight into the mapping, as QEMU does in precopy. Zero pages
   are written too, not skipped: the write populates the page, so that after registration it
   can never fault with its bit set, and a page discarded before LISTEN still holds its old
   bytes until the sweep (a clear bit says nothing about the contents). */
static void write_direct(struct qmig_block *b, uint64_t offset, const uint8_t *body, int is_data)
{
    const uint64_t size = b->target_page;
    uint8_t *dst = (uint8_t *)(uintptr_t)(b->host + offset);
    if (is_data) {
        split_regions(b, offset, size);
        memcpy(dst, body, size);
    } else if (body[0] != 0 || !page_is_zero(dst, size)) {
        /* A zero page is only written where memory is not zero already, as QEMU does:
           reading an untouched page maps the kernel's shared zero page, while writing it
           would allocate and clear a page for nothing (most of a guest's RAM is zero). */
        split_regions(b, offset, size);
        memset(dst, body[0], size);
    }
    if (b->touched)
        qmig_bitmap_set(b->touched, offset / size, 1);
    qmig_bitmap_set(b->bitmap, offset / size, 1);
}

/* --- huge host pages, registered ------------------------------------------------------- */

/* Huge host pages: gather target pages in the block's staging page and place the host page
   with one UFFDIO_COPY once all of them are there. Postcopy sends a host page's target pages
   together (QEMU checks it), so one staging page per block suffices; another host page
   arriving while one is incomplete is -EBUSY. */
static int stage_target_page(struct qmig_block *b, uint64_t offset, const uint8_t *body,
                             int is_data, struct qmig_records_result *res)
{
    const uint64_t size = b->target_page;
    uint64_t per = b->page_size / size;
    uint64_t host_page = offset / b->page_size;
    uint64_t index = (offset % b->page_size) / size;
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
    uint8_t *slot = b->staging + index * size;
    if (is_data)
        memcpy(slot, body, size);
    else
        memset(slot, body[0], size);
    if (!b->staged[index]) {
        b->staged[index] = 1;
        b->staged_count++;
    }
    if (b->staged_count < per)
        return 0;
    b->staging_page = UINT64_MAX;
    b->staged_count = 0;
    return qmig_place_host_pages(b, host_page, b->staging, 1, 0, res);
}

/* --- qmig_place_records: one function per mode ------------------------------------------- */

/* One qmig_place_records call: its arguments and what it keeps between records. */
struct records {
    struct qmig_block *b;
    const uint8_t *data;
    uint64_t data_base;
    const uint64_t *headers;
    const uint64_t *bodies;
    uint64_t count;
    uint64_t page_flag;
    int replace;
    uint64_t page;            /* the target page size */
    unsigned shift;           /* log2(page) */
    uint64_t max_run;         /* target pages per placing ioctl */
    uint8_t *scratch;         /* this thread's, once a run needs it */
    struct qmig_records_result *res;
};

static inline uint64_t rec_offset(const struct records *r, uint64_t i)
{
    return r->headers[i] & ~(r->page - 1);
}

static inline uint64_t rec_index(const struct records *r, uint64_t offset)
{
    return offset >> r->shift;
}

static inline const uint8_t *rec_body(const struct records *r, uint64_t i)
{
    return r->data + (r->bodies[i] - r->data_base);
}

static inline int rec_is_data(const struct records *r, uint64_t i)
{
    return (r->headers[i] & r->page_flag) != 0;
}

/* A page of zero bytes (a ZERO record, or a fill record of byte 0). */
static inline int rec_zero_fill(const struct records *r, uint64_t i)
{
    return !rec_is_data(r, i) && rec_body(r, i)[0] == 0;
}

/* Not registered, and a huge block or a page already received: one record, written. */
static int64_t direct_single(struct records *r, uint64_t i, uint64_t offset)
{
    prepare_regions(r->b, offset, r->page);
    write_direct(r->b, offset, rec_body(r, i), rec_is_data(r, i));
    r->res->written++;
    return 1;
}

/* Records from i on that continue a direct run: the next target page, not received yet, of
   the same kind (zero fill or not). */
static uint64_t direct_run_length(const struct records *r, uint64_t i, uint64_t offset,
                                  int zero_fill)
{
    uint64_t run = 1;
    while (i + run < r->count && run < QMIG_SCRATCH_PAGES &&
           rec_offset(r, i + run) == offset + run * r->page &&
           rec_offset(r, i + run) < r->b->length &&
           !bit_test(r->b->bitmap, rec_index(r, offset) + run) &&
           zero_fill == rec_zero_fill(r, i + run))
        run++;
    return run;
}

/* A direct run of zero pages, where the block knows which pages qmig wrote: the others need
   no write, only a mapping (none when their regions are wholly mapped already). */
static void direct_zero_run(struct records *r, uint64_t i, uint64_t offset, uint64_t run,
                            int mapped)
{
    struct qmig_block *b = r->b;
    uint64_t first = rec_index(r, offset), untouched = 0;
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
            write_direct(b, offset + k * r->page, rec_body(r, i + k), 0);
    }
}

/* Not registered, small pages not received yet: a run of them handled together. Zero pages:
   a page of the fresh mapping that qmig never wrote is zero already, so it needs no write,
   only a mapping (the huge zero page over its region, else the zero page, in bulk). Whether
   it is resident says nothing (it may be in swap): the touched bitmap does. Pages with
   content: populated with one madvise first, since allocating pages in bulk beats taking a
   page fault on each first write. */
static int64_t direct_run(struct records *r, uint64_t i, uint64_t offset)
{
    struct qmig_block *b = r->b;
    int zero_fill = rec_zero_fill(r, i);
    uint64_t run = direct_run_length(r, i, offset, zero_fill);
    int mapped = prepare_regions(b, offset, run * r->page);
    if (zero_fill && b->touched) {
        direct_zero_run(r, i, offset, run, mapped);
    } else {
        if (run >= POPULATE_MIN_RUN && !zero_fill) {
            split_regions(b, offset, run * r->page);
            madvise((void *)(uintptr_t)(b->host + offset), run * r->page,
                    MADV_POPULATE_WRITE);  /* a hint: failure costs nothing */
        }
        for (uint64_t k = 0; k < run; k++)
            write_direct(b, rec_offset(r, i + k), rec_body(r, i + k), rec_is_data(r, i + k));
    }
    r->res->written += run;
    return (int64_t)run;
}

/* Registered huge block: the record's target page goes to the staging page. */
static int64_t staged(struct records *r, uint64_t i, uint64_t offset)
{
    int ret = stage_target_page(r->b, offset, rec_body(r, i), rec_is_data(r, i), r->res);
    return ret < 0 ? ret : 1;
}

/* Records from i on that one placing ioctl can take with record i: the next target page, of
   the same kind (zero page or data), not received yet. */
static uint64_t registered_run_length(const struct records *r, uint64_t i, uint64_t offset,
                                      int zero)
{
    const struct qmig_block *b = r->b;
    uint64_t page = rec_index(r, offset);
    /* Fewer data pages per copy where the runner asks for it: a vCPU waiting on the first
       page of a chunk is then woken once that page is in, not the whole chunk. */
    uint64_t limit = !zero && b->max_data_run && b->max_data_run < r->max_run ? b->max_data_run
                                                                             : r->max_run;
    uint64_t run = 1;
    while (i + run < r->count && run < limit) {
        uint64_t next = rec_offset(r, i + run);
        int next_zero = rec_zero_fill(r, i + run) && b->zeropage;
        if (next != offset + run * r->page || next_zero != zero || next >= b->length ||
            bit_test(b->bitmap, page + run))
            break;
        run++;
    }
    return run;
}

/* Where a run's bytes come from: a lone data page straight from the stream (COPY takes any
   alignment), several gathered in the scratch buffer; none for zero pages. */
static int run_source(struct records *r, uint64_t i, uint64_t run, int zero,
                      const uint8_t **src)
{
    *src = NULL;
    if (run == 1 && rec_is_data(r, i)) {
        *src = rec_body(r, i);
        return 0;
    }
    if (zero)
        return 0;
    if (!r->scratch && !(r->scratch = scratch_buffer(r->page)))
        return -ENOMEM;
    for (uint64_t k = 0; k < run; k++) {
        const uint8_t *from = rec_body(r, i + k);
        if (rec_is_data(r, i + k))
            memcpy(r->scratch + k * r->page, from, r->page);
        else
            memset(r->scratch + k * r->page, from[0], r->page);
    }
    *src = r->scratch;
    return 0;
}

/* Registered small pages: consecutive pages not received yet go in with one UFFDIO_COPY or
   UFFDIO_ZEROPAGE. With `replace` (precopy re-sends after registration), a page already in
   place is dropped first (MADV_DONTNEED) and placed again; without it, it is a duplicate. */
static int64_t registered_run(struct records *r, uint64_t i, uint64_t offset)
{
    struct qmig_block *b = r->b;
    uint64_t page = rec_index(r, offset);
    if (bit_test(b->bitmap, page)) {
        if (!r->replace) {
            r->res->existing++;
            return 1;
        }
        qmig_bitmap_clear(b->bitmap, page, 1);
        int ret = qmig_madvise(b->host + offset, r->page, MADV_DONTNEED);
        if (ret < 0)
            return ret;
    }
    int zero = rec_zero_fill(r, i) && b->zeropage;
    uint64_t run = registered_run_length(r, i, offset, zero);
    const uint8_t *src;
    int ret = run_source(r, i, run, zero, &src);
    if (ret == 0)
        ret = qmig_place_host_pages(b, page, src, run, zero, r->res);
    return ret < 0 ? ret : (int64_t)run;
}

/* Record i and the ones a mode takes with it: how many were consumed, or -errno. */
static int64_t place_from(struct records *r, uint64_t i)
{
    const struct qmig_block *b = r->b;
    uint64_t offset = rec_offset(r, i);
    int huge = b->page_size != r->page;
    if (offset >= b->length || b->length - offset < r->page)
        return -ERANGE;
    if (b->fd < 0) {
        if (huge || bit_test(b->bitmap, rec_index(r, offset)))
            return direct_single(r, i, offset);
        return direct_run(r, i, offset);
    }
    return huge ? staged(r, i, offset) : registered_run(r, i, offset);
}

/* Place a run of ZERO/PAGE records into block b in one call. Record i's header is its target
   page offset | flags (page_flag set: a data page, else a fill-byte page); its body (a target
   page of data, or the fill byte) is at data + bodies[i] - data_base. Each record goes to one
   of four modes (place_from): direct runs and direct single writes before registration
   (fd < 0), staged huge pages and coalesced small-page runs after it, up to max_run pages per
   ioctl. Returns 0, or -errno with res->error_record set (-ERANGE: an offset outside the
   block; -EBUSY: interleaved huge host pages; -EINVAL: the block's target_page is not set;
   ENOENT/ESRCH: faulting side gone). */
int qmig_place_records(struct qmig_block *b, const uint8_t *data, uint64_t data_base,
                       const uint64_t *headers, const uint64_t *bodies, uint64_t count,
                       uint64_t page_flag, int replace, struct qmig_records_result *res)
{
    memset(res, 0, sizeof(*res));
    res->first_page = UINT64_MAX;
    int ret = block_sizes_valid(b) ? 0 : -EINVAL;
    uint64_t i = 0;
    struct records r = {
        .b = b, .data = data, .data_base = data_base, .headers = headers, .bodies = bodies,
        .count = count, .page_flag = page_flag, .replace = replace, .page = b->target_page,
        .shift = b->target_page ? (unsigned)__builtin_ctzll(b->target_page) : 0,
        .max_run = b->max_run && b->max_run < QMIG_SCRATCH_PAGES ? b->max_run
                                                                  : QMIG_SCRATCH_PAGES,
        .res = res,
    };
    while (ret == 0 && i < count) {
        int64_t used = place_from(&r, i);
        if (used < 0)
            ret = (int)used;
        else
            i += (uint64_t)used;
    }
    if (ret < 0)
        res->error_record = i;
    if (res->first_page == UINT64_MAX)
        res->first_page = res->end_page = 0;
    res->t_ns = qmig_now_ns();
    return ret;
}
