/* qmig.ram._uffd: userfaultfd ioctls, page placement, fault loops, vCPU-like workloads.

   The declarations that the C files and Python share. _uffd_build.py gives this file to cffi's
   cdef without its '#' lines, so everything else here must be a plain C declaration (structs,
   enums, prototypes). The target page size is never built in: it comes from Python (the
   profile's default_target_page_bits) in struct qmig_block or as an argument. */
#ifndef QMIG_UFFD_H
#define QMIG_UFFD_H

#include <stdint.h>

/* One message, flattened for Python; t_ns is CLOCK_MONOTONIC right after read(). A page
   fault (UFFD_EVENT_PAGEFAULT) has its address, flags and thread; another event (REMOVE,
   UNMAP, REMAP: only with the features that ask for them) the range it is about,
   [address, end), and a FORK neither. */
struct qmig_fault {
    uint64_t address;
    uint64_t flags;
    uint64_t t_ns;
    uint32_t tid;
    uint32_t event;
    uint64_t end;
};

/* Outcome of placing a run of pages. */
struct qmig_place_result {
    uint64_t placed;        /* pages this call put in place */
    uint64_t existing;      /* pages that were already there (EEXIST or already marked) */
    uint64_t error_page;    /* index of the page that failed, when the call returns < 0 */
    uint64_t t_ns;          /* CLOCK_MONOTONIC when the last page went in */
};

/* A vCPU-like workload: configuration in, results out. */
struct qmig_workload {
    uint64_t base;            /* first byte the workload may touch */
    uint64_t length;          /* bytes from base */
    uint64_t stride;          /* touch granularity, normally the target page size */
    uint64_t touches;         /* how many page touches in all */
    uint64_t seed;
    uint64_t hot_pages;       /* HOTSET: pages at the start of the range that are hot */
    uint32_t hot_percent;     /* HOTSET: share of touches that go to the hot pages */
    uint32_t pattern;         /* 0 sequential, 1 random, 2 hot set */
    uint32_t write;           /* 0 read only, 1 read then write */
    uint32_t check;           /* 1: every page must start with tag_xor ^ (tag_base + offset) */
    uint64_t rate;            /* touches per second, 0 = as fast as possible */
    uint64_t tag_base;        /* block offset of base, for the tag check */
    uint64_t tag_xor;
    int32_t *abort;           /* set to 1 by the owner; checked after every touch */
    /* results */
    uint64_t done;
    uint64_t mismatches;
    uint64_t first_mismatch;  /* offset from base of the first page whose tag was wrong */
    uint64_t checksum;
    uint64_t t_start_ns;
    uint64_t t_end_ns;
    int32_t tid;
    int32_t aborted;
};

/* A block as the batched placement sees it. Python owns the memory behind every pointer. */
struct qmig_block {
    int32_t fd;               /* the userfaultfd it is registered with; -1: write directly */
    int32_t zeropage;         /* 1: UFFDIO_ZEROPAGE works here (not on hugetlb) */
    uint64_t host;            /* first byte of the mapping */
    uint64_t length;          /* used length */
    uint64_t page_size;       /* host page size */
    uint64_t max_run;         /* target pages per placing ioctl, at most QMIG_SCRATCH_PAGES */
    uint8_t *bitmap;          /* received, one bit per target page */
    uint64_t *placed_ns;      /* per host page: when it went in (registered only), or NULL */
    uint8_t *staging;         /* huge pages: the host page being gathered (page_size bytes) */
    uint8_t *staged;          /* huge pages: one flag per target page of that host page */
    uint64_t staging_page;    /* the host page being gathered; UINT64_MAX: none */
    uint64_t staged_count;
    uint64_t served;          /* host pages placed by qmig_serve_blocks */
    uint8_t *touched;         /* target pages qmig wrote directly (before registration), or
                                 NULL; the rest of a fresh mapping is known to be zero */
    uint8_t *regions;         /* per 2 MiB of address space from the block's start (rounded
                                 down), while THP is on: a REGION_* state; NULL: off */
    uint64_t max_data_run;    /* registered: data pages per UFFDIO_COPY at most; 0: max_run */
    uint64_t target_page;     /* the stream's target page size: a power of two that divides
                                 page_size; 0 (never set) makes every call fail with EINVAL */
};

