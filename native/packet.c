/* GPA-direct packets (type 9, spec §2.5, Linux `vmbus_channel_packet_multipage_buffer`
 * and friends): every range of every packet of a received batch checked and turned
 * into guest RAM segments in one call, for storvsc's one-request-per-packet path.
 *
 * Input is the private copy ring read() made, never guest memory, so a field can
 * be read twice here without the guest changing it in between (the structure pass
 * and the walk pass below both read the range list). Every length is still the
 * guest's word: each is checked against the extension's bounds before use.
 * Contract: native/packet.h; pure-Python twin: vmbus/packet.py
 * (_py_gpa_direct_batch); tests compare the two byte for byte. */
#include <string.h>
#include "vmbusd.h"
#include "ring.h"
#include "memory.h"
#include "packet.h"

#define GPA_PAGE_SHIFT 12
#define GPA_PAGE_SIZE  (1u << GPA_PAGE_SHIFT)

/* vmbus/packet.py unpacks both record arrays in bulk ("=iIIIQ", "=6I"). */
_Static_assert(sizeof(struct vmb_gpa_pkt) == 24, "struct vmb_gpa_pkt layout");
_Static_assert(sizeof(struct vmb_gpa_range_rec) == 24, "struct vmb_gpa_range_rec layout");
_Static_assert(sizeof(struct vmb_gpa_batch) == 16, "struct vmb_gpa_batch layout");
/* vmb_gpa_range_walk reads the PFN array in place as host u64s. */
_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "PFNs are read in host order");

static inline uint16_t ld16(const uint8_t *p)
{
    return (uint16_t)(p[0] | (p[1] << 8));
}

static inline uint32_t ld32(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) |
           ((uint32_t)p[3] << 24);
}

/* The structure of a range list in ext[0, elen): returns VMB_GPA_OK or the first
 * VMB_GPA_E_* found, with the declared count, the offending range, and the sums.
 * elen <= 65535 * 8, so every position below fits a u32 without overflow. */
static int32_t check_ranges(const uint8_t *ext, uint32_t elen, uint32_t *declared,
                            uint32_t *bad, uint64_t *bytes, uint64_t *pfns)
{
    *declared = 0;
    *bad = 0;
    *bytes = 0;
    *pfns = 0;
    if (elen < VMB_GPA_HDR_SIZE)
        return VMB_GPA_E_SHORT_EXT;
    uint32_t count = ld32(ext + 4);   /* ext + 0 is `reserved`: may be garbage */
    *declared = count;
    if (count == 0)
        return VMB_GPA_E_NO_RANGES;
    if (count > (elen - VMB_GPA_HDR_SIZE) / VMB_GPA_MIN_RANGE_SIZE)
        return VMB_GPA_E_TOO_MANY_RANGES;
    uint32_t pos = VMB_GPA_HDR_SIZE;
    for (uint32_t i = 0; i < count; i++) {
        *bad = i;
        if (elen - pos < 8)
            return VMB_GPA_E_TRUNCATED;
        uint32_t byte_count = ld32(ext + pos);
        uint32_t byte_offset = ld32(ext + pos + 4);
        if (byte_count == 0)
            return VMB_GPA_E_COUNT_ZERO;
        if (byte_offset >= GPA_PAGE_SIZE)
            return VMB_GPA_E_OFFSET;
        uint64_t end = (uint64_t)byte_offset + byte_count;
        if (end > UINT32_MAX)
            return VMB_GPA_E_OVERFLOW;
        uint64_t np = (end + GPA_PAGE_SIZE - 1) >> GPA_PAGE_SHIFT;
        pos += 8;
        if ((elen - pos) / 8 < np)
            return VMB_GPA_E_TRUNCATED;
        pos += (uint32_t)np * 8;
        *bytes += byte_count;
        *pfns += np;
    }
    *bad = 0;
    return VMB_GPA_OK;
}

