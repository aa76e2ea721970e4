/* The destination's postcopy receive path in C: a thread of its own owns the channel's socket
   once the guest runs here, reads it, and places every ZERO/PAGE record it can follow the
   moment it arrives, with no Python and no GIL in between. Every byte still goes to Python
   (qmig_fastpath_read, in gathered pieces while this thread follows the stream: Python has
   nothing to hurry for then), whose protocol machine reads the whole stream as before and stays
   the one authority: it re-reads the page records (their pages are then found in place) and
   decides everything else. The C reader only follows the simple part of the grammar, a ram
   section's page records, EOS, footer and the next ram section's header; at anything else
   it stops placing ("unsynced") until Python, whose reader knows where the next record
   starts, tells it (qmig_fastpath_sync). A page it places is one the machine will read as a
   page record of the same block at the same offset, so the two agree on what is placed; an
   error in the stream is found by the machine, at its offset, as without the fast path.

   Offsets are the machine reader's absolute stream offsets. The ring holds the bytes from a
   little behind Python's read position (RETAIN: Python may sync at the start of a record it
   read only in part) up to what the socket gave. Every wire number (flags, section types,
   page size, the ram section's id) comes from Python, which takes it from the profile.

   A postcopy-preempt channel (cfg.bare) is read the same way, by a thread of its own: its
   records are a ram section's records without the section, so the thread only ever follows
   MODE_RAM, with the channel's own last block; its EOS, a header at its start, or anything
   else it does not follow is the machine's to read, as on the main channel. Both threads
   place into the same blocks: the received bitmaps are shared atomically, and a page that
   comes on both channels is placed once (the second copy finds its bit set, or EEXIST). */
#define _GNU_SOURCE
#include "uffd_internal.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum { MODE_UNSYNCED = 0, MODE_TOP = 1, MODE_RAM = 2, MODE_FOOTER = 3 };
enum { HEADER = sizeof(uint64_t), SECTION_HEADER = 1 + sizeof(uint32_t), BATCH = 256 };

/* Where the C reader is: the next record's stream offset, what it expects there, and the
   block a CONTINUE record continues (-1: none). */
struct cursor {
    uint64_t parse;
    int mode;
    int block;
};

struct qmig_fastpath {
    struct qmig_fastpath_config cfg;
    struct qmig_block **blocks;
    char (*names)[256];
    uint8_t *ring;
    uint64_t ring_base;   /* stream offset of ring[0] */
    uint64_t fill;        /* bytes in the ring */
    uint64_t read;        /* Python's next byte */
    uint64_t parse;       /* the C reader's next record (when synced) */
    int mode;
    int block;            /* the current block, or -1 */
    int sync_pending;
    uint64_t sync_offset;
    int sync_mode, sync_block;
    int done;             /* 1: EOF or error seen; the rest of the ring is still read */
    int error;            /* errno of the failed recv, 0 at EOF */
    int quit;
    int copying;          /* Python copies bytes out of the ring, the lock released */
    uint64_t want;        /* bytes Python gathers for before it reads (0: any) */
    uint64_t followed;    /* the ring's end when the C reader last looked: wait for more */
    uint64_t recv_ns;     /* CLOCK_MONOTONIC when the last recv() returned */
    uint32_t *waits;      /* per data page placed: recv() → placed, ns (capped), up to
                             cfg.wait_log entries */
    struct qmig_fastpath_stats stats;
    pthread_mutex_t lock;
    pthread_cond_t more;  /* bytes, EOF or error for Python */
    pthread_cond_t room;  /* room in the ring, or quit */
    pthread_t thread;
};

static inline uint64_t be64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, sizeof v);
    return __builtin_bswap64(v);
}

static inline uint32_t be32(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, sizeof v);
    return __builtin_bswap32(v);
}

/* A preempt channel's first bytes a migration stream header: the machine's error, whatever
   flags its version happens to look like. */
static int bare_header(const struct qmig_fastpath_config *c, uint64_t parse, const uint8_t *p)
{
    return c->bare && parse == c->channel_start && be32(p) == c->magic;
}

static int find_block(const struct qmig_fastpath *fp, const uint8_t *name, unsigned len)
{
    for (int i = 0; i < fp->cfg.nblocks; i++)
        if (strlen(fp->names[i]) == len && memcmp(fp->names[i], name, len) == 0)
            return i;
    return -1;
}

