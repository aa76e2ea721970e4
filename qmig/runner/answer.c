/* The source's answer to a page request, off the Python path. A thread reads the return path,
   passes every byte on to Python through a pipe (the machine still reads everything), and
   answers each well-formed REQ_PAGES(_ID) itself: one writev per host page, header then page
   straight from guest RAM. Anything odd is left to Python, which then fails or answers as the
   machine decides.

   Two channels to answer on. The QEMU 8.0+ preempt variant: the preempt channel, as QEMU's
   return-path thread writes requested pages there as it reads the request. Without preempt:
   the main channel, which Python's loop writes the background pages to, as QEMU's migration
   thread sends queued requests before its next background page. There the two writers take
   turns by the wire lock: Python holds it from before it builds a piece of stream until that
   piece is written (qmig_answer_hold/release), and says on release whether the stream ends
   inside a RAM section's records (where a record may go) and what the cap's window has left;
   the thread writes only then, naming each host page's block in full. With preempt, the loop
   holds the same lock only while its machine picks pages from the dirty map, so that a page
   goes out on one channel or the other, never both. The loop's background pages themselves
   are written from C as well, in the batches its machine orders (sweep.c), under the same
   rules. */
#define _GNU_SOURCE
#include "answer_internal.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

/* Wait until fd takes more bytes, or the thread is told to stop (-ECANCELED): a peer
   that stopped reading must not keep qmig_answer_stop from joining. timeout_ms < 0: none. */
static int wait_for_room(int fd, int stop_fd, int timeout_ms)
{
    struct pollfd p[2] = {{.fd = fd, .events = POLLOUT}, {.fd = stop_fd, .events = POLLIN}};
    int ready = poll(p, 2, timeout_ms);
    if (ready < 0 && errno != EINTR) return -errno;
    if (ready == 0) return -ETIMEDOUT;
    return p[1].revents ? -ECANCELED : 0;
}

/* Some of the iovecs, never blocking on a socket (Python's are blocking ones, and a peer
   that stopped reading must meet the stall timeout, not hang the writer); a pipe's write
   end as it is. */
static ssize_t write_some(int fd, struct iovec *iov, int n)
{
    struct msghdr msg = {.msg_iov = iov, .msg_iovlen = (size_t)n};
    ssize_t sent = sendmsg(fd, &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (sent < 0 && errno == ENOTSOCK) sent = writev(fd, iov, n);
    return sent;
}

/* Write every byte of the iovecs, waiting for room. */
int qmig_write_all(int fd, int stop_fd, int timeout_ms, struct iovec *iov, int n)
{
    while (n > 0) {
        ssize_t sent = write_some(fd, iov, n);
        if (sent < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                int rc = wait_for_room(fd, stop_fd, timeout_ms);
                if (rc < 0) return rc;
                continue;
            }
            return -errno;
        }
        while (n > 0 && (size_t)sent >= iov->iov_len) {
            sent -= (ssize_t)iov->iov_len;
            iov++;
            n--;
        }
        if (n > 0) {
            iov->iov_base = (uint8_t *)iov->iov_base + sent;
            iov->iov_len -= (size_t)sent;
        }
    }
    return 0;
}

/* One target page's record: its header (naming the block if `named`) into `header`, and the
   header and the page (a ZERO record: its fill byte) as two iovecs; the page's dirty byte
   cleared, so that it goes out once. Returns the record's size; *zero: a ZERO record. */
size_t qmig_page_record(const struct answer *a, const struct qmig_answer_block *b,
                        uint64_t page, int named, uint8_t *header, struct iovec *iov, int *zero)
{
    static const uint8_t zero_byte = 0;
    const uint64_t tps = a->cfg.target_page_size;
    const uint8_t *src = b->ram + page * tps;
    *zero = page_is_zero(src, tps);
    uint64_t flags = *zero ? a->cfg.flag_zero : a->cfg.flag_page;
    put_be64(header, page * tps | flags | (named ? 0 : a->cfg.flag_continue));
    size_t head = RAM_HEADER;
    if (named) {
        header[head++] = (uint8_t)b->name_len;
        memcpy(header + head, b->name, b->name_len);
        head += b->name_len;
    }
    iov[0] = (struct iovec){.iov_base = header, .iov_len = head};
    iov[1] = *zero ? (struct iovec){.iov_base = (void *)&zero_byte, .iov_len = 1}
                   : (struct iovec){.iov_base = (void *)src, .iov_len = tps};
    b->dirty[page] = 0;
    return head + iov[1].iov_len;
}

/* The records of one host page's dirty target pages, the first named unless it continues
   the channel's last block; their dirty bytes cleared, so that no later request sends them. */
