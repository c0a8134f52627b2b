/* Load-generator helpers (demo, bench): echo verification and a memcpy baseline.
 * Twins: vmbus/guest/check.py. The code is native/check.c.
 *
 * Between the cffi:begin and cffi:end lines is what Python sees: build_native.py
 * hands it to cffi (values of #defines come from the compiler). */
#ifndef VMBUSD_CHECK_H
#define VMBUSD_CHECK_H
#include "vmbusd.h"

/* cffi:begin */
/* Verify a batch of echoed packets, as a load generator receives them: packet i must
 * carry trans_id expect_tid + i and a payload equal to pattern[0..len) for the length
 * its sender used (payload_len, or the per-packet length from lens when non-NULL).
 * flags bit 0 (VMB_CHECK_BYTES): also compare the payload bytes (else order and
 * lengths only). Returns -1 when all match, else the index of the first packet that
 * does not. */
#define VMB_CHECK_BYTES 1
int64_t vmb_check_echo(const uint8_t *buf, const uint32_t *index, uint32_t n,
                       uint64_t expect_tid, const uint8_t *pattern, uint32_t pattern_len,
                       const uint32_t *lens, uint32_t payload_len, uint32_t flags);
/* Baseline for benchmarks: copy `count` packets of `size` bytes from src into a ring-like
 * dst of dst_size bytes at 8-aligned advancing offsets (what a ring write costs at best). */
void vmb_bench_memcpy(uint8_t *dst, uint32_t dst_size, const uint8_t *src, uint32_t size,
                      uint64_t count);
/* cffi:end */
#endif
