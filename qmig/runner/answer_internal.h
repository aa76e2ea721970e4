/* What the C files of qmig.runner._answer share among themselves and Python never calls: the
   thread's state (answer.c) and the helpers the background sweep (sweep.c) writes with. */
#ifndef QMIG_ANSWER_INTERNAL_H
#define QMIG_ANSWER_INTERNAL_H

#include "qmig_answer.h"

#include <pthread.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>

enum { RP_HEADER = 4, RAM_HEADER = 8, MAX_PER_HOST = 64, QUEUE = 1 << 14, READ_SIZE = 64 << 10 };

struct answer {
    struct qmig_answer_config cfg;
    struct qmig_answer_block *blocks;
    uint32_t count;
    int stop_fd;
    pthread_t thread;
    pthread_mutex_t lock;        /* the preempt channel, last_block and the queue */
    int32_t last_block;
    struct qmig_answer_entry queue[QUEUE];
    size_t head, used;
    int parsing;                 /* 0 once something odd came: everything else is Python's */
    int32_t request_block;       /* the block the last REQ_PAGES_ID named; -1: none usable */
    uint8_t msg[RP_HEADER + 65536];
    size_t have;
    int declined;                /* well-formed requests left to Python */
    int main_channel;            /* answers go on rp_fd, between Python's writes */
    pthread_mutex_t wire;        /* main channel: Python's writes and the thread's take turns */
    pthread_cond_t turn;         /* Python waits here while the thread wants the wire */
    int wanted;                  /* the thread waits for the wire (atomic) */
    int open;                    /* the stream as written ends inside a RAM section's records */
    int capped;                  /* a bandwidth cap holds the main channel */
    int64_t credit;              /* the cap's quota left in its window (may go below 0) */
    uint64_t window_end;         /* CLOCK_MONOTONIC ns: the window's end */
    /* Main channel, while the sweep lets the thread have the wire: where the machine's sweep
       goes on after the requests answered meanwhile (block, target page; moved_block -1:
       none answered, -2: one left to Python) and the target pages the thread wrote. */
    int32_t moved_block;
    uint64_t moved_to, moved_pages;
    uint8_t buf[READ_SIZE];
};

/* One host page's records, ready to write. */
struct host_page {
    uint8_t headers[MAX_PER_HOST][RAM_HEADER + 1 + 255];
    struct iovec iov[2 * MAX_PER_HOST];
    int n;
    struct qmig_answer_entry e;
};

static inline uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static inline uint16_t be16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static inline uint32_t be32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}
static inline uint64_t be64(const uint8_t *p) { return (uint64_t)be32(p) << 32 | be32(p + 4); }
static inline void put_be64(uint8_t *p, uint64_t v)
{
    for (int i = 7; i >= 0; i--, v >>= 8) p[i] = (uint8_t)v;
}

static inline int page_is_zero(const uint8_t *p, uint64_t size)
{
    return p[0] == 0 && memcmp(p, p + 1, size - 1) == 0;
}

/* answer.c: every byte of the iovecs written (the socket may be non-blocking), waiting for
   room meanwhile; the main channel's hand-over of the wire. */
int qmig_write_all(int fd, int stop_fd, int timeout_ms, struct iovec *iov, int n);
void qmig_give_wire(struct answer *a);
/* answer.c: one target page's record, as the thread and the sweep write it. */
size_t qmig_page_record(const struct answer *a, const struct qmig_answer_block *b,
                        uint64_t page, int named, uint8_t *header, struct iovec *iov, int *zero);

#endif
