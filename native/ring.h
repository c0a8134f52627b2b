/* VMBus ring buffer: constants, structs and small inline helpers.
 * The contract (what each function promises) is documented in native/cdef/ring.h,
 * which cffi parses; this file is the C side of the same definitions and must
 * stay layout-identical to it (cffi checks the structs at build time). */
#ifndef VMBUSD_RING_H
#define VMBUSD_RING_H
#include "vmbusd.h"

/* Return codes: each failure gets its own number so tests and logs can tell
 * them apart. The Python twin hard-codes the same values (vmbus/ring.py). */
#define VMB_E_WINDEX_RANGE     (-1)
#define VMB_E_WINDEX_ALIGN     (-2)
#define VMB_E_RINDEX_RANGE     (-3)
#define VMB_E_RINDEX_ALIGN     (-4)
#define VMB_E_AVAIL_PARTIAL    (-5)
#define VMB_E_OFFSET8_SMALL    (-6)
#define VMB_E_LEN8_LT_OFFSET8  (-7)
#define VMB_E_LEN8_GT_AVAIL    (-8)
#define VMB_E_LEN8_GT_RING     (-9)
#define VMB_E_BAD_TYPE         (-10)
#define VMB_E_BAD_FLAGS        (-11)
#define VMB_E_OUT_TOO_SMALL    (-12)
#define VMB_E_PKT_TOO_BIG      (-13)
#define VMB_E_BAD_ARG          (-14)

#define VMB_READ_PEEK          1u
#define VMB_RAW_COMPLETE       1u
#define VMB_WRITE_TRANS_ID_BASE 1u

/* Header page layout (spec §1.1). */
#define VMB_RING_HDR_SIZE      4096u
#define VMB_RING_OFF_WINDEX    0x00u
#define VMB_RING_OFF_RINDEX    0x04u
#define VMB_RING_OFF_IMASK     0x08u
#define VMB_RING_OFF_PENDING   0x0cu
#define VMB_RING_OFF_FEATURES  0x40u
#define VMB_RING_FEAT_PENDING_SEND_SZ 1u

#define VMB_RING_MIN_SIZE      32u
/* Largest data area we accept: keeps pos + len (both < size) far from u32
 * overflow even in the doubled mapping (2 * size). */
#define VMB_RING_MAX_SIZE      (1u << 30)

#define VMB_PKT_DESC_SIZE      16u
#define VMB_PKT_TRAILER_SIZE   8u
#define VMB_PKT_TYPE_XFER_PAGES 7u
#define VMB_PKT_TYPE_GPA_DIRECT 9u
#define VMB_PKT_TYPE_COMP      0xbu
#define VMB_PKT_FLAG_COMPLETION_REQUESTED 1u
/* 6 (in-band), 7 (transfer pages), 9 (GPA direct), 0xb (completion). */
#define VMB_RING_DEFAULT_TYPES ((1u << 6) | (1u << 7) | (1u << 9) | (1u << 0xb))

struct vmb_ring {
    uint8_t *hdr;
    uint8_t *data;
    uint32_t size;
    uint32_t doubled;
    uint32_t priv;
    uint32_t allowed_types;
    uint32_t pending;
    uint32_t _pad;
};

struct vmb_read_result {
    uint32_t npkts;
    uint32_t out_bytes;
    uint32_t consumed;
    uint32_t signal;
};

struct vmb_send {
    uint16_t type;
    uint16_t flags;
    uint32_t ext_len;
    uint64_t trans_id;
    uint32_t iov_start;
    uint32_t iov_cnt;
};

struct vmb_iov {
    const uint8_t *base;
    uint64_t len;
};

struct vmb_write_result {
    uint32_t npkts;
    uint32_t bytes;
    uint32_t signal;
    uint32_t _pad;
};

/* The 16-byte packet descriptor, as copied into private memory. */
struct vmb_desc {
    uint16_t type;
    uint16_t offset8;
    uint16_t len8;
    uint16_t flags;
    uint64_t trans_id;
};

/* Linux hv_get_bytes_to_read: bytes between the read and write offsets. */
static inline uint32_t vmb_ring_avail(uint32_t w, uint32_t r, uint32_t size)
{
    return w >= r ? w - r : size - r + w;
}

/* Linux hv_get_bytes_to_write: raw free space (never 0: a ring is never full). */
static inline uint32_t vmb_ring_free(uint32_t w, uint32_t r, uint32_t size)
{
    return w >= r ? size - (w - r) : r - w;
}

int vmb_ring_reader_open(struct vmb_ring *r);
int vmb_ring_read(struct vmb_ring *r, uint8_t *out, uint32_t out_cap, uint32_t *index,
                  uint32_t max_pkts, uint32_t flags, struct vmb_read_result *res);
int64_t vmb_ring_bytes_to_read(struct vmb_ring *r);
void vmb_ring_mask(struct vmb_ring *r);
int vmb_ring_unmask(struct vmb_ring *r);
int vmb_ring_writer_open(struct vmb_ring *r);
int vmb_ring_write(struct vmb_ring *r, const struct vmb_send *pkts, uint32_t n,
                   const struct vmb_iov *iov, uint32_t flags, uint64_t trans_id_base,
                   struct vmb_write_result *res);
int vmb_ring_write_raw(struct vmb_ring *r, const uint8_t *buf, uint64_t buf_len,
                       const uint32_t *index, uint32_t n, uint32_t flags,
                       struct vmb_write_result *res);
int64_t vmb_ring_bytes_to_write(struct vmb_ring *r);
int vmb_ring_request_space(struct vmb_ring *r, uint32_t need);

struct vmb_fwd_result {
    uint32_t npkts;
    uint32_t consumed;
    uint32_t read_signal;
    uint32_t write_signal;
};
int vmb_ring_forward(struct vmb_ring *rd, struct vmb_ring *wr, uint32_t max_pkts,
                     uint32_t flags, struct vmb_fwd_result *res);

#endif
