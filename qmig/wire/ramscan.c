/* The RAM-record fast path: decoding, accounting and emitting runs of ZERO/PAGE records,
   and the byte work of POSTCOPY_RAM_DISCARD. Every stream constant (flags, target page
   size) comes in from Python, which takes it from the profile. */
#include "qmig_ramscan.h"

#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

enum { STOP_OTHER = 0, STOP_SHORT = 1, STOP_FULL = 2, STOP_RANGE = 3 };

/* A RAM record starts with one be64, offset | flags; a discard range is two, start and
   length. The sizes follow from the encoding, not from a profile. */
enum { HEADER = sizeof(uint64_t), RANGE = 2 * sizeof(uint64_t) };

static inline uint64_t be64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, sizeof v);
    return __builtin_bswap64(v);
}

/* Decode consecutive ZERO/PAGE records of the current block: those that CONTINUE it and,
 * given its counted name, those that name it again (QEMU names the block afresh after a page
 * it sent out of turn, so postcopy's runs are full of them). Anything else (a record naming
 * another block, EOS, other flags) stops the scan so that the schema decodes it; so does a
 * record that is not complete yet, or one whose offset is outside the block. */
size_t qmig_ram_scan(const uint8_t *buf, size_t len, size_t pos, uint64_t base,
                     struct qmig_ram_scan *scan, const uint8_t *name, size_t name_len,
                     uint64_t *headers, uint64_t *bodies, size_t max_records)
{
    size_t n = 0, zeros = 0;

    scan->stop = STOP_FULL;
    while (n < max_records) {
        if (len - pos < HEADER) { scan->stop = STOP_SHORT; break; }
        uint64_t header = be64(buf + pos);
        uint64_t flags = header & scan->flag_mask;
        uint64_t kind = flags & ~scan->flag_continue;
        size_t body_size, head = HEADER;
        if (kind == scan->flag_zero) body_size = 1;
        else if (kind == scan->flag_page) body_size = scan->page_size;
        else { scan->stop = STOP_OTHER; break; }
        if (flags == kind) {
            /* It names its block: the current one, or the schema reads it. */
            if (!name) { scan->stop = STOP_OTHER; break; }
            head += 1 + name_len;
            if (len - pos < head) { scan->stop = STOP_SHORT; break; }
            if (buf[pos + HEADER] != name_len || memcmp(buf + pos + HEADER + 1, name, name_len)) {
                scan->stop = STOP_OTHER;
                break;
            }
        }
        if ((header & ~scan->flag_mask) >= scan->block_length) { scan->stop = STOP_RANGE; break; }
        if (len - pos - head < body_size) { scan->stop = STOP_SHORT; break; }
        headers[n] = header;
        bodies[n] = base + pos + head;
        zeros += (kind == scan->flag_zero);
        n++;
        pos += head + body_size;
    }
    scan->count = n;
    scan->zero_count = zeros;
    return pos;
}

#define IOV_BATCH 512
/* Same-byte pages are written from one prepared page per byte value: room for target pages
   up to 64 KiB, the largest any QEMU target uses; a larger page size is refused (EINVAL). */
#define QMIG_MAX_FILL_PAGE 65536

static int flush(int fd, struct iovec *iov, int *iovcnt, uint64_t *start, size_t *bytes)
{
    uint64_t offset = *start;
    int i = 0;
    while (i < *iovcnt) {
        ssize_t done = pwritev(fd, iov + i, *iovcnt - i, (off_t)offset);
        if (done < 0) {
            if (errno == EINTR) continue;
            return -errno;
        }
        offset += (uint64_t)done;
        while (i < *iovcnt && (size_t)done >= iov[i].iov_len) {
            done -= (ssize_t)iov[i].iov_len;
            i++;
        }
        if (i < *iovcnt) {
            iov[i].iov_base = (uint8_t *)iov[i].iov_base + done;
            iov[i].iov_len -= (size_t)done;
        }
    }
    *iovcnt = 0;
    *bytes = 0;
    return 0;
}

/* Record what a run did to each target page (1 = data, 2 = same-byte page) and, with an
 * image file, write the pages there: consecutive pages go out in one pwritev. */
int qmig_ram_account(const uint8_t *buf, uint64_t base, const uint64_t *headers,
                     const uint64_t *bodies, size_t n, const struct qmig_ram_scan *scan,
                     uint8_t *state, int fd)
{
    static uint8_t fill_pages[256][QMIG_MAX_FILL_PAGE];
    static uint8_t fill_ready[256];
    struct iovec iov[IOV_BATCH];
    int iovcnt = 0, rc;
    uint64_t run_start = 0, run_next = 0;
    size_t run_bytes = 0;
    const uint64_t page = scan->page_size;

    for (size_t i = 0; i < n; i++) {
        uint64_t offset = headers[i] & ~scan->flag_mask;
        uint64_t index = offset / page;
        int is_page = (headers[i] & scan->flag_page) != 0;
        const uint8_t *body = buf + (bodies[i] - base);
        uint8_t before = state[index];
        state[index] = is_page ? 1 : 2;
        if (fd < 0) continue;
        const uint8_t *data = body;
        if (!is_page) {
            /* A zero page over a never-written page leaves the sparse file as it is. */
            if (body[0] == 0 && before == 0) continue;
            if (page > sizeof fill_pages[0]) return -EINVAL;
            if (!fill_ready[body[0]]) {
                memset(fill_pages[body[0]], body[0], sizeof fill_pages[0]);
                fill_ready[body[0]] = 1;
            }
            data = fill_pages[body[0]];
        }
        if (iovcnt == IOV_BATCH || (iovcnt > 0 && offset != run_next)) {
            if ((rc = flush(fd, iov, &iovcnt, &run_start, &run_bytes)) < 0) return rc;
        }
        if (iovcnt == 0) run_start = offset;
        iov[iovcnt].iov_base = (void *)data;
        iov[iovcnt].iov_len = page;
        iovcnt++;
        run_bytes += page;
        run_next = offset + page;
    }
    if (iovcnt > 0 && (rc = flush(fd, iov, &iovcnt, &run_start, &run_bytes)) < 0) return rc;
    return 0;
}