/* Place a batch of one block's records; a failure leaves the rest to Python. */
static int place_batch(struct qmig_fastpath *fp, struct qmig_fastpath_stats *st, int block,
                       const uint64_t *headers, const uint64_t *bodies, uint64_t n)
{
    struct qmig_records_result res;
    if (!n)
        return 0;
    int ret = qmig_place_records(fp->blocks[block], fp->ring, fp->ring_base, headers, bodies,
                                 n, fp->cfg.flag_page, 0, &res);
    st->records += ret < 0 ? res.error_record : n;
    st->placed += res.placed;
    st->existing += res.existing;
    if (ret < 0) {
        st->place_errors++;
        return ret;
    }
    /* A data page is placed alone, right after the recv() that completed it: its wait is
       this chunk's (a record that came in an earlier chunk is rare, and counted short). */
    if (n == 1 && (headers[0] & fp->cfg.flag_page) && res.placed &&
        st->waits < fp->cfg.wait_log) {
        uint64_t waited = res.t_ns > fp->recv_ns ? res.t_ns - fp->recv_ns : 0;
        fp->waits[st->waits++] = waited > UINT32_MAX ? UINT32_MAX : (uint32_t)waited;
    }
    return 0;
}

/* What the bytes at the cursor are: not all there yet, taken (a section header, a main
   channel's EOS), not for the C reader, or a page record to place. */
enum { STEP_WAIT, STEP_ON, STEP_STOP, STEP_RECORD };

struct record {
    uint64_t header;
    uint64_t body_at;  /* from the record's start */
    uint64_t size;
    int block;
    int data;          /* a PAGE record (else ZERO) */
};

/* A ram section's next part, or its last (the completion's SECTION_END, which may carry many
   pages); after a section, its footer. */
static int section_step(const struct qmig_fastpath_config *c, struct cursor *cur,
                        const uint8_t *p, uint64_t have)
{
    if (have < 1)
        return STEP_WAIT;
    int known = cur->mode == MODE_TOP ? p[0] == c->section_part || p[0] == c->section_end
                                      : p[0] == c->section_footer;
    /* Another type is the machine's at once (the stream's EOF is one byte, and the source
       sends nothing after it until the destination answers). */
    if (!known)
        return STEP_STOP;
    if (have < SECTION_HEADER)
        return STEP_WAIT;
    if (be32(p + 1) != c->ram_section_id)
        return STEP_STOP;
    cur->parse += SECTION_HEADER;
    cur->mode = cur->mode == MODE_TOP ? MODE_RAM : MODE_TOP;
    return STEP_ON;
}

static int record_step(const struct qmig_fastpath *fp, struct cursor *cur, const uint8_t *p,
                       uint64_t have, struct record *r)
{
    const struct qmig_fastpath_config *c = &fp->cfg;
    if (have < HEADER)
        return STEP_WAIT;
    uint64_t header = be64(p), flags = header & c->flag_mask;
    uint64_t kind = flags & ~c->flag_continue;
    if (flags == c->flag_eos && !c->bare) {
        cur->parse += HEADER;
        cur->mode = c->section_footer_present ? MODE_FOOTER : MODE_TOP;
        return STEP_ON;
    }
    /* A preempt channel's EOS ends it: nothing after it is read, here or by the machine. */
    if ((kind != c->flag_zero && kind != c->flag_page) || bare_header(c, cur->parse, p))
        return STEP_STOP;
    uint64_t at = HEADER;
    int block = cur->block;
    if (!(flags & c->flag_continue)) {
        if (have < at + 1 || have < at + 1 + p[at])
            return STEP_WAIT;
        block = find_block(fp, p + at + 1, p[at]);
        at += 1 + p[at];
    }
    uint64_t body = kind == c->flag_page ? c->target_page : 1;
    if (have < at + body)
        return STEP_WAIT;
    const struct qmig_block *b = block >= 0 ? fp->blocks[block] : NULL;
    /* Huge host pages are gathered by one thread, and an offset outside the block is the
       machine's error to report: both are left to Python. */
    if (!b || b->page_size != c->target_page || (header & ~c->flag_mask) >= b->length)
        return STEP_STOP;
    *r = (struct record){header, at, at + body, block, kind == c->flag_page};
    return STEP_RECORD;
}

/* Under the lock: wake Python when it has something to do: the bytes it gathers for, or
   anything the C reader does not follow (it must read up to there and sync), or the end. */
