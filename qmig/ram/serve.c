/* The fault loop of an in-process page source, entirely in C: no Python object per fault,
   no GIL. */
#define _GNU_SOURCE
#include "uffd_internal.h"

#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <linux/userfaultfd.h>

/* The fault's block, its host page placed from that block's source unless it is in already;
   entry->block stays -1 for a fault in no block. Returns 0 or -errno. */
static int serve_fault(const struct qmig_fault *fault, struct qmig_block **blocks,
                       uint8_t **sources, int nblocks, struct qmig_served *entry)
{
    struct qmig_records_result res;
    int i = block_holding(blocks, nblocks, fault->address);
    if (i < 0)
        return 0;
    struct qmig_block *b = blocks[i];
    entry->block = i;
    uint64_t host_page = (fault->address - b->host) / b->page_size;
    uint64_t per = b->page_size / b->target_page;
    if (bit_test(b->bitmap, host_page * per))
        return 0;  /* placed between the fault and our read: already woken */
    memset(&res, 0, sizeof(res));
    res.first_page = UINT64_MAX;
    int ret = qmig_place_host_pages(b, host_page, sources[i] + host_page * b->page_size,
                                    1, 0, &res);
    if (ret < 0)
        return ret;
    __atomic_fetch_add(&b->served, res.placed, __ATOMIC_RELAXED);
    if (res.placed)
        entry->placed_ns = b->placed_ns ? b->placed_ns[host_page] : qmig_now_ns();
    return 0;
}

/* Read faults in batches, place each missing host page from sources[block] (same layout as
   the block) with UFFDIO_COPY, keep the bitmap, and log every fault with its times for the
   Python side's statistics. Stops, returning the faults logged, when quitfd is readable
   (*stop = 0), the log is full (1), or after a fault in no block or a message that is no page
   fault (2: entries with block -1, for Python to report). Returns -errno on a failed read or placement, or -EINVAL for a block
   whose sizes are not set. */
int64_t qmig_serve_blocks(int uffd, int quitfd, struct qmig_block **blocks,
                          uint8_t **sources, int nblocks, uint64_t spin_ns,
                          struct qmig_served *log, uint64_t log_cap, int *stop)
{
    struct qmig_fault faults[QMIG_FAULT_BATCH];
    uint64_t n = 0;
    int got = 0, quit = 0;
    *stop = 0;
    for (int i = 0; i < nblocks; i++)
        if (!block_sizes_valid(blocks[i]))
            return -EINVAL;
    while (n < log_cap) {
        int room = log_cap - n < QMIG_FAULT_BATCH ? (int)(log_cap - n) : QMIG_FAULT_BATCH;
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
            entry->read_ns = faults[k].t_ns;
            entry->address = faults[k].address;
            entry->end = faults[k].end;
            entry->tid = faults[k].tid;
            entry->event = faults[k].event;
            entry->placed_ns = 0;
            entry->block = -1;
            if (faults[k].event != UFFD_EVENT_PAGEFAULT) {
                *stop = 2;  /* another event: Python reports it, as a stray fault */
                continue;
            }
            int ret = serve_fault(&faults[k], blocks, sources, nblocks, entry);
            if (ret < 0)
                return ret;
            if (entry->block < 0)
                *stop = 2;  /* reported after this batch: its messages are read already */
        }
        if (*stop == 2 || quit)
            return (int64_t)n;
    }
    *stop = 1;
    return (int64_t)n;
}
