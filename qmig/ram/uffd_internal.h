/* What the C files of qmig.ram._uffd share among themselves and Python never calls. */
#ifndef QMIG_UFFD_INTERNAL_H
#define QMIG_UFFD_INTERNAL_H

#include "qmig_uffd.h"

#include <stdint.h>

#define QMIG_REGION (2ull << 20)  /* what one page-table entry at the PMD level maps */

/* Bitmaps are shared between the thread placing pages and the fault thread, so bits change
   with atomic byte operations: a plain read-modify-write would lose a neighbour's bit. */
static inline int bit_test(const uint8_t *map, uint64_t bit)
{
    return (__atomic_load_n(&map[bit >> 3], __ATOMIC_ACQUIRE) >> (bit & 7)) & 1;
}

/* Whether the block's page sizes can be worked with: Python sets target_page from the
   profile; a block without it (or with a size that does not divide the host page) would
   divide by zero or place the wrong bytes. */
static inline int block_sizes_valid(const struct qmig_block *b)
{
    uint64_t t = b->target_page;
    return t && !(t & (t - 1)) && b->page_size >= t && b->page_size % t == 0;
}

/* The index of the block that holds host address addr, or -1: the fault loops' lookup. */
static inline int block_holding(struct qmig_block *const *blocks, int nblocks, uint64_t addr)
{
    for (int i = 0; i < nblocks; i++)
        if (addr >= blocks[i]->host && addr < blocks[i]->host + blocks[i]->length)
            return i;
    return -1;
}

/* records.c: place `pages` host pages of b from host page `host_page` on, from src or as zero
   pages; used by the C fault loop as well. */
int qmig_place_host_pages(struct qmig_block *b, uint64_t host_page, const uint8_t *src,
                          uint64_t pages, int zero, struct qmig_records_result *res);

#endif
