/* A vCPU-like workload in C: touches guest memory at a pattern and rate, blocking on missing
   pages as a vCPU does, and checks each page's tag. */
#define _GNU_SOURCE
#include "uffd_internal.h"

#include <errno.h>
#include <stdint.h>
#include <time.h>

enum { PATTERN_SEQUENTIAL = 0, PATTERN_RANDOM = 1, PATTERN_HOTSET = 2 };

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

/* The page the i-th touch goes to, of `pages`. */
static uint64_t next_page(const struct qmig_workload *w, uint64_t *state, uint64_t i,
                          uint64_t pages)
{
    switch (w->pattern) {
    case PATTERN_RANDOM:
        return xorshift(state) % pages;
    case PATTERN_HOTSET: {
        uint64_t hot = w->hot_pages && w->hot_pages <= pages ? w->hot_pages : pages;
        if (xorshift(state) % 100 < w->hot_percent)
            return xorshift(state) % hot;
        return xorshift(state) % pages;
    }
    default:
        return i % pages;
    }
}

/* One touch at offset `off` from base; 0, or 1 when the owner aborted the run. */
static int touch(struct qmig_workload *w, uint64_t off, uint64_t i)
{
    volatile uint64_t *word = (volatile uint64_t *)(uintptr_t)(w->base + off);
    uint64_t value = word[0];
    /* The flag must be read after the touch, never before: a full fence, not just acquire. */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (__atomic_load_n(w->abort, __ATOMIC_ACQUIRE))
        return 1;
    if (w->check && value != (w->tag_xor ^ (w->tag_base + off))) {
        if (!w->mismatches)
            w->first_mismatch = off;
        w->mismatches++;
    }
    w->checksum += value;
    if (w->write && w->stride >= 2 * sizeof(uint64_t))
        word[1] = i;  /* dirty the page, leaving its tag intact */
    w->done++;
    return 0;
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
        uint64_t page = next_page(w, &state, i, pages);
        if (touch(w, page * w->stride, i)) {
            w->aborted = 1;
            break;
        }
    }
    w->t_end_ns = qmig_now_ns();
    return w->aborted ? -EINTR : 0;
}