static void wake_reader(struct qmig_fastpath *fp)
{
    if (fp->done || fp->mode == MODE_UNSYNCED || fp->ring_base + fp->fill - fp->read >= fp->want)
        pthread_cond_broadcast(&fp->more);
}

/* Follow the stream from cur->parse up to end, placing page records; stop at what the C
   reader does not follow (unsynced) or at an incomplete record. Runs without the lock, on
   the thread's own copies of its position and figures (run() publishes them under it). */
static void follow(struct qmig_fastpath *fp, struct cursor *cur, struct qmig_fastpath_stats *st,
                   uint64_t end)
{
    uint64_t headers[BATCH], bodies[BATCH], n = 0;
    int batch_block = -1;
    while (cur->mode != MODE_UNSYNCED) {
        const uint8_t *p = fp->ring + (cur->parse - fp->ring_base);
        uint64_t have = end - cur->parse;
        struct record r;
        int step = cur->mode == MODE_RAM ? record_step(fp, cur, p, have, &r)
                                         : section_step(&fp->cfg, cur, p, have);
        if (step == STEP_WAIT)
            break;
        if (step == STEP_STOP)
            cur->mode = MODE_UNSYNCED;
        if (step != STEP_RECORD)
            continue;
        if (r.block != batch_block || n == BATCH) {
            if (batch_block >= 0 && place_batch(fp, st, batch_block, headers, bodies, n) < 0) {
                n = 0;
                cur->mode = MODE_UNSYNCED;
                break;
            }
            n = 0;
            batch_block = r.block;
        }
        headers[n] = r.header;
        bodies[n++] = cur->parse + r.body_at;
        cur->block = r.block;
        cur->parse += r.size;
        /* A data page goes in at once (a vCPU may wait on it); zero pages are gathered. */
        if (r.data) {
            if (place_batch(fp, st, batch_block, headers, bodies, n) < 0)
                cur->mode = MODE_UNSYNCED;
            n = 0;
        }
    }
    if (n && place_batch(fp, st, batch_block, headers, bodies, n) < 0)
        cur->mode = MODE_UNSYNCED;
}

/* Under the lock: drop what neither reader needs any more, to make room at the end. */
static void compact(struct qmig_fastpath *fp)
{
    if (fp->copying)
        return;  /* not while Python copies out of it: after, when it signals room */
    uint64_t keep = fp->read > fp->cfg.retain ? fp->read - fp->cfg.retain : 0;
    if (fp->mode != MODE_UNSYNCED && fp->parse < keep)
        keep = fp->parse;
    if (keep < fp->ring_base + fp->cfg.ring_size / 4)
        return;
    uint64_t drop = keep - fp->ring_base;
    memmove(fp->ring, fp->ring + drop, fp->fill - drop);
    fp->fill -= drop;
    fp->ring_base = keep;
}

static void apply_sync(struct qmig_fastpath *fp)
{
    fp->sync_pending = 0;
    if (fp->sync_offset < fp->ring_base || fp->sync_offset > fp->ring_base + fp->fill)
        return;  /* too old: wait for the next one */
    fp->parse = fp->sync_offset;
    fp->mode = fp->sync_mode;
    fp->block = fp->sync_block;
    fp->followed = 0;
    fp->stats.syncs++;
}

/* Follow what the ring holds past the thread's position, with the lock released (only this
   thread moves the position and the ring's bytes), then publish where it got to. */
static void follow_unlocked(struct qmig_fastpath *fp, uint64_t end)
{
    struct cursor cur = {.parse = fp->parse, .mode = fp->mode, .block = fp->block};
    struct qmig_fastpath_stats st = fp->stats;
    pthread_mutex_unlock(&fp->lock);
    follow(fp, &cur, &st, end);
    pthread_mutex_lock(&fp->lock);
    fp->parse = cur.parse;
    fp->mode = cur.mode;
    fp->block = cur.block;
    fp->stats = st;
}

/* Called with the lock held: wait for the socket (or quit) with it released, and take what
   came into the ring. Returns 1 when the thread is to end (EOF or error, published). */
