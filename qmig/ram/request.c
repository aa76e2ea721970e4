/* Page requests from C: a fault becomes a REQ_PAGES or REQ_PAGES_ID on the return path with
   no Python in between.

   The message bytes are not known here: Python builds, from the profile's schema, one
   REQ_PAGES_ID and one REQ_PAGES per block (its name and host page size in them), and says
   where in each the big-endian 64-bit start goes. This file copies a template, writes the
   start, and keeps the one "last block asked for" state that picks between the two.

   Every writer of the return path takes ctx->lock (Python's PONGs, SHUT, RECV_BITMAP too,
   through qmig_rp_lock), so messages never interleave and the last-block state changes with
   the bytes that depend on it. Every fault is logged for Python, which tells the protocol
   machine what was asked and times it (qmig.ram.faults). */
#define _GNU_SOURCE
#include "uffd_internal.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <linux/userfaultfd.h>

struct qmig_freq {
    pthread_mutex_t lock;        /* the return path's writers, and everything below */
    int sock;                    /* the return path, -1 while sending is off */
    int32_t last_block;          /* the block of the last request sent; -1: none */
    int nblocks;
    struct qmig_block **blocks;  /* owned by Python */
    uint8_t **requested;         /* per block, one byte per host page; owned by Python */
    const uint8_t *templates;    /* owned by Python */
    const uint32_t *layout;      /* per block QMIG_FREQ_LAYOUT words, see the header */
    struct qmig_freq_entry *log;
    uint64_t log_cap, log_count;
    int send_timeout_ms;
};

struct qmig_freq *qmig_freq_new(struct qmig_block **blocks, int nblocks, uint8_t **requested,
                                const uint8_t *templates, const uint32_t *layout,
                                struct qmig_freq_entry *log, uint64_t log_cap,
                                int send_timeout_ms)
{
    struct qmig_freq *ctx = calloc(1, sizeof(*ctx));
    if (!ctx)
        return NULL;
    pthread_mutex_init(&ctx->lock, NULL);
    ctx->sock = -1;
    ctx->last_block = -1;
    ctx->nblocks = nblocks;
    ctx->blocks = blocks;
    ctx->requested = requested;
    ctx->templates = templates;
    ctx->layout = layout;
    ctx->log = log;
    ctx->log_cap = log_cap;
    ctx->send_timeout_ms = send_timeout_ms;
    return ctx;
}

void qmig_freq_free(struct qmig_freq *ctx)
{
    pthread_mutex_destroy(&ctx->lock);
    free(ctx);
}

void qmig_rp_lock(struct qmig_freq *ctx) { pthread_mutex_lock(&ctx->lock); }
void qmig_rp_unlock(struct qmig_freq *ctx) { pthread_mutex_unlock(&ctx->lock); }

/* Sending on, with the machine's last block; off, returning the last block. */
void qmig_freq_enable(struct qmig_freq *ctx, int sock, int32_t last_block)
{
    pthread_mutex_lock(&ctx->lock);
    ctx->sock = sock;
    ctx->last_block = last_block;
    pthread_mutex_unlock(&ctx->lock);
}

int32_t qmig_freq_disable(struct qmig_freq *ctx)
{
    pthread_mutex_lock(&ctx->lock);
    ctx->sock = -1;
    int32_t last = ctx->last_block;
    pthread_mutex_unlock(&ctx->lock);
    return last;
}

/* Lock held. The request for host_offset of block into out (QMIG_FREQ_MAX bytes); returns
   its length and updates the last block, as sending it would. */
uint32_t qmig_freq_format(struct qmig_freq *ctx, int32_t block, uint64_t host_offset,
                          uint8_t *out)
{
    const uint32_t *l = ctx->layout + (uint64_t)block * QMIG_FREQ_LAYOUT;
    int plain = block == ctx->last_block;
    uint32_t at = plain ? l[3] : l[0], len = plain ? l[4] : l[1], start = plain ? l[5] : l[2];
    memcpy(out, ctx->templates + at, len);
    for (int i = 0; i < 8; i++)
        out[start + i] = (uint8_t)(host_offset >> (56 - 8 * i));
    ctx->last_block = block;
    return len;
}

