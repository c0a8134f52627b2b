/* GPA-direct packets (type 9) of one received batch, decoded in one call.
 * Contract shared with the pure-Python twin in vmbus/packet.py (_py_gpa_direct_batch);
 * tests compare the two byte for byte. The code is native/packet.c.
 *
 * Input: the private copy that ring read() filled (buf, buflen; 8-byte aligned),
 * its index (n pairs of u32 offset, length), and the guest RAM region table of
 * native/memory.h. Packets other than type 9 are marked SKIPPED.
 *
 * Output, per packet i: pkts[i]. For an OK packet, its range_count range records
 * start at ranges[first_range], each naming its PFN array in buf and its coalesced
 * (region, offset, len) segments in segs[first_seg .. first_seg + seg_count).
 * A bad packet (status < 0) uses no range or segment record; range_count is the
 * count the guest declared and bad_range the index of the offending range.
 * Records past st->nranges / st->nsegs are unspecified.
 *
 * Checks, in this order, per packet: the extension holds the 8-byte header;
 * range_cnt != 0; range_cnt <= (ext bytes - 8) / 16; then per range: its header
 * inside the extension, byte_count != 0, byte_offset < 4096, byte_offset +
 * byte_count <= UINT32_MAX, its ceil((byte_offset + byte_count) / 4096) PFNs
 * inside the extension; then (after every range passed) every PFN in guest RAM.
 *
 * Resumable: st (zeroed by the caller before the first call) says where to go on.
 * Returns VMB_GPA_DONE when all n packets are decoded, VMB_GPA_MORE when the
 * next packet's ranges or segments do not fit in what is left of ranges[] or
 * segs[] (grow them and call again with the same st), or VMB_GPA_E_BAD_ARG for a
 * caller error: buf misaligned, an index entry outside buf, shorter than 16,
 * not 8-aligned, or whose descriptor disagrees with it (len8 * 8 != length,
 * offset8 < 2 or > len8) — ring read() never produces those.
 *
 * Between the cffi:begin and cffi:end lines is what Python sees: build_native.py
 * hands it to cffi (values of #defines come from the compiler). */
#ifndef VMBUSD_PACKET_H
#define VMBUSD_PACKET_H
#include <stdint.h>
#include "memory.h"

/* cffi:begin */
#define VMB_GPA_OK 0                  /* a GPA-direct packet, every range valid */
#define VMB_GPA_SKIPPED 1             /* not a GPA-direct packet */
#define VMB_GPA_E_SHORT_EXT (-1)      /* extension shorter than the 8-byte header */
#define VMB_GPA_E_NO_RANGES (-2)      /* range_cnt == 0 */
#define VMB_GPA_E_TOO_MANY_RANGES (-3) /* range_cnt * 16 > extension bytes - 8 */
#define VMB_GPA_E_TRUNCATED (-4)      /* a range header or PFN array runs past the extension */
#define VMB_GPA_E_COUNT_ZERO (-5)     /* byte_count == 0 */
#define VMB_GPA_E_OFFSET (-6)         /* byte_offset >= 4096 */
#define VMB_GPA_E_OVERFLOW (-7)       /* byte_offset + byte_count > UINT32_MAX */
#define VMB_GPA_E_PFN (-8)            /* a PFN outside every guest RAM region */

#define VMB_GPA_DONE 0
#define VMB_GPA_MORE 1
#define VMB_GPA_E_BAD_ARG (-100)

#define VMB_GPA_HDR_SIZE 8u           /* 8: reserved u32 + range_cnt u32 */
#define VMB_GPA_MIN_RANGE_SIZE 16u    /* 16: a range header and one PFN */

struct vmb_gpa_pkt {
    int32_t status;          /* VMB_GPA_OK, VMB_GPA_SKIPPED or VMB_GPA_E_* */
    uint32_t range_count;    /* OK: ranges decoded; error: range_cnt as declared */
    uint32_t first_range;    /* index of this packet's first range record */
    uint32_t bad_range;      /* error: index of the offending range, else 0 */
    uint64_t total_bytes;    /* OK: sum of the ranges' byte_count, else 0 */
};

struct vmb_gpa_range_rec {
    uint32_t byte_count;
    uint32_t byte_offset;    /* < 4096 */
    uint32_t pfn_offset;     /* byte offset of pfn_array[0] in buf (8-aligned) */
    uint32_t pfn_count;      /* ceil((byte_offset + byte_count) / 4096) */
    uint32_t first_seg;      /* index of this range's first segment */
    uint32_t seg_count;      /* segments (physically adjacent pages coalesced) */
};

struct vmb_gpa_batch {
    uint32_t next_pkt;       /* in/out: first packet not decoded yet */
    uint32_t nranges;        /* in/out: range records used */
    uint32_t nsegs;          /* in/out: segment records used */
    uint32_t _pad;
};

int vmb_gpa_direct_batch(const uint8_t *buf, uint64_t buflen,
                         const uint32_t *index, uint32_t n,
                         const struct vmb_mem_region *regions, uint32_t nregions,
                         struct vmb_gpa_pkt *pkts,
                         struct vmb_gpa_range_rec *ranges, uint32_t max_ranges,
                         struct vmb_iov_seg *segs, uint32_t max_segs,
                         struct vmb_gpa_batch *st);
/* cffi:end */
#endif