static void build_host_page(struct answer *a, int32_t index, uint64_t first, struct host_page *h)
{
    const struct qmig_answer_block *b = &a->blocks[index];
    const uint64_t per_host = b->host_page_size / a->cfg.target_page_size;
    int named = a->last_block != index;
    h->n = 0;
    h->e = (struct qmig_answer_entry){.block = (uint32_t)index, .first = first};
    for (uint64_t i = 0; i < per_host && first + i < b->pages; i++) {
        uint64_t page = first + i;
        if (!b->dirty[page]) continue;
        int zero;
        h->e.bytes += qmig_page_record(a, b, page, named, h->headers[h->e.pages],
                                       &h->iov[h->n], &zero);
        h->n += 2;
        named = 0;
        h->e.zeros += (uint64_t)zero;
        h->e.mask |= 1ull << i;
        h->e.pages++;
    }
}

/* One host page of a request, written and queued for Python. Returns 1 when it wrote, 0
   when nothing was dirty, -1 when it must be left to Python, -2 when the channel broke (or
   stalled): the thread stops answering. */
static int answer_host_page(struct answer *a, int32_t index, uint64_t request_start,
                            uint64_t first, uint64_t read_ns)
{
    struct host_page h;
    pthread_mutex_lock(&a->lock);
    if (a->used == QUEUE) {
        a->declined++;
        pthread_mutex_unlock(&a->lock);
        return -1;
    }
    if (a->main_channel) a->last_block = -1;  /* Python's records may have named any block */
    build_host_page(a, index, first, &h);
    if (h.e.pages) {
        int fd = a->main_channel ? a->cfg.rp_fd : a->cfg.preempt_fd;
        int timeout = a->main_channel && a->cfg.stall_ms > 0 ? a->cfg.stall_ms : -1;
        if (qmig_write_all(fd, a->stop_fd, timeout, h.iov, h.n) < 0) {
            pthread_mutex_unlock(&a->lock);
            return -2;
        }
        a->last_block = index;
        h.e.request_start = request_start;
        h.e.read_ns = read_ns;
        h.e.sent_ns = now_ns();
        a->queue[(a->head + a->used) % QUEUE] = h.e;
        a->used++;
        if (a->capped) a->credit -= (int64_t)h.e.bytes;
        a->moved_pages += h.e.pages;
    }
    pthread_mutex_unlock(&a->lock);
    return h.e.pages ? 1 : 0;
}

/* A request whose pages had all gone out already: nothing to write, but Python learns when
   it was read and settled, for its timings (an entry of no pages). */
static void settled(struct answer *a, int32_t index, uint64_t request_start, uint64_t read_ns)
{
    pthread_mutex_lock(&a->lock);
    if (a->used < QUEUE) {
        a->queue[(a->head + a->used) % QUEUE] = (struct qmig_answer_entry){
            .block = (uint32_t)index, .request_start = request_start,
            .read_ns = read_ns, .sent_ns = now_ns(),
        };
        a->used++;
    }
    pthread_mutex_unlock(&a->lock);
}

/* Main channel: wait for Python's turn to end; whether a record may go now (inside a RAM
   section, and within the cap's window, as QEMU checks the rate before its RAM loop runs).
   On 1 the caller holds the wire and gives it back with give_wire. */
static void lock_wire(struct answer *a)
{
    __atomic_add_fetch(&a->wanted, 1, __ATOMIC_SEQ_CST);
    pthread_mutex_lock(&a->wire);
    __atomic_sub_fetch(&a->wanted, 1, __ATOMIC_SEQ_CST);
}

static int take_wire(struct answer *a)
{
    lock_wire(a);
    int spent = a->capped && (a->credit <= 0 || now_ns() >= a->window_end);
    if (a->open && !spent) return 1;
    pthread_cond_broadcast(&a->turn);
    pthread_mutex_unlock(&a->wire);
    return 0;
}

void qmig_give_wire(struct answer *a)
{
    pthread_cond_broadcast(&a->turn);
    pthread_mutex_unlock(&a->wire);
}

/* Main channel: the machine's sweep goes on after a request's last host page once it is
   served (after: that page's end), or waits for the machine (after < 0: a page of it was
   left to Python). The sweep, if it let the thread have the wire, goes on from there too. */
static void moved_on(struct answer *a, int32_t index, int64_t after)
{
    if (a->moved_block == -2) return;
    a->moved_block = after < 0 ? -2 : index;
    a->moved_to = after < 0 ? 0 : (uint64_t)after;
}