static int receive(struct qmig_fastpath *fp, struct pollfd *polls)
{
    pthread_mutex_unlock(&fp->lock);
    int ready = poll(polls, 2, -1);
    ssize_t got = 0;
    int err = 0;
    if (ready < 0 && errno != EINTR)
        err = errno;
    else if (ready > 0 && polls[1].revents)
        err = -1;  /* quit */
    else if (ready > 0) {
        got = recv(fp->cfg.fd, fp->ring + fp->fill, fp->cfg.ring_size - fp->fill, 0);
        if (got < 0)
            err = (errno == EAGAIN || errno == EINTR) ? 0 : errno;
        else if (got == 0)
            err = -2;  /* EOF */
    }
    pthread_mutex_lock(&fp->lock);
    if (got > 0) {
        fp->recv_ns = qmig_now_ns();
        fp->fill += (uint64_t)got;
        fp->stats.bytes += (uint64_t)got;
        /* A preempt channel's few pages are placed before Python is woken for their bytes,
           so that its wakeup does not compete for a CPU with the placement a vCPU waits on
           (within noise on a loaded 2-core host). A main channel's bytes go on at once:
           Python parses while C places. */
        if (!fp->cfg.bare || fp->mode == MODE_UNSYNCED)
            wake_reader(fp);
    } else if (err == -1) {
        fp->quit = 1;
    } else if (err) {
        fp->error = err > 0 ? err : 0;
        return 1;
    }
    return 0;
}

static void *run(void *arg)
{
    struct qmig_fastpath *fp = arg;
    qmig_name_thread(fp->cfg.bare ? "qmig-recv-pre" : "qmig-recv");
    struct pollfd polls[2] = {{.fd = fp->cfg.fd, .events = POLLIN},
                              {.fd = fp->cfg.quitfd, .events = POLLIN}};
    pthread_mutex_lock(&fp->lock);
    for (;;) {
        if (fp->sync_pending)
            apply_sync(fp);
        uint64_t end = fp->ring_base + fp->fill;
        if (fp->mode != MODE_UNSYNCED && fp->parse < end && end != fp->followed) {
            fp->followed = end;
            follow_unlocked(fp, end);
            wake_reader(fp);
            continue;
        }
        if (fp->quit)
            break;
        /* Moved down only a quarter of the ring or more at a time: each move costs a copy
           of what is still held. */
        if (fp->cfg.ring_size - fp->fill < fp->cfg.ring_size / 4)
            compact(fp);
        if (fp->fill == fp->cfg.ring_size) {
            pthread_cond_wait(&fp->room, &fp->lock);
            continue;
        }
        if (receive(fp, polls))
            break;
    }
    fp->done = 1;
    pthread_cond_broadcast(&fp->more);
    pthread_mutex_unlock(&fp->lock);
    return NULL;
}

struct qmig_fastpath *qmig_fastpath_start(const struct qmig_fastpath_config *cfg,
                                          struct qmig_block **blocks, const char *names,
                                          int *err)
{
    struct qmig_fastpath *fp = calloc(1, sizeof *fp);
    *err = ENOMEM;
    if (!fp)
        return NULL;
    fp->cfg = *cfg;
    fp->blocks = calloc((size_t)cfg->nblocks + 1, sizeof *fp->blocks);
    fp->names = calloc((size_t)cfg->nblocks + 1, sizeof *fp->names);
    fp->ring = malloc(cfg->ring_size);
    fp->waits = calloc(cfg->wait_log + 1, sizeof *fp->waits);
    if (!fp->blocks || !fp->names || !fp->ring || !fp->waits || cfg->nblocks < 0)
        goto fail;
    /* names: each block's idstr, NUL-terminated, one after another */
    for (int i = 0; i < cfg->nblocks; i++) {
        size_t len = strlen(names);
        if (len > 255 || !block_sizes_valid(blocks[i])) {
            *err = EINVAL;
            goto fail;
        }
        memcpy(fp->names[i], names, len);
        names += len + 1;
        fp->blocks[i] = blocks[i];
    }
    fp->ring_base = fp->read = fp->parse = cfg->start_offset;
    fp->block = -1;
    pthread_mutex_init(&fp->lock, NULL);
    pthread_cond_init(&fp->more, NULL);
    pthread_cond_init(&fp->room, NULL);
    if ((*err = pthread_create(&fp->thread, NULL, run, fp)) != 0)
        goto fail;
    *err = 0;
    return fp;
fail:
    free(fp->waits);
    free(fp->ring);
    free(fp->names);
    free(fp->blocks);
    free(fp);
    return NULL;
}

static void deadline_after(struct timespec *ts, int timeout_ms)
{
    clock_gettime(CLOCK_REALTIME, ts);
    ts->tv_sec += timeout_ms / 1000;
    ts->tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
    if (ts->tv_nsec >= 1000000000L) {
        ts->tv_sec++;
        ts->tv_nsec -= 1000000000L;
    }
}

