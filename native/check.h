#ifndef VMBUSD_CHECK_H
#define VMBUSD_CHECK_H
#include "vmbusd.h"
#define VMB_CHECK_BYTES 1
int64_t vmb_check_echo(const uint8_t *buf, const uint32_t *index, uint32_t n,
                       uint64_t expect_tid, const uint8_t *pattern, uint32_t pattern_len,
                       const uint32_t *lens, uint32_t payload_len, uint32_t flags);
void vmb_bench_memcpy(uint8_t *dst, uint32_t dst_size, const uint8_t *src, uint32_t size,
                      uint64_t count);
#endif