/* Every host page of a well-formed request. Returns -2 when the channel broke. */
static int answer_request(struct answer *a, int32_t index, uint64_t start, uint64_t length,
                          uint64_t read_ns)
{
    if (!a->main_channel) {
        lock_wire(a);  /* the dirty map: not while the loop's machine picks pages from it */
    } else if (!take_wire(a)) {
        a->declined++;
        return 0;  /* no record may go now: the loop answers it, as the machine queues it */
    }
    const struct qmig_answer_block *b = &a->blocks[index];
    uint64_t tps = a->cfg.target_page_size, per_host = b->host_page_size / tps;
    int rc = 0, wrote = 0, left = 0;
    for (uint64_t page = start / tps; page < (start + length) / tps && rc != -2;
         page += per_host) {
        rc = answer_host_page(a, index, start, page, read_ns);
        wrote |= rc == 1;
        left |= rc == -1;
    }
    if (!wrote && !left && rc != -2) settled(a, index, start, read_ns);
    if (a->main_channel) {  /* after the request's last host page, as the machine's sweep */
        uint64_t first = start / tps, pages = (start + length) / tps - first;
        uint64_t hosts = (pages + per_host - 1) / per_host;
        moved_on(a, index, left ? -1 : (int64_t)(first + hosts * per_host));
    }
    qmig_give_wire(a);
    return rc == -2 ? rc : 0;
}

static int32_t find_block(const struct answer *a, const uint8_t *name, uint32_t len)
{
    for (uint32_t i = 0; i < a->count; i++)
        if (a->blocks[i].name_len == len && memcmp(a->blocks[i].name, name, len) == 0)
            return (int32_t)i;
    return -1;
}

/* One complete return-path message. Returns -2 when the preempt channel broke. */
static int on_message(struct answer *a, uint16_t type, const uint8_t *body, uint16_t len,
                      uint64_t read_ns)
{
    int32_t index;
    if (type == a->cfg.req_pages_id) {
        if (len < 13 || (uint32_t)13 + body[12] != len) {
            a->parsing = 0;
            return 0;
        }
        a->request_block = index = find_block(a, body + 13, body[12]);
    } else if (type == a->cfg.req_pages) {
        if (len != 12) {
            a->parsing = 0;
            return 0;
        }
        index = a->request_block;
    } else {
        return 0;  /* PONG, SHUT, RECV_BITMAP...: Python's alone */
    }
    if (index < 0) return 0;
    const struct qmig_answer_block *b = &a->blocks[index];
    uint64_t start = be64(body), length = be32(body + 8);
    uint64_t align = a->cfg.source_host_page;
    /* start + length <= used_length: inside the block under either profile range rule. */
    if (length == 0 || start % align || length % align || start % b->host_page_size ||
        start > b->used_length || length > b->used_length - start)
        return 0;  /* the machine's to refuse */
    return answer_request(a, index, start, length, read_ns);
}

static int feed(struct answer *a, const uint8_t *data, size_t len, uint64_t read_ns)
{
    while (len && a->parsing) {
        size_t want = RP_HEADER;
        if (a->have >= RP_HEADER) want += (size_t)be16(a->msg + 2);
        size_t take = want - a->have < len ? want - a->have : len;
        memcpy(a->msg + a->have, data, take);
        a->have += take;
        data += take;
        len -= take;
        if (a->have == RP_HEADER && be16(a->msg + 2) > a->cfg.rp_max_length) {
            a->parsing = 0;
            break;
        }
        if (a->have < RP_HEADER || a->have < (size_t)RP_HEADER + be16(a->msg + 2)) continue;
        int rc = on_message(a, be16(a->msg), a->msg + RP_HEADER, be16(a->msg + 2), read_ns);
        a->have = 0;
        if (rc == -2) return rc;
    }
    return 0;
}

static int pass_on(int fd, int stop_fd, const uint8_t *data, size_t len)
{
    struct iovec iov = {.iov_base = (void *)data, .iov_len = len};
    return qmig_write_all(fd, stop_fd, -1, &iov, 1);
}

static void *run(void *arg)
{
    struct answer *a = arg;
    pthread_setname_np(pthread_self(), "qmig-answer");
    struct pollfd fds[2] = {{.fd = a->cfg.rp_fd, .events = POLLIN},
                            {.fd = a->stop_fd, .events = POLLIN}};
    for (;;) {
        if (poll(fds, 2, -1) < 0) {
            if (errno == EINTR) continue;
            break;
        }
        if (fds[1].revents) break;
        if (!fds[0].revents) continue;
        ssize_t n = read(a->cfg.rp_fd, a->buf, sizeof a->buf);
        if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
        if (n <= 0) break;  /* EOF or an error: Python sees the pipe end and reads the socket */
        uint64_t read_ns = now_ns();
        if (feed(a, a->buf, (size_t)n, read_ns) == -2) a->parsing = 0;
        if (pass_on(a->cfg.pipe_fd, a->stop_fd, a->buf, (size_t)n) < 0) break;
    }
    close(a->cfg.pipe_fd);
    return NULL;
}