/* Outcome of one qmig_place_records call. */
struct qmig_records_result {
    uint64_t placed;          /* host pages placed by ioctl */
    uint64_t zero;            /* of which zero pages */
    uint64_t written;         /* target pages written directly (not registered yet) */
    uint64_t existing;        /* records whose page was already in place */
    uint64_t ioctls;          /* placing ioctls issued */
    uint64_t first_page;      /* host pages placed by ioctl lie in [first_page, end_page) */
    uint64_t end_page;
    uint64_t t_ns;            /* CLOCK_MONOTONIC at the end */
    uint64_t error_record;    /* the record that failed, when the call returns < 0 */
};

/* One fault (or other message) as qmig_serve_blocks saw it. */
struct qmig_served {
    uint64_t read_ns;         /* CLOCK_MONOTONIC right after read() */
    uint64_t placed_ns;       /* when its page went in; 0: it was in place already (late) */
    uint64_t address;
    uint64_t end;             /* not a page fault: the end of the event's range, or 0 */
    uint32_t tid;             /* 0 unless UFFD_FEATURE_THREAD_ID */
    int32_t block;            /* index into blocks; -1: in no block (stray), or not a fault */
    uint32_t event;           /* UFFD_EVENT_*: what the message was */
};

/* Target pages gathered per placing ioctl at most (the per-thread scratch buffer's size), and
   fault messages taken per read() at most. */
enum { QMIG_SCRATCH_PAGES = 512, QMIG_FAULT_BATCH = 64 };

/* uffd.c: the kernel interface, single placements, fault reading, the bare C fault loop */
int qmig_uffd_open_syscall(int flags);
int qmig_uffd_open_dev(int flags);
int qmig_uffd_api(int fd, uint64_t features, uint64_t *out_features, uint64_t *out_ioctls);
int qmig_uffd_register(int fd, uint64_t start, uint64_t len, uint64_t mode, uint64_t *out_ioctls);
int qmig_uffd_unregister(int fd, uint64_t start, uint64_t len);
int qmig_uffd_wake(int fd, uint64_t start, uint64_t len);
int qmig_uffd_copy(int fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode,
                   int64_t *copied);
int qmig_uffd_zeropage(int fd, uint64_t dst, uint64_t len, uint64_t mode, int64_t *zeroed);
int qmig_place(int fd, uint64_t dst, uint64_t src, uint64_t src_stride, uint64_t page_size,
               uint64_t count, uint64_t max_run, int zeropage, uint64_t mode, uint8_t *bitmap,
               uint64_t first_bit, uint64_t bits_per_page, struct qmig_place_result *res);
int qmig_fault_wait(int uffd, int quitfd, int timeout_ms, struct qmig_fault *out, int max,
                    int *quit);
int qmig_fault_spin(int uffd, uint64_t spin_ns, struct qmig_fault *out, int max);
int64_t qmig_serve_from(int uffd, int quitfd, uint64_t base, uint64_t len, uint64_t src,
                        uint64_t page_size, uint64_t spin_ns, uint64_t *latency_ns,
                        uint64_t latency_cap);
uint64_t qmig_now_ns(void);
int qmig_gettid(void);
void qmig_name_thread(const char *name);

/* bitmap.c: bitmaps shared between placing threads and the fault thread */
void qmig_bitmap_set(uint8_t *map, uint64_t start, uint64_t count);
void qmig_bitmap_clear(uint8_t *map, uint64_t start, uint64_t count);
uint64_t qmig_bitmap_count(const uint8_t *map, uint64_t start, uint64_t count);
uint64_t qmig_bitmap_next_clear(const uint8_t *map, uint64_t start, uint64_t end);

