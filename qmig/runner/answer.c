/* The source's answer to a page request, off the Python path (QEMU 8.0+ preempt variant,
   where the return-path thread writes requested pages on the preempt channel as it reads the
   request). A thread reads the return path, passes every byte on to Python through a pipe
   (the machine still reads everything), and answers each well-formed REQ_PAGES(_ID) itself:
   one writev per host page, header then page straight from guest RAM. Anything odd is left
   to Python, which then fails or answers as the machine decides. */
#include "qmig_answer.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

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
    int declined;                /* well-formed requests left to Python (queue full) */
    uint8_t buf[READ_SIZE];
};

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static uint16_t be16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static uint32_t be32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}
static uint64_t be64(const uint8_t *p) { return (uint64_t)be32(p) << 32 | be32(p + 4); }
static void put_be64(uint8_t *p, uint64_t v)
{
    for (int i = 7; i >= 0; i--, v >>= 8) p[i] = (uint8_t)v;
}

static int page_is_zero(const uint8_t *p, uint64_t size)
{
    return p[0] == 0 && memcmp(p, p + 1, size - 1) == 0;
}

/* Wait until fd takes more bytes, or the thread is told to stop (-ECANCELED): a peer
   that stopped reading must not keep qmig_answer_stop from joining. */
static int wait_for_room(int fd, int stop_fd)
{
    struct pollfd p[2] = {{.fd = fd, .events = POLLOUT}, {.fd = stop_fd, .events = POLLIN}};
    if (poll(p, 2, -1) < 0 && errno != EINTR) return -errno;
    return p[1].revents ? -ECANCELED : 0;
}

/* Write every byte of the iovecs, waiting for room (the socket may be non-blocking). */
static int write_all(int fd, int stop_fd, struct iovec *iov, int n)
{
    while (n > 0) {
        ssize_t sent = writev(fd, iov, n);
        if (sent < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                int rc = wait_for_room(fd, stop_fd);
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

/* One host page of a request: its dirty target pages as preempt records, named as the
   channel's last-block state requires. Returns -1 when it must be left to Python. */
static int answer_host_page(struct answer *a, int32_t index, uint64_t request_start,
                            uint64_t first, uint64_t read_ns)
{
    const struct qmig_answer_block *b = &a->blocks[index];
    const uint64_t tps = a->cfg.target_page_size;
    const uint64_t per_host = b->host_page_size / tps;
    static const uint8_t zero_byte = 0;
    uint8_t headers[MAX_PER_HOST][RAM_HEADER + 1 + 255];
    struct iovec iov[2 * MAX_PER_HOST];
    int n = 0;
    uint64_t mask = 0, zeros = 0, bytes = 0;
    uint32_t pages = 0;

    pthread_mutex_lock(&a->lock);
    if (a->used == QUEUE) {
        a->declined++;
        pthread_mutex_unlock(&a->lock);
        return -1;
    }
    int named = a->last_block != index;
    for (uint64_t i = 0; i < per_host && first + i < b->pages; i++) {
        uint64_t page = first + i;
        if (!b->dirty[page]) continue;
        const uint8_t *src = b->ram + page * tps;
        int zero = page_is_zero(src, tps);
        uint64_t flags = zero ? a->cfg.flag_zero : a->cfg.flag_page;
        if (!named) flags |= a->cfg.flag_continue;
        put_be64(headers[pages], page * tps | flags);
        size_t head = RAM_HEADER;
        if (named) {
            headers[pages][head++] = (uint8_t)b->name_len;
            memcpy(headers[pages] + head, b->name, b->name_len);
            head += b->name_len;
            named = 0;
        }
        iov[n++] = (struct iovec){.iov_base = headers[pages], .iov_len = head};
        iov[n++] = zero ? (struct iovec){.iov_base = (void *)&zero_byte, .iov_len = 1}
                        : (struct iovec){.iov_base = (void *)src, .iov_len = tps};
        bytes += head + (zero ? 1 : tps);
        zeros += zero;
        mask |= 1ull << i;
        pages++;
    }
    if (pages) {
        if (write_all(a->cfg.preempt_fd, a->stop_fd, iov, n) < 0) {
            pthread_mutex_unlock(&a->lock);
            return -2;  /* the preempt channel broke: the thread stops answering */
        }
        a->last_block = index;
        struct qmig_answer_entry *e = &a->queue[(a->head + a->used) % QUEUE];
        *e = (struct qmig_answer_entry){
            .block = (uint32_t)index, .pages = pages, .request_start = request_start,
            .first = first, .mask = mask, .bytes = bytes, .zeros = zeros,
            .read_ns = read_ns, .sent_ns = now_ns(),
        };
        a->used++;
    }
    pthread_mutex_unlock(&a->lock);
    return 0;
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
    uint64_t tps = a->cfg.target_page_size, per_host = b->host_page_size / tps;
    for (uint64_t page = start / tps; page < (start + length) / tps; page += per_host) {
        int rc = answer_host_page(a, index, start, page, read_ns);
        if (rc == -2) return rc;
    }
    return 0;
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
    return write_all(fd, stop_fd, &iov, 1);
}

static void *run(void *arg)
{
    struct answer *a = arg;
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

void *qmig_answer_start(const struct qmig_answer_config *config,
                        const struct qmig_answer_block *blocks, uint32_t count, int *error)
{
    struct answer *a = calloc(1, sizeof *a);
    if (!a) {
        *error = ENOMEM;
        return NULL;
    }
    a->cfg = *config;
    a->blocks = calloc(count ? count : 1, sizeof *blocks);
    if (!a->blocks) {
        free(a);
        *error = ENOMEM;
        return NULL;
    }
    for (uint32_t i = 0; i < count; i++) {
        uint64_t tps = config->target_page_size;
        if (!tps || blocks[i].host_page_size % tps || blocks[i].host_page_size / tps > MAX_PER_HOST
            || blocks[i].host_page_size / tps == 0) {
            free(a->blocks);
            free(a);
            *error = EINVAL;
            return NULL;
        }
        a->blocks[i] = blocks[i];
    }
    a->count = count;
    a->last_block = config->last_block;
    a->request_block = -1;
    a->parsing = 1;
    pthread_mutex_init(&a->lock, NULL);
    a->stop_fd = eventfd(0, EFD_CLOEXEC);
    if (a->stop_fd < 0 || (*error = pthread_create(&a->thread, NULL, run, a)) != 0) {
        if (a->stop_fd < 0) *error = errno;
        else close(a->stop_fd);
        pthread_mutex_destroy(&a->lock);
        free(a->blocks);
        free(a);
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
    int rc = write_all(a->cfg.preempt_fd, a->stop_fd, &iov, 1);
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
    pthread_mutex_destroy(&a->lock);
    free(a->blocks);
    free(a);
}
