/* Echo verification for load generators (demo, bench): per packet in C so the
 * checker is never what a benchmark measures. Input is our own private copy. */
#include "check.h"

int64_t vmb_check_echo(const uint8_t *buf, const uint32_t *index, uint32_t n,
                       uint64_t expect_tid, const uint8_t *pattern, uint32_t pattern_len,
                       const uint32_t *lens, uint32_t payload_len, uint32_t flags)
{
    for (uint32_t i = 0; i < n; i++) {
        const uint8_t *p = buf + index[2 * i];
        uint32_t plen = index[2 * i + 1];
        uint16_t off8, len8;
        uint64_t tid;
        uint32_t want = lens ? lens[i] : payload_len;
        memcpy(&off8, p + 2, 2);
        memcpy(&len8, p + 4, 2);
        memcpy(&tid, p + 8, 8);
        if (tid != expect_tid + i)
            return i;
        uint32_t off = (uint32_t)off8 * 8, end = (uint32_t)len8 * 8;
        if (end > plen || off > end || want > pattern_len || end - off < want ||
            end - off >= want + 8)
            return i;
        if ((flags & VMB_CHECK_BYTES) && memcmp(p + off, pattern, want) != 0)
            return i;
    }
    return -1;
}

void vmb_bench_memcpy(uint8_t *dst, uint32_t dst_size, const uint8_t *src, uint32_t size,
                      uint64_t count)
{
    uint32_t off = 0, step = (size + 7u) & ~7u;
    if (step == 0 || step > dst_size)
        return;
    for (uint64_t i = 0; i < count; i++) {
        if (off + step > dst_size)
            off = 0;
        memcpy(dst + off, src, size);
        off += step;
    }
    __asm__ volatile("" : : "r"(dst) : "memory"); /* keep the copies */
}