/* Write all of buf to the socket, which may be non-blocking (Python's timeouts make it so):
   wait for room up to send_timeout_ms each time. 0 or -errno. */
static int send_all(int sock, const uint8_t *buf, uint32_t len, int timeout_ms)
{
    while (len) {
        ssize_t n = send(sock, buf, len, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n > 0) {
            buf += n;
            len -= (uint32_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK))
            return n == 0 ? -EPIPE : -errno;
        struct pollfd p = {.fd = sock, .events = POLLOUT};
        int ready = poll(&p, 1, timeout_ms);
        if (ready == 0)
            return -ETIMEDOUT;
        if (ready < 0 && errno != EINTR)
            return -errno;
    }
    return 0;
}

/* Lock held. Send the request if sending is on: the entry's sent_ns and kind say how it went
   (a failed send turns sending off: the channel is broken, the machine resends later). */
static void send_request(struct qmig_freq *ctx, int32_t block, uint64_t host_offset,
                         struct qmig_freq_entry *e)
{
    uint8_t msg[QMIG_FREQ_MAX];
    if (ctx->sock < 0) {
        e->kind = QMIG_FREQ_HELD;
        return;
    }
    int32_t last = ctx->last_block;
    uint32_t len = qmig_freq_format(ctx, block, host_offset, msg);
    e->with_id = block != last;
    e->sent_ns = qmig_now_ns();  /* before the send: the answer may come at once */
    int ret = send_all(ctx->sock, msg, len, ctx->send_timeout_ms);
    e->done_ns = qmig_now_ns();
    if (ret < 0) {
        ctx->last_block = last;
        ctx->sock = -1;
        e->sent_ns = e->done_ns = 0;
        e->kind = QMIG_FREQ_FAILED;
    }
}

static struct qmig_freq_entry *log_entry(struct qmig_freq *ctx, const struct qmig_fault *f)
{
    struct qmig_freq_entry *e = &ctx->log[ctx->log_count++];
    memset(e, 0, sizeof(*e));
    e->read_ns = f->t_ns;
    e->address = f->address;
    e->tid = f->tid;
    e->event = f->event;
    e->end = f->end;
    e->block = -1;
    e->kind = QMIG_FREQ_STRAY;
    return e;
}

/* Lock held. Log one fault; ask for its host page unless it is in, or asked for already. */
static void handle_fault(struct qmig_freq *ctx, const struct qmig_fault *f)
{
    struct qmig_freq_entry *e = log_entry(ctx, f);
    int i = f->event == UFFD_EVENT_PAGEFAULT ? block_holding(ctx->blocks, ctx->nblocks, f->address)
                                              : -1;
    if (i < 0)
        return;
    struct qmig_block *b = ctx->blocks[i];
    uint64_t host_page = (f->address - b->host) / b->page_size;
    e->block = i;
    e->host_offset = host_page * b->page_size;
    if (bit_test(b->bitmap, host_page * (b->page_size / b->target_page)))
        e->kind = QMIG_FREQ_LATE;
    else if (__atomic_exchange_n(&ctx->requested[i][host_page], 1, __ATOMIC_ACQ_REL))
        e->kind = QMIG_FREQ_REPEAT;
    else {
        e->kind = QMIG_FREQ_SENT;
        send_request(ctx, i, e->host_offset, e);
    }
}

static int log_has_room(struct qmig_freq *ctx)
{
    pthread_mutex_lock(&ctx->lock);
    int room = ctx->log_cap - ctx->log_count >= QMIG_FAULT_BATCH;
    pthread_mutex_unlock(&ctx->lock);
    return room;
}

