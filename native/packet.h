/* Typed VMBus packets: batch decode of GPA-direct packets (type 9); see
 * native/cdef/packet.h for the contract (the declarations cffi parses). */
#ifndef VMBUSD_PACKET_H
#define VMBUSD_PACKET_H
#include <stdint.h>
#include "memory.h"

/* Per-packet status (struct vmb_gpa_pkt.status). */
#define VMB_GPA_OK                  0
#define VMB_GPA_SKIPPED             1
#define VMB_GPA_E_SHORT_EXT         (-1)
#define VMB_GPA_E_NO_RANGES         (-2)
#define VMB_GPA_E_TOO_MANY_RANGES   (-3)
#define VMB_GPA_E_TRUNCATED         (-4)
#define VMB_GPA_E_COUNT_ZERO        (-5)
#define VMB_GPA_E_OFFSET            (-6)
#define VMB_GPA_E_OVERFLOW          (-7)
#define VMB_GPA_E_PFN               (-8)

/* Return of vmb_gpa_direct_batch. */
#define VMB_GPA_DONE                0
#define VMB_GPA_MORE                1
#define VMB_GPA_E_BAD_ARG           (-100)

#define VMB_GPA_HDR_SIZE            8u   /* reserved u32 + range_cnt u32 */
#define VMB_GPA_MIN_RANGE_SIZE      16u  /* byte_count, byte_offset, one PFN */

struct vmb_gpa_pkt {
    int32_t status;
    uint32_t range_count;
    uint32_t first_range;
    uint32_t bad_range;
    uint64_t total_bytes;
};

struct vmb_gpa_range_rec {
    uint32_t byte_count;
    uint32_t byte_offset;
    uint32_t pfn_offset;
    uint32_t pfn_count;
    uint32_t first_seg;
    uint32_t seg_count;
};

struct vmb_gpa_batch {
    uint32_t next_pkt;
    uint32_t nranges;
    uint32_t nsegs;
    uint32_t _pad;
};

int vmb_gpa_direct_batch(const uint8_t *buf, uint64_t buflen,
                         const uint32_t *index, uint32_t n,
                         const struct vmb_mem_region *regions, uint32_t nregions,
                         struct vmb_gpa_pkt *pkts,
                         struct vmb_gpa_range_rec *ranges, uint32_t max_ranges,
                         struct vmb_iov_seg *segs, uint32_t max_segs,
                         struct vmb_gpa_batch *st);
#endif
