/* The background sweep of postcopy, off the Python path: the main channel's pages that no
   request asked for, written from guest RAM as the source machine would write them.

   The machine stays the one authority over the stream. It picks where the sweep starts (the
   block, its first dirty page, how many pages and whether the first record names the block:
   Source.sweep_order), and learns afterwards what was written (Source.swept); the sweep only
   takes the dirty target pages from there on, in order, up to the limit and then the rest of
   the last host page, exactly as the machine's own batch would, and writes their records.
   It runs on the loop's thread with the GIL released. Where the thread answers on the main
   channel, the wire is held (between qmig_answer_hold and _release): between host pages, in
   batches of about batch_bytes, it lets the answer thread go first when it waits for the
   wire, as QEMU's migration thread takes a queued request before its next background page.
   An answer at the sweep's front (the guest faulted on the page the sweep was coming to,
   reading on) leaves the sweep where it was going: it goes on, naming the block again, the
   thread's pages counted in the turn's limit, so that the pages after the guest's keep
   coming at once, instead of each waiting for a turn of the machine and then asked for.
   Any other answer moves the machine's sweep after the requested page: the sweep stops, and
   the machine, told of the answers, orders the next batch from there. Where the thread
   answers on the preempt channel, each batch's pages are picked holding the wire (the
   thread clears dirty bytes under it) and written without it, so an urgent page never
   waits for the main channel's write. */
#include "answer_internal.h"

#include <errno.h>

/* BATCH_PAGES: the most records in one write. FRONT: the most target pages an answer may
   lie from the sweep's next page and still count as at its front. */
enum { BATCH_PAGES = 2 * MAX_PER_HOST, FRONT = 4 * MAX_PER_HOST };

struct batch {
    uint8_t headers[BATCH_PAGES][RAM_HEADER + 1 + 255];
    struct iovec iov[2 * BATCH_PAGES];
    int records;
    uint64_t bytes;
};

/* One target page's record into the batch; its dirty byte cleared (it goes out once). */
static void add_record(struct answer *a, const struct qmig_answer_block *b, uint64_t page,
                       int named, struct batch *s, struct qmig_sweep_result *out)
{
    int zero;
    s->bytes += qmig_page_record(a, b, page, named, s->headers[s->records],
                                 &s->iov[2 * s->records], &zero);
    s->records++;
    out->pages++;
    out->zeros += (uint64_t)zero;
    out->last = page;
}

/* Fill a batch from *page on: dirty pages until the limit, then the rest of that host page;
   whole host pages only, up to about batch_bytes. *page: where the next batch starts.
   Returns 1 when the sweep is done after this batch (the limit, or the block's end). */
static int fill(struct answer *a, const struct qmig_answer_block *b, uint64_t *page,
                uint64_t limit, int *named, uint64_t batch_bytes, struct batch *s,
                struct qmig_sweep_result *out)
{
    const uint64_t per_host = b->host_page_size / a->cfg.target_page_size;
    while (*page < b->pages) {
        uint64_t host_end = *page - *page % per_host + per_host;
        if (host_end > b->pages) host_end = b->pages;
        if (s->records && (s->bytes >= batch_bytes || s->records + per_host > BATCH_PAGES))
            return 0;
        int done = 0;
        for (; *page < host_end; (*page)++) {
            if (!b->dirty[*page]) continue;
            add_record(a, b, *page, *named, s, out);
            *named = 0;
            done |= out->pages >= limit;  /* and the rest of this host page */
        }
        if (done) return 1;
    }
    return 1;
}

/* Is every target page of [from, to) clean? */
static int clean_between(const struct qmig_answer_block *b, uint64_t from, uint64_t to)
{
    for (; from < to && from < b->pages; from++)
        if (b->dirty[from]) return 0;
    return 1;
}

/* Let the answer thread have the wire now (inside a RAM section's records, with what the
   window has left), and take it back once it has written. Returns 1 when the answers were
   at the sweep's front (a guest that faulted there, reading on): in this block, and moving
   the machine's sweep neither past nor back over a dirty page, so that it goes on from
   *page (moved there) as it would have without them, the next record naming the block, and
   *limit less the pages the thread wrote, which count in the turn as a request's pages
   count in the machine's own batch. 0: it stops there, and the machine orders the next
   batch from where the answers moved its sweep (elsewhere, in another block, one left to
   Python, or none). */
static int yield_wire(struct answer *a, int32_t block, int64_t credit, uint64_t window_end_ns,
                      uint64_t *page, uint64_t *limit)
{
    a->moved_block = -1;
    a->moved_pages = 0;
    qmig_answer_release(a, 1, credit, window_end_ns);
    qmig_answer_hold(a);
    if (a->moved_block != block || a->moved_pages >= *limit) return 0;
    uint64_t to = a->moved_to, lo = to < *page ? to : *page, hi = to < *page ? *page : to;
    if (hi - lo > FRONT || !clean_between(&a->blocks[block], lo, hi)) return 0;
    *page = to;
    *limit -= a->moved_pages;
    return 1;
}

int qmig_answer_sweep(void *answer, int32_t block, uint64_t start, uint64_t limit,
                      int32_t named, uint64_t batch_bytes, int64_t credit,
                      uint64_t window_end_ns, struct qmig_sweep_result *out)
{
    struct answer *a = answer;
    *out = (struct qmig_sweep_result){0};
    if (block < 0 || (uint32_t)block >= a->count || limit == 0)
        return -EINVAL;
    const struct qmig_answer_block *b = &a->blocks[block];
    int timeout = a->cfg.stall_ms > 0 ? a->cfg.stall_ms : -1;
    uint64_t page = start;
    int64_t theirs = 0;  /* the thread's bytes, written while this sweep let it */
    struct batch s;
    for (;;) {
        s.records = 0;
        s.bytes = 0;
        /* With preempt the thread writes on its own channel, and takes the wire only to
           clear dirty bytes: a piece's pages are picked holding it, and written without. */
        if (!a->main_channel) pthread_mutex_lock(&a->wire);
        int done = fill(a, b, &page, limit, &named, batch_bytes, &s, out);
        if (!a->main_channel) pthread_mutex_unlock(&a->wire);
        if (s.records) {
            int rc = qmig_write_all(a->cfg.rp_fd, a->stop_fd, timeout, s.iov, 2 * s.records);
            if (rc < 0) return rc;
            out->bytes += s.bytes;
            out->writes++;
        }
        if (done) return 0;
        if (a->main_channel && __atomic_load_n(&a->wanted, __ATOMIC_SEQ_CST) > 0) {
            /* The window's quota left to the thread: less this sweep's bytes and what the
               thread wrote in the earlier turns it had (its credit then, less what is left). */
            int64_t left = credit - (int64_t)out->bytes - theirs;
            left = credit < 0 ? -1 : (left > 0 ? left : 0);
            out->yielded = 1;
            int on = yield_wire(a, block, left, window_end_ns, &page, &limit);
            if (credit >= 0) theirs += left - a->credit;
            if (!on || out->pages >= limit) return 0;
            named = 1;
        }
    }
}
