/* Received-page bitmaps, one bit per target page, changed with atomic byte operations (see
   bit_test in uffd_internal.h): placing threads and the fault thread share them. */
#include "uffd_internal.h"

#include <stdint.h>

void qmig_bitmap_set(uint8_t *map, uint64_t start, uint64_t count)
{
    for (uint64_t bit = start; bit < start + count; bit++)
        __atomic_fetch_or(&map[bit >> 3], (uint8_t)(1u << (bit & 7)), __ATOMIC_RELEASE);
}

void qmig_bitmap_clear(uint8_t *map, uint64_t start, uint64_t count)
{
    for (uint64_t bit = start; bit < start + count; bit++)
        __atomic_fetch_and(&map[bit >> 3], (uint8_t)~(1u << (bit & 7)), __ATOMIC_RELEASE);
}

uint64_t qmig_bitmap_count(const uint8_t *map, uint64_t start, uint64_t count)
{
    uint64_t n = 0;
    for (uint64_t bit = start; bit < start + count; bit++)
        n += bit_test(map, bit);
    return n;
}

uint64_t qmig_bitmap_next_clear(const uint8_t *map, uint64_t start, uint64_t end)
{
    uint64_t bit = start;
    while (bit < end && (bit & 7))
        if (!bit_test(map, bit)) return bit; else bit++;
    while (bit + 8 <= end && __atomic_load_n(&map[bit >> 3], __ATOMIC_ACQUIRE) == 0xff)
        bit += 8;
    for (; bit < end; bit++)
        if (!bit_test(map, bit))
            return bit;
    return end;
}
