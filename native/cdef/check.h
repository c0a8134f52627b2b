/* Verify a batch of echoed packets, as a load generator receives them: packet i must
 * carry trans_id expect_tid + i and a payload equal to pattern[0..len) for the length
 * its sender used (payload_len, or the per-packet length from lens when non-NULL).
 * Returns -1 when all match, else the index of the first packet that does not. */
int64_t vmb_check_echo(const uint8_t *buf, const uint32_t *index, uint32_t n,
                       uint64_t expect_tid, const uint8_t *pattern, uint32_t pattern_len,
                       const uint32_t *lens, uint32_t payload_len);