int64_t qmig_fastpath_read(struct qmig_fastpath *fp, uint8_t *out, uint64_t cap, int timeout_ms,
                           uint64_t gather, int gather_ms)
{
    struct timespec deadline;
    deadline_after(&deadline, timeout_ms);
    pthread_mutex_lock(&fp->lock);
    while (fp->read == fp->ring_base + fp->fill && !fp->done) {
        if (pthread_cond_timedwait(&fp->more, &fp->lock, &deadline) == ETIMEDOUT) {
            pthread_mutex_unlock(&fp->lock);
            return -ETIMEDOUT;
        }
    }
    /* While the C reader follows the stream, it has placed the pages already: Python reads
       them in larger, fewer pieces (each read costs it far more than its bytes), within
       gather_ms of the first. A quarter of the ring at most: the thread must find room. */
    if (gather > cap)
        gather = cap;
    if (gather > fp->cfg.ring_size / 4)
        gather = fp->cfg.ring_size / 4;
    if (gather > 1 && !fp->cfg.bare) {
        struct timespec until;
        deadline_after(&until, gather_ms);
        fp->want = gather;
        while (!fp->done && fp->mode != MODE_UNSYNCED &&
               fp->ring_base + fp->fill - fp->read < gather) {
            if (pthread_cond_timedwait(&fp->more, &fp->lock, &until) == ETIMEDOUT)
                break;
        }
        fp->want = 0;
    }
    uint64_t avail = fp->ring_base + fp->fill - fp->read;
    int64_t ret;
    if (avail) {
        /* The copy goes with the lock released: the thread must not wait for it between
           its recv() and placing what came (a vCPU may wait on that page). It only appends
           past these bytes meanwhile, and does not move them (compact). */
        uint64_t n = avail < cap ? avail : cap;
        const uint8_t *from = fp->ring + (fp->read - fp->ring_base);
        fp->copying = 1;
        pthread_mutex_unlock(&fp->lock);
        memcpy(out, from, n);
        pthread_mutex_lock(&fp->lock);
        fp->copying = 0;
        fp->read += n;
        ret = (int64_t)n;
        pthread_cond_signal(&fp->room);
    } else {
        ret = fp->error ? -fp->error : 0;
    }
    pthread_mutex_unlock(&fp->lock);
    return ret;
}

void qmig_fastpath_sync(struct qmig_fastpath *fp, uint64_t offset, int mode, int block)
{
    pthread_mutex_lock(&fp->lock);
    if (fp->mode == MODE_UNSYNCED) {
        fp->sync_pending = 1;
        fp->sync_offset = offset;
        fp->sync_mode = mode;
        fp->sync_block = block;
        pthread_cond_signal(&fp->room);
    }
    pthread_mutex_unlock(&fp->lock);
}

void qmig_fastpath_stats(struct qmig_fastpath *fp, struct qmig_fastpath_stats *out)
{
    pthread_mutex_lock(&fp->lock);
    *out = fp->stats;
    out->synced = fp->mode != MODE_UNSYNCED;
    out->parsed_to = fp->parse;
    pthread_mutex_unlock(&fp->lock);
}

/* Stop the thread; then its last figures go to *out, and up to cap recv() → placed times
   to waits (*nwaits of them). */
void qmig_fastpath_stop(struct qmig_fastpath *fp, struct qmig_fastpath_stats *out,
                        uint32_t *waits, uint64_t cap, uint64_t *nwaits)
{
    pthread_mutex_lock(&fp->lock);
    fp->quit = 1;
    pthread_cond_broadcast(&fp->room);
    pthread_mutex_unlock(&fp->lock);
    uint64_t one = 1;
    if (write(fp->cfg.quitfd, &one, sizeof one) < 0) {
        /* an eventfd write fails only on overflow: the thread is woken already */
    }
    pthread_join(fp->thread, NULL);
    qmig_fastpath_stats(fp, out);
    *nwaits = fp->stats.waits < cap ? fp->stats.waits : cap;
    memcpy(waits, fp->waits, *nwaits * sizeof *waits);
    pthread_mutex_destroy(&fp->lock);
    pthread_cond_destroy(&fp->more);
    pthread_cond_destroy(&fp->room);
    free(fp->waits);
    free(fp->ring);
    free(fp->names);
    free(fp->blocks);
    free(fp);
}

