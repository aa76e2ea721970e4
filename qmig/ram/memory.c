/* Mappings and the memory around them: anonymous (and hugetlb) blocks, residency, locking,
   and comparing this process's memory with another's. */
#define _GNU_SOURCE
#include "uffd_internal.h"

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <unistd.h>

#ifndef MAP_HUGE_SHIFT
#define MAP_HUGE_SHIFT 26
#endif
#ifndef MAP_HUGETLB
#define MAP_HUGETLB 0x40000
#endif

/* Anonymous memory for a block. Blocks of small pages start on a 2 MiB boundary, as a VMM
   aligns guest RAM: only a whole aligned 2 MiB can be mapped by one huge page (or the huge
   zero page). */
uint64_t qmig_map_anon(uint64_t len, uint64_t huge_page_size, int *err)
{
    /* NORESERVE: a claimed block costs address space, not commit; memory follows pages.
     * Huge pages keep their reservation, so that too few of them fail here, not by SIGBUS. */
    int flags = MAP_PRIVATE | MAP_ANONYMOUS | (huge_page_size ? 0 : MAP_NORESERVE);
    if (huge_page_size)
        flags |= MAP_HUGETLB | ((__builtin_ctzll(huge_page_size)) << MAP_HUGE_SHIFT);
    uint64_t slack = huge_page_size || len < QMIG_REGION ? 0 : QMIG_REGION;
    void *p = mmap(NULL, len + slack, PROT_READ | PROT_WRITE, flags, -1, 0);
    if (p == MAP_FAILED) {
        *err = errno;
        return 0;
    }
    uint64_t start = (uint64_t)(uintptr_t)p;
    if (slack) {
        uint64_t aligned = (start + QMIG_REGION - 1) & ~(QMIG_REGION - 1);
        if (aligned > start)
            munmap(p, aligned - start);
        if (aligned + len < start + len + slack)
            munmap((void *)(uintptr_t)(aligned + len), start + len + slack - aligned - len);
        start = aligned;
    }
    *err = 0;
    return start;
}

/* Whether reading untouched memory under MADV_HUGEPAGE maps the huge zero page here (THP
   enabled for madvised memory, use_zero_page on): then one read maps 2 MiB of zeros, where
   mapping them page by page costs ~0.6 us per small page. */
int qmig_huge_zero_page_works(void)
{
    int err;
    uint64_t at = qmig_map_anon(QMIG_REGION, 0, &err);
    if (!at)
        return 0;
    size_t pages = QMIG_REGION / (uint64_t)sysconf(_SC_PAGESIZE);
    unsigned char vec[pages];
    int works = 0;
    if (madvise((void *)(uintptr_t)at, QMIG_REGION, MADV_HUGEPAGE) == 0) {
        (void)*(volatile uint8_t *)(uintptr_t)at;
        if (mincore((void *)(uintptr_t)at, QMIG_REGION, vec) == 0) {
            works = 1;
            for (size_t k = 0; k < pages; k++)
                works &= vec[k] & 1;
        }
    }
    munmap((void *)(uintptr_t)at, QMIG_REGION);
    return works;
}

/* Offsets (from `done`) of the pages of `page_size` that differ between the two buffers. */
static int64_t note_differing(const uint8_t *theirs, const uint8_t *mine, uint64_t len,
                              uint64_t done, uint64_t page_size, int64_t differ,
                              uint64_t *mismatches, uint64_t max_mismatches)
{
    for (uint64_t at = 0; at < len; at += page_size) {
        uint64_t size = len - at < page_size ? len - at : page_size;
        if (memcmp(theirs + at, mine + at, size) == 0)
            continue;
        if ((uint64_t)differ < max_mismatches)
            mismatches[differ] = done + at;
        differ++;
    }
    return differ;
}

/* Compare len bytes at remote in process pid with local memory, page_size bytes at a time,
   reading the other process's memory directly (process_vm_readv) a few MiB at a time: no
   file, one copy. Offsets of differing pages go to mismatches (up to max_mismatches). Returns
   how many pages differ, or -errno (ESRCH: no such process; EFAULT: not mapped there). */
#define QMIG_COMPARE_CHUNK (4ull << 20)
int64_t qmig_compare_remote(int pid, uint64_t remote, uint64_t local, uint64_t len,
                            uint64_t page_size, uint64_t *mismatches, uint64_t max_mismatches)
{
    if (!page_size)
        return -EINVAL;
    uint8_t *buffer = malloc(QMIG_COMPARE_CHUNK);
    if (!buffer)
        return -ENOMEM;
    int64_t differ = 0;
    for (uint64_t done = 0; done < len;) {
        uint64_t want = len - done < QMIG_COMPARE_CHUNK ? len - done : QMIG_COMPARE_CHUNK;
        struct iovec here = { buffer, want };
        struct iovec there = { (void *)(uintptr_t)(remote + done), want };
        ssize_t got = process_vm_readv(pid, &here, 1, &there, 1, 0);
        if (got <= 0) {
            int error = got < 0 ? errno : EFAULT;
            free(buffer);
            return -error;
        }
        const uint8_t *mine = (const uint8_t *)(uintptr_t)(local + done);
        if (memcmp(buffer, mine, (size_t)got) != 0)
            differ = note_differing(buffer, mine, (uint64_t)got, done, page_size, differ,
                                    mismatches, max_mismatches);
        done += (uint64_t)got;
    }
    free(buffer);
    return differ;
}

int qmig_unmap(uint64_t addr, uint64_t len)
{
    return munmap((void *)(uintptr_t)addr, len) < 0 ? -errno : 0;
}

int qmig_madvise(uint64_t addr, uint64_t len, int advice)
{
    return madvise((void *)(uintptr_t)addr, len, advice) < 0 ? -errno : 0;
}

int64_t qmig_resident_pages(uint64_t addr, uint64_t len)
{
    uint64_t page = (uint64_t)sysconf(_SC_PAGESIZE);
    uint64_t pages = (len + page - 1) / page;
    unsigned char vec[4096];
    int64_t resident = 0;
    for (uint64_t first = 0; first < pages; first += sizeof(vec)) {
        uint64_t n = pages - first < sizeof(vec) ? pages - first : sizeof(vec);
        if (mincore((void *)(uintptr_t)(addr + first * page), n * page, vec) < 0)
            return -errno;
        for (uint64_t k = 0; k < n; k++)
            resident += vec[k] & 1;
    }
    return resident;
}

int qmig_mlockall(int flags) { return mlockall(flags) < 0 ? -errno : 0; }
int qmig_munlockall(void) { return munlockall() < 0 ? -errno : 0; }

void qmig_memcpy(uint64_t dst, uint64_t src, uint64_t len)
{
    memcpy((void *)(uintptr_t)dst, (const void *)(uintptr_t)src, len);
}

void qmig_fill_tags(uint64_t dst, uint64_t len, uint64_t stride, uint64_t tag_base,
                    uint64_t tag_xor)
{
    for (uint64_t off = 0; off + sizeof(uint64_t) <= len; off += stride)
        *(uint64_t *)(uintptr_t)(dst + off) = tag_xor ^ (tag_base + off);
}