static inline void put_be64(uint8_t *p, uint64_t v)
{
    v = __builtin_bswap64(v);
    memcpy(p, &v, sizeof v);
}

static int page_is_zero(const uint8_t *page, size_t size)
{
    const uint64_t *words = (const uint64_t *)page;
    for (size_t i = 0; i < size / sizeof *words; i++)
        if (words[i]) return 0;
    return 1;
}

/* The build side of the same records: ZERO or PAGE for each target page index in
 * `pages` of the block at `ram`. The first record carries the block name when `name`
 * is given; every other one is a CONTINUE record. Returns the bytes written to `out`,
 * which must hold n * (8 + page_size) + 1 + name_len bytes. */
size_t qmig_ram_emit(const uint8_t *ram, const uint64_t *pages, size_t n,
                     const struct qmig_ram_scan *scan, const uint8_t *name, size_t name_len,
                     uint8_t *out, size_t *zero_pages)
{
    const uint64_t page = scan->page_size;
    uint8_t *p = out;
    size_t zeros = 0;
    for (size_t i = 0; i < n; i++) {
        const uint8_t *src = ram + pages[i] * page;
        int zero = page_is_zero(src, page);
        uint64_t flags = zero ? scan->flag_zero : scan->flag_page;
        int named = (i == 0 && name != NULL);
        if (!named) flags |= scan->flag_continue;
        put_be64(p, pages[i] * page | flags);
        p += HEADER;
        if (named) {
            *p++ = (uint8_t)name_len;
            memcpy(p, name, name_len);
            p += name_len;
        }
        if (zero) {
            *p++ = 0;
            zeros++;
        } else {
            memcpy(p, src, page);
            p += page;
        }
    }
    *zero_pages = zeros;
    return (size_t)(p - out);
}

/* POSTCOPY_RAM_DISCARD's ranges, (be64 start, be64 length) pairs as on the wire, against one
 * block (see qmig/wire/discard.py). Returns the index of the first range that is not aligned
 * to page_size or not inside used_length, with nothing changed; or n, once every target page
 * of every range is marked missing (0) in state, one byte per target page, and *cleared
 * counts them. */
size_t qmig_discard_apply(const uint8_t *ranges, size_t n, uint64_t page_size,
                          uint64_t used_length, uint64_t target_page_size, uint8_t *state,
                          size_t state_len, uint64_t *cleared)
{
    uint64_t total = 0;
    for (size_t i = 0; i < n; i++) {
        uint64_t start = be64(ranges + RANGE * i), length = be64(ranges + RANGE * i + HEADER);
        if (start % page_size || length % page_size)
            return i;
        if (length > used_length || start > used_length - length)
            return i;
        if ((start + length + target_page_size - 1) / target_page_size > state_len)
            return i;
    }
    for (size_t i = 0; i < n; i++) {
        uint64_t start = be64(ranges + RANGE * i), length = be64(ranges + RANGE * i + HEADER);
        uint64_t first = start / target_page_size, count = length / target_page_size;
        memset(state + first, 0, count);
        total += count;
    }
    *cleared = total;
    return n;
}

/* The runs of dirty pages (bytes equal to 1) in a dirty map of n target pages, as
 * POSTCOPY_RAM_DISCARD ranges: (be64 start, be64 length) byte pairs, the last one clipped to
 * used_length. out must hold 16 * ((n + 1) / 2) bytes. Returns the number of ranges;
 * *pages counts the dirty pages. */
size_t qmig_dirty_ranges(const uint8_t *dirty, size_t n, uint64_t page_size,
                         uint64_t used_length, uint8_t *out, uint64_t *pages)
{
    size_t ranges = 0, at = 0;
    uint64_t total = 0;
    while (at < n) {
        const uint8_t *found = memchr(dirty + at, 1, n - at);
        if (!found)
            break;
        size_t start = (size_t)(found - dirty), end = start;
        while (end < n && dirty[end] == 1)
            end++;
        uint64_t stop = (uint64_t)end * page_size;
        if (stop > used_length)
            stop = used_length;
        put_be64(out + RANGE * ranges, (uint64_t)start * page_size);
        put_be64(out + RANGE * ranges + HEADER, stop - (uint64_t)start * page_size);
        ranges++;
        total += end - start;
        at = end;
    }
    *pages = total;
    return ranges;
}
