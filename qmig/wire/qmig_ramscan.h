/* The RAM-record fast path of qmig.wire._ramscan (see ramscan.py): the declarations that
   ramscan.c and Python share. _ramscan_build.py gives this file to cffi's cdef without its
   '#' lines, so everything else here must be a plain C declaration. */
#ifndef QMIG_RAMSCAN_H
#define QMIG_RAMSCAN_H

#include <stddef.h>
#include <stdint.h>

/* The stream's constants (from the profile, set by Python) and one scan's outcome. */
struct qmig_ram_scan {
    uint64_t flag_mask;       /* every RAM flag bit of a record header */
    uint64_t flag_continue;
    uint64_t flag_zero;
    uint64_t flag_page;
    uint64_t page_size;       /* the stream's target page size */
    uint64_t block_length;    /* the current block's used length */
    size_t count;             /* out: records decoded */
    size_t zero_count;        /* out: of which ZERO records */
    int stop;                 /* out: why the scan stopped (ramscan.py's Stop) */
};

size_t qmig_ram_scan(const uint8_t *buf, size_t len, size_t pos, uint64_t base,
                     struct qmig_ram_scan *scan, const uint8_t *name, size_t name_len,
                     uint64_t *headers, uint64_t *bodies, size_t max_records);

int qmig_ram_account(const uint8_t *buf, uint64_t base, const uint64_t *headers,
                     const uint64_t *bodies, size_t n, const struct qmig_ram_scan *scan,
                     uint8_t *state, int fd);

size_t qmig_ram_emit(const uint8_t *ram, const uint64_t *pages, size_t n,
                     const struct qmig_ram_scan *scan, const uint8_t *name, size_t name_len,
                     uint8_t *out, size_t *zero_pages);

size_t qmig_discard_apply(const uint8_t *ranges, size_t n, uint64_t page_size,
                          uint64_t used_length, uint64_t target_page_size, uint8_t *state,
                          size_t state_len, uint64_t *cleared);

size_t qmig_dirty_ranges(const uint8_t *dirty, size_t n, uint64_t page_size,
                         uint64_t used_length, uint8_t *out, uint64_t *pages);

#endif