/* memory.c: mappings and the memory around them */
uint64_t qmig_map_anon(uint64_t len, uint64_t huge_page_size, int *err);
int qmig_huge_zero_page_works(void);
int64_t qmig_compare_remote(int pid, uint64_t remote, uint64_t local, uint64_t len,
                            uint64_t page_size, uint64_t *mismatches, uint64_t max_mismatches);
int qmig_unmap(uint64_t addr, uint64_t len);
int qmig_madvise(uint64_t addr, uint64_t len, int advice);
int64_t qmig_resident_pages(uint64_t addr, uint64_t len);
int qmig_mlockall(int flags);
int qmig_munlockall(void);
void qmig_memcpy(uint64_t dst, uint64_t src, uint64_t len);
void qmig_fill_tags(uint64_t dst, uint64_t len, uint64_t stride, uint64_t tag_base,
                    uint64_t tag_xor);

/* workload.c */
int qmig_workload_run(struct qmig_workload *w);

/* records.c: runs of stream records into a block */
int qmig_place_records(struct qmig_block *b, const uint8_t *data, uint64_t data_base,
                       const uint64_t *headers, const uint64_t *bodies, uint64_t count,
                       uint64_t page_flag, int replace, struct qmig_records_result *res);

/* discard.c: dropping memory so that it faults again */
int qmig_block_sweep(struct qmig_block *b);
int64_t qmig_block_discard(struct qmig_block *b, const uint8_t *ranges, uint64_t n, int drop,
                           uint64_t *bad);

/* serve.c: the fault loop of an in-process page source */
int64_t qmig_serve_blocks(int uffd, int quitfd, struct qmig_block **blocks,
                          uint8_t **sources, int nblocks, uint64_t spin_ns,
                          struct qmig_served *log, uint64_t log_cap, int *stop);

/* fastpath.c: the destination's postcopy receive thread (see fastpath.c). Every wire number
   comes from Python, taken from the profile. */
struct qmig_fastpath_config {
    int32_t fd;                /* the channel's socket, read by the thread alone */
    int32_t quitfd;            /* an eventfd: readable stops the thread */
    int32_t nblocks;
    int32_t section_footer_present;
    uint32_t section_part;     /* the section type byte of QEMU_VM_SECTION_PART */
    uint32_t section_footer;   /* and of QEMU_VM_SECTION_FOOTER */
    uint32_t ram_section_id;
    uint32_t section_end;      /* and of QEMU_VM_SECTION_END (the last ram section's) */
    uint64_t flag_mask;        /* every RAM flag bit of a record header */
    uint64_t flag_continue;
    uint64_t flag_zero;
    uint64_t flag_page;
    uint64_t flag_eos;
    uint64_t target_page;
    uint64_t start_offset;     /* the stream offset of the first byte the thread reads */
    uint64_t ring_size;        /* bytes buffered between the socket and Python at most */
    uint64_t retain;           /* bytes kept behind Python's read position, for a sync */
    uint64_t wait_log;         /* recv() → placed times kept, one per data page, at most */
    /* A postcopy-preempt channel: bare RAM records only (no sections), with its own last
       block; an EOS ends what the thread follows, and a stream header at channel_start (its
       magic, be32) is never taken for a record. 0: a main channel. */
    uint32_t bare;
    uint32_t magic;
    uint64_t channel_start;
};

struct qmig_fastpath_stats {
    uint64_t bytes;            /* read from the socket */
    uint64_t records;          /* page records the thread took */
    uint64_t placed;           /* host pages it placed */
    uint64_t existing;         /* of its records, pages in place already */
    uint64_t place_errors;     /* placements that failed (left to Python, which reports) */
    uint64_t syncs;            /* times Python told it where the next record starts */
    uint64_t parsed_to;        /* the stream offset it has followed the stream to */
    uint64_t synced;           /* 1: it is following the stream now */
    uint64_t waits;            /* recv() → placed times logged */
};

