/* qmig.runner._answer: the source's answer thread, on the preempt channel (QEMU 8.0+ variant)
   or on the main channel (no preempt: QEMU's migration thread sends queued requests first).

   The declarations that the C file and Python share. _answer_build.py gives this file to
   cffi's cdef without its '#' lines, so everything else here must be a plain C declaration.
   Every stream constant (message numbers, RAM flags, page size) comes in from Python, which
   takes it from the profile. */
#ifndef QMIG_ANSWER_H
#define QMIG_ANSWER_H

#include <stddef.h>
#include <stdint.h>

/* One guest RAM block as the thread may serve it. Python owns the memory behind each pointer
   and keeps it alive (and the dirty map the same object) until qmig_answer_stop returns. */
struct qmig_answer_block {
    const uint8_t *ram;        /* the block's guest memory */
    uint8_t *dirty;            /* the source's dirty map, one byte per target page: the thread
                                  clears what it writes, so a page goes out once */
    uint64_t pages;            /* bytes in the dirty map */
    uint64_t used_length;
    uint64_t host_page_size;   /* the block's page size: a request is answered in these */
    const uint8_t *name;       /* idstr, latin-1, not NUL-terminated */
    uint32_t name_len;
};

struct qmig_answer_config {
    int32_t rp_fd;             /* the return path (the main channel's socket), read here */
    int32_t preempt_fd;        /* the preempt channel, written here; -1: the main channel
                                  (rp_fd) is, between the records Python writes (see
                                  qmig_answer_hold) */
    int32_t pipe_fd;           /* every byte read from rp_fd goes on here, for Python */
    int32_t last_block;        /* the preempt channel's last named block; -1: none yet */
    int32_t request_block;     /* the block the return path's last REQ_PAGES_ID named, read
                                  before the thread took over (a REQ_PAGES asks for more of
                                  it); -1: none */
    uint32_t req_pages;        /* return-path message numbers */
    uint32_t req_pages_id;
    uint32_t rp_max_length;
    uint32_t source_host_page; /* requests must be aligned to this (the source's host page) */
    uint64_t target_page_size;
    uint64_t flag_zero;
    uint64_t flag_page;
    uint64_t flag_continue;
    int32_t stall_ms;          /* main channel: a write that waits this long fails; 0: never */
};

/* One host page answered: what the source machine must learn. */
struct qmig_answer_entry {
    uint32_t block;
    uint32_t pages;            /* target pages written */
    uint64_t request_start;    /* byte offset of the request it answers */
    uint64_t first;            /* the host page's first target page */
    uint64_t mask;             /* bit i: target page first + i was written */
    uint64_t bytes;
    uint64_t zeros;
    uint64_t read_ns;          /* CLOCK_MONOTONIC: the request read from the socket */
    uint64_t sent_ns;          /* CLOCK_MONOTONIC: its records written */
};

/* One background sweep on the main channel (qmig_answer_sweep): what it wrote. */
struct qmig_sweep_result {
    uint64_t pages;            /* target pages written */
    uint64_t zeros;            /* of which ZERO records */
    uint64_t bytes;
    uint64_t last;             /* the last target page written (valid when pages > 0) */
    uint64_t writes;           /* writev calls */
    int32_t yielded;           /* the sweep let the thread's answers go first, at least once */
};

void *qmig_answer_start(const struct qmig_answer_config *config,
                        const struct qmig_answer_block *blocks, uint32_t count, int *error);
size_t qmig_answer_drain(void *answer, struct qmig_answer_entry *out, size_t max);
int qmig_answer_write(void *answer, const uint8_t *data, size_t len, int32_t last_block);
int32_t qmig_answer_last_block(void *answer);
void qmig_answer_hold(void *answer);
void qmig_answer_release(void *answer, int32_t open, int64_t credit, uint64_t window_end_ns);
int qmig_answer_sweep(void *answer, int32_t block, uint64_t start, uint64_t limit,
                      int32_t named, uint64_t batch_bytes, int64_t credit,
                      uint64_t window_end_ns, struct qmig_sweep_result *out);
int qmig_answer_waiting(void *answer);
int qmig_answer_stop(void *answer, int *declined);
void qmig_answer_free(void *answer);

#endif