static int blocks_fit(const struct qmig_answer_config *config,
                      const struct qmig_answer_block *blocks, uint32_t count)
{
    uint64_t tps = config->target_page_size;
    for (uint32_t i = 0; i < count; i++) {
        uint64_t per_host = tps ? blocks[i].host_page_size / tps : 0;
        if (!tps || blocks[i].host_page_size % tps || per_host > MAX_PER_HOST || per_host == 0)
            return 0;
    }
    return 1;
}

static void release_answer(struct answer *a)
{
    pthread_cond_destroy(&a->turn);
    pthread_mutex_destroy(&a->wire);
    pthread_mutex_destroy(&a->lock);
    free(a->blocks);
    free(a);
}

void *qmig_answer_start(const struct qmig_answer_config *config,
                        const struct qmig_answer_block *blocks, uint32_t count, int *error)
{
    if (!blocks_fit(config, blocks, count)) {
        *error = EINVAL;
        return NULL;
    }
    struct answer *a = calloc(1, sizeof *a);
    if (a) a->blocks = calloc(count ? count : 1, sizeof *blocks);
    if (!a || !a->blocks) {
        free(a);
        *error = ENOMEM;
        return NULL;
    }
    a->cfg = *config;
    memcpy(a->blocks, blocks, count * sizeof *blocks);
    a->count = count;
    a->last_block = config->last_block;
    a->request_block = config->request_block;
    a->parsing = 1;
    a->moved_block = -1;
    a->main_channel = config->preempt_fd < 0;
    pthread_mutex_init(&a->lock, NULL);
    pthread_mutex_init(&a->wire, NULL);
    pthread_cond_init(&a->turn, NULL);
    a->stop_fd = eventfd(0, EFD_CLOEXEC);
    if (a->stop_fd < 0 || (*error = pthread_create(&a->thread, NULL, run, a)) != 0) {
        if (a->stop_fd < 0) *error = errno;
        else close(a->stop_fd);
        release_answer(a);
        return NULL;
    }
    *error = 0;
    return a;
}

size_t qmig_answer_drain(void *answer, struct qmig_answer_entry *out, size_t max)
{
    struct answer *a = answer;
    pthread_mutex_lock(&a->lock);
    size_t n = 0;
    while (n < max && a->used) {
        out[n++] = a->queue[a->head];
        a->head = (a->head + 1) % QUEUE;
        a->used--;
    }
    pthread_mutex_unlock(&a->lock);
    return n;
}

int qmig_answer_write(void *answer, const uint8_t *data, size_t len, int32_t last_block)
{
    struct answer *a = answer;
    struct iovec iov = {.iov_base = (void *)data, .iov_len = len};
    pthread_mutex_lock(&a->lock);
    int rc = qmig_write_all(a->cfg.preempt_fd, a->stop_fd, -1, &iov, 1);
    if (rc == 0) a->last_block = last_block;
    pthread_mutex_unlock(&a->lock);
    return rc;
}

int32_t qmig_answer_last_block(void *answer)
{
    struct answer *a = answer;
    pthread_mutex_lock(&a->lock);
    int32_t last = a->last_block;
    pthread_mutex_unlock(&a->lock);
    return last;
}

int qmig_answer_stop(void *answer, int *declined)
{
    struct answer *a = answer;
    uint64_t one = 1;
    ssize_t n = write(a->stop_fd, &one, sizeof one);
    int rc = pthread_join(a->thread, NULL);
    *declined = a->declined;
    return n == sizeof one ? rc : -1;
}

void qmig_answer_free(void *answer)
{
    struct answer *a = answer;
    close(a->stop_fd);
    release_answer(a);
}

/* Python's turn on the main channel: once the thread, if it wants the wire, has had it. */
void qmig_answer_hold(void *answer)
{
    struct answer *a = answer;
    pthread_mutex_lock(&a->wire);
    while (__atomic_load_n(&a->wanted, __ATOMIC_SEQ_CST) > 0)
        pthread_cond_wait(&a->turn, &a->wire);
}

/* Whether the thread waits for the wire now (for tests that need it waiting). */
int qmig_answer_waiting(void *answer)
{
    struct answer *a = answer;
    return __atomic_load_n(&a->wanted, __ATOMIC_SEQ_CST) > 0;
}

/* The end of Python's turn: whether its stream now ends inside a RAM section's records, the
   cap's quota left in the window (< 0: no cap) and when the window ends. */
void qmig_answer_release(void *answer, int32_t open, int64_t credit, uint64_t window_end_ns)
{
    struct answer *a = answer;
    a->open = open;
    a->capped = credit >= 0;
    a->credit = credit;
    a->window_end = window_end_ns;
    pthread_mutex_unlock(&a->wire);
}