/* Handle a batch under the lock; 1 if one of its faults needs Python (held, or stray). */
static int handle_batch(struct qmig_freq *ctx, const struct qmig_fault *faults, int got)
{
    int python = 0;
    pthread_mutex_lock(&ctx->lock);
    for (int k = 0; k < got; k++) {
        handle_fault(ctx, &faults[k]);
        uint32_t kind = ctx->log[ctx->log_count - 1].kind;
        python |= kind == QMIG_FREQ_HELD || kind == QMIG_FREQ_STRAY;
    }
    pthread_mutex_unlock(&ctx->lock);
    return python;
}

/* Read faults in batches and handle each, without returning while the C can do it all:
   returns the faults read once one needs Python (held, or stray), the log has no room for a
   batch (drain it), or quitfd is readable (*quit set); -errno on a failed read.

   Between batches the thread sleeps in poll, where the other fault loops spin a while first
   (qmig_fault_spin): while a request is on its way, the threads that answer it must run,
   and they tend to run on this CPU. The request's send wakes the reader of the return path
   (the source's, when it runs on this host), and the answer wakes this process's receive
   thread, which places the page; a spinning thread holds both off for the whole spin. In
   the default `qmig simulate` (2 CPUs, medians of alternating runs), with a 50 µs spin the
   source read a request ~60 µs after it was sent (p50), 14-21 µs without, and the fault
   latency p50 went from 117-167 to 60-83 µs. A spin only after batches that sent nothing
   still cost ~40 µs p50: their faults come while another request is on its way. */
int qmig_freq_run(struct qmig_freq *ctx, int uffd, int quitfd, int *quit)
{
    struct qmig_fault faults[QMIG_FAULT_BATCH];
    int total = 0;
    *quit = 0;
    while (log_has_room(ctx)) {
        int got = qmig_fault_wait(uffd, quitfd, -1, faults, QMIG_FAULT_BATCH, quit);
        if (got < 0)
            return got;
        total += got;
        int python = got > 0 && handle_batch(ctx, faults, got);
        if (python || *quit)
            return total;
    }
    return total;
}

/* Python's own request for a fault the loop held (sending was off then): sent the C way if
   sending is on now, logged as a QMIG_FREQ_SEND entry (sent_ns 0 when the send failed).
   Returns 1 sent, 0 off, -1 the send failed (sending is off now), -2 no room in the log
   (drain it and call again). */
int qmig_freq_send(struct qmig_freq *ctx, int32_t block, uint64_t host_offset, uint64_t read_ns)
{
    int ret = 0;
    pthread_mutex_lock(&ctx->lock);
    if (ctx->sock >= 0 && ctx->log_count >= ctx->log_cap)
        ret = -2;
    else if (ctx->sock >= 0 && block >= 0 && block < ctx->nblocks) {
        struct qmig_freq_entry *e = &ctx->log[ctx->log_count++];
        memset(e, 0, sizeof(*e));
        e->read_ns = read_ns;
        e->block = block;
        e->host_offset = host_offset;
        e->kind = QMIG_FREQ_SENT;
        send_request(ctx, block, host_offset, e);
        ret = e->kind == QMIG_FREQ_SENT ? 1 : -1;
        e->kind = QMIG_FREQ_SEND;  /* the fault itself is logged already; sent_ns 0: failed */
    }
    pthread_mutex_unlock(&ctx->lock);
    return ret;
}

/* Move the log's entries to out (at most max); returns how many. */
uint64_t qmig_freq_drain(struct qmig_freq *ctx, struct qmig_freq_entry *out, uint64_t max)
{
    pthread_mutex_lock(&ctx->lock);
    uint64_t n = ctx->log_count < max ? ctx->log_count : max;
    memcpy(out, ctx->log, n * sizeof(*out));
    memmove(ctx->log, ctx->log + n, (ctx->log_count - n) * sizeof(*out));
    ctx->log_count -= n;
    pthread_mutex_unlock(&ctx->lock);
    return n;
}