struct qmig_fastpath;

struct qmig_fastpath *qmig_fastpath_start(const struct qmig_fastpath_config *cfg,
                                          struct qmig_block **blocks, const char *names,
                                          int *err);
int64_t qmig_fastpath_read(struct qmig_fastpath *fp, uint8_t *out, uint64_t cap,
                           int timeout_ms, uint64_t gather, int gather_ms);
void qmig_fastpath_sync(struct qmig_fastpath *fp, uint64_t offset, int mode, int block);
void qmig_fastpath_stats(struct qmig_fastpath *fp, struct qmig_fastpath_stats *out);
void qmig_fastpath_stop(struct qmig_fastpath *fp, struct qmig_fastpath_stats *out,
                        uint32_t *waits, uint64_t cap, uint64_t *nwaits);


/* request.c: page requests written to the return path from C (see qmig.ram.faults). */
struct qmig_freq;  /* opaque: the return path's lock, its socket, the last block asked for */

/* One fault, or one request sent for a fault logged before, as request.c saw it. */
struct qmig_freq_entry {
    uint64_t read_ns;         /* CLOCK_MONOTONIC right after read() */
    uint64_t sent_ns;         /* just before the request's send; 0: none sent */
    uint64_t done_ns;         /* just after it */
    uint64_t address;
    uint64_t host_offset;     /* of the host page, in its block */
    uint32_t tid;
    int32_t block;            /* index into blocks; -1: in no block, or not a fault */
    uint32_t kind;            /* QMIG_FREQ_* */
    uint32_t with_id;         /* the request was a REQ_PAGES_ID */
    uint32_t event;           /* UFFD_EVENT_*: a STRAY that is not a page fault is another event */
    uint64_t end;             /* such an event's range is [address, end) */
};

/* What became of a fault: a request sent, none as sending was off (Python asks), the send
   failed, already asked for, already in place, in no block; or (SEND) a request Python had
   sent for a fault logged as HELD (sent_ns 0: its send failed). */
enum {
    QMIG_FREQ_SENT = 0, QMIG_FREQ_HELD = 1, QMIG_FREQ_FAILED = 2, QMIG_FREQ_REPEAT = 3,
    QMIG_FREQ_LATE = 4, QMIG_FREQ_STRAY = 5, QMIG_FREQ_SEND = 6
};

/* layout: per block, words [id at, id length, id start field at, plain at, plain length,
   plain start field at] into templates; messages at most QMIG_FREQ_MAX bytes. */
enum { QMIG_FREQ_LAYOUT = 6, QMIG_FREQ_MAX = 512 };

struct qmig_freq *qmig_freq_new(struct qmig_block **blocks, int nblocks, uint8_t **requested,
                                const uint8_t *templates, const uint32_t *layout,
                                struct qmig_freq_entry *log, uint64_t log_cap,
                                int send_timeout_ms);
void qmig_freq_free(struct qmig_freq *ctx);
void qmig_rp_lock(struct qmig_freq *ctx);
void qmig_rp_unlock(struct qmig_freq *ctx);
void qmig_freq_enable(struct qmig_freq *ctx, int sock, int32_t last_block);
int32_t qmig_freq_disable(struct qmig_freq *ctx);
uint32_t qmig_freq_format(struct qmig_freq *ctx, int32_t block, uint64_t host_offset,
                          uint8_t *out);
int qmig_freq_run(struct qmig_freq *ctx, int uffd, int quitfd, int *quit);
int qmig_freq_send(struct qmig_freq *ctx, int32_t block, uint64_t host_offset,
                   uint64_t read_ns);
uint64_t qmig_freq_drain(struct qmig_freq *ctx, struct qmig_freq_entry *out, uint64_t max);

#endif