int vmb_gpa_direct_batch(const uint8_t *buf, uint64_t buflen,
                         const uint32_t *index, uint32_t n,
                         const struct vmb_mem_region *regions, uint32_t nregions,
                         struct vmb_gpa_pkt *pkts,
                         struct vmb_gpa_range_rec *ranges, uint32_t max_ranges,
                         struct vmb_iov_seg *segs, uint32_t max_segs,
                         struct vmb_gpa_batch *st)
{
    if (buf == NULL || ((uintptr_t)buf & 7) != 0 || st == NULL ||
        st->nranges > max_ranges || st->nsegs > max_segs)
        return VMB_GPA_E_BAD_ARG;
    if (buflen > UINT32_MAX)
        buflen = UINT32_MAX;   /* record offsets are u32, as ring read() offsets are */

    for (uint32_t i = st->next_pkt; i < n; i++) {
        st->next_pkt = i;
        uint32_t off = index[2 * (size_t)i], len = index[2 * (size_t)i + 1];
        if (len < VMB_PKT_DESC_SIZE || (off & 7) != 0 || off > buflen || len > buflen - off)
            return VMB_GPA_E_BAD_ARG;
        const uint8_t *p = buf + off;
        uint16_t type = ld16(p), off8 = ld16(p + 2), len8 = ld16(p + 4);
        if ((uint32_t)len8 * 8 != len || off8 < 2 || off8 > len8)
            return VMB_GPA_E_BAD_ARG;

        struct vmb_gpa_pkt *rec = &pkts[i];
        memset(rec, 0, sizeof(*rec));
        rec->first_range = st->nranges;
        if (type != VMB_PKT_TYPE_GPA_DIRECT) {
            rec->status = VMB_GPA_SKIPPED;
            continue;
        }
        const uint8_t *ext = p + VMB_PKT_DESC_SIZE;
        uint32_t elen = (uint32_t)off8 * 8 - VMB_PKT_DESC_SIZE;
        uint32_t declared, bad;
        uint64_t bytes, npfns;
        int32_t rc = check_ranges(ext, elen, &declared, &bad, &bytes, &npfns);
        if (rc != VMB_GPA_OK) {
            rec->status = rc;
            rec->range_count = declared;
            rec->bad_range = bad;
            continue;
        }
        /* Segments never outnumber pages, so this room makes the walk below
         * unable to run out of it (and the answer independent of PFN order). */
        if (declared > max_ranges - st->nranges || npfns > max_segs - st->nsegs)
            return VMB_GPA_MORE;

        uint32_t pos = VMB_GPA_HDR_SIZE, s = st->nsegs;
        for (uint32_t k = 0; k < declared; k++) {
            uint32_t byte_count = ld32(ext + pos);
            uint32_t byte_offset = ld32(ext + pos + 4);
            uint32_t np = (uint32_t)(((uint64_t)byte_offset + byte_count + GPA_PAGE_SIZE - 1) >>
                                     GPA_PAGE_SHIFT);
            uint32_t pfn_off = off + VMB_PKT_DESC_SIZE + pos + 8;   /* 8-aligned */
            int64_t got = vmb_gpa_range_walk(regions, nregions, byte_offset, byte_count,
                                             (const uint64_t *)(buf + pfn_off), np,
                                             segs + s, max_segs - s);
            if (got < 0) {
                if (got != VMB_MEM_E_PFN)
                    return VMB_GPA_E_BAD_ARG;   /* cannot happen: checked above */
                rc = VMB_GPA_E_PFN;
                bad = k;
                break;
            }
            struct vmb_gpa_range_rec *rr = &ranges[st->nranges + k];
            rr->byte_count = byte_count;
            rr->byte_offset = byte_offset;
            rr->pfn_offset = pfn_off;
            rr->pfn_count = np;
            rr->first_seg = s;
            rr->seg_count = (uint32_t)got;
            s += (uint32_t)got;
            pos += 8 + np * 8;
        }
        rec->range_count = declared;
        if (rc != VMB_GPA_OK) {
            rec->status = rc;
            rec->bad_range = bad;
            continue;   /* nranges and nsegs unchanged: the records are dropped */
        }
        rec->total_bytes = bytes;
        st->nranges += declared;
        st->nsegs = s;
    }
    st->next_pkt = n;
    return VMB_GPA_DONE;
}
