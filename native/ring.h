/* VMBus ring buffer, both ends: the contract, shared with the pure-Python twin in
 * vmbus/ring.py (PyRingReader / PyRingWriter); tests compare the two byte for byte.
 * The code is native/ring.c.
 *
 * A ring is one header page (4096 bytes, shared, guest-writable) and a data area
 * of `size` bytes. If `doubled` is 1 the data area is mapped twice back to back
 * (data[size..2*size) is the same memory as data[0..size)), so a packet that wraps
 * is one span; otherwise the code copies in two pieces. Either way no access
 * leaves [data, data+size) (or [data, data+2*size) when doubled), whatever the
 * guest wrote. The struct itself is private memory: `priv` is our own index (next
 * read offset for a reader, next write offset for a writer) and is never read back
 * from the shared page. The peer's index is read once per decision, then validated.
 *
 * Return codes: 0 = OK, negative = one of VMB_E_* (distinct values -1..-14); the
 * twin takes the values from the build (vmbus/ring.py RingError).
 *
 * Between the cffi:begin and cffi:end lines is what Python sees: build_native.py
 * hands it to cffi (values of #defines come from the compiler). The rest is C only. */
#ifndef VMBUSD_RING_H
#define VMBUSD_RING_H
#include "vmbusd.h"

/* cffi:begin */
#define VMB_E_WINDEX_RANGE (-1)         /* write_index >= size */
#define VMB_E_WINDEX_ALIGN (-2)         /* write_index not 8-aligned */
#define VMB_E_RINDEX_RANGE (-3)         /* read_index >= size */
#define VMB_E_RINDEX_ALIGN (-4)         /* read_index not 8-aligned */
#define VMB_E_AVAIL_PARTIAL (-5)        /* 0 < bytes available < 16 (half a descriptor) */
#define VMB_E_OFFSET8_SMALL (-6)        /* offset8 < 2, or < 3 for types 7 and 9 */
#define VMB_E_LEN8_LT_OFFSET8 (-7)      /* len8 < offset8 */
#define VMB_E_LEN8_GT_AVAIL (-8)        /* len8*8 + 8 (trailer) > bytes available */
#define VMB_E_LEN8_GT_RING (-9)         /* len8*8 + 8 >= size: could never fit in this ring */
#define VMB_E_BAD_TYPE (-10)            /* packet type not in the reader's allowed mask */
#define VMB_E_BAD_FLAGS (-11)           /* flags other than COMPLETION_REQUESTED */
#define VMB_E_OUT_TOO_SMALL (-12)       /* first packet larger than the caller's out buffer */
#define VMB_E_PKT_TOO_BIG (-13)         /* writer: packet can never fit in this ring */
#define VMB_E_BAD_ARG (-14)             /* caller error: bad size, lengths, ext_len, flags, ... */

#define VMB_READ_PEEK 1u                /* read flag: copy out but do not advance or commit */
#define VMB_RAW_COMPLETE 1u             /* write_raw flag: packets with COMPLETION_REQUESTED
                                         * are written as VM_PKT_COMP with flags 0 */
#define VMB_WRITE_TRANS_ID_BASE 1u      /* write flag: packet i of the call gets
                                         * trans_id_base + i instead of its own trans_id */

/* Header page layout (spec §1.1). */
#define VMB_RING_HDR_SIZE 4096u
#define VMB_RING_OFF_WINDEX 0x00u
#define VMB_RING_OFF_RINDEX 0x04u
#define VMB_RING_OFF_IMASK 0x08u
#define VMB_RING_OFF_PENDING 0x0cu
#define VMB_RING_OFF_FEATURES 0x40u
#define VMB_RING_FEAT_PENDING_SEND_SZ 1u
#define VMB_RING_MIN_SIZE 32u
/* Largest data area we accept: keeps pos + len (both < size) far from u32
 * overflow even in the doubled mapping (2 * size). */
#define VMB_RING_MAX_SIZE (1u << 30)
/* 6 (in-band), 7 (transfer pages), 9 (GPA direct), 0xb (completion). */
#define VMB_RING_DEFAULT_TYPES ((1u << 6) | (1u << 7) | (1u << 9) | (1u << 0xb))

struct vmb_ring {
    uint8_t *hdr;        /* 4096-byte shared header page */
    uint8_t *data;       /* shared data area (size bytes, or 2*size if doubled) */
    uint32_t size;       /* data size D: multiple of 8, 32 <= D <= 1<<30 (checked by open) */
    uint32_t doubled;
    uint32_t priv;       /* private index, always < size and 8-aligned */
    uint32_t allowed_types; /* reader: bit t set = packet type t accepted */
    uint32_t pending;    /* writer: pending_send_sz value we set, 0 if none */
    uint32_t _pad;
};

struct vmb_read_result {
    uint32_t npkts;      /* packets copied to out (and consumed unless PEEK) */
    uint32_t out_bytes;  /* bytes used in out */
    uint32_t consumed;   /* ring bytes consumed (sum of len8*8 + 8) */
    uint32_t signal;     /* 1: the writer was waiting (pending_send_sz) and now has room */
};

struct vmb_send {        /* one packet for vmb_ring_write */
    uint16_t type;
    uint16_t flags;
    uint32_t ext_len;    /* first ext_len bytes of the gathered body are the descriptor
                            extension (multiple of 8): offset8 = (16 + ext_len) / 8 */
    uint64_t trans_id;
    uint32_t iov_start;  /* body = concatenation of iov[iov_start .. iov_start+iov_cnt) */
    uint32_t iov_cnt;
};

struct vmb_iov {
    const uint8_t *base;
    uint64_t len;
};

struct vmb_write_result {
    uint32_t npkts;      /* whole packets written (a prefix of the batch) */
    uint32_t bytes;      /* ring bytes used (sum of len8*8 + 8) */
    uint32_t signal;     /* 1: the reader should be signalled (was empty, mask clear) */
    uint32_t _pad;
};

/* Reader (consumer). open: check size, take the current read_index as priv after
 * validating it (range, then alignment). */
int vmb_ring_reader_open(struct vmb_ring *r);
/* Copy up to max_pkts whole packets (descriptor included, len8*8 bytes each) into out,
 * each at an 8-aligned offset; index[2i] = offset in out, index[2i+1] = length. The
 * descriptor in out is the copy that was validated (the guest cannot change it later).
 * One write_index load (acquire, validated: WINDEX_*), then per packet: avail < 16 ->
 * AVAIL_PARTIAL; descriptor checks in this order: BAD_TYPE, BAD_FLAGS, OFFSET8_SMALL,
 * LEN8_LT_OFFSET8, LEN8_GT_RING, LEN8_GT_AVAIL. A packet that does not fit in the rest
 * of out ends the batch (OUT_TOO_SMALL only if it is the first). Unless PEEK, one
 * read_index store (release, between full barriers) for the batch and then the
 * pending_send_sz decision (spec §3.4; signal only if something was consumed, the
 * ring's feature bit 0 is set, P != 0, and not (W - B > P) and W > P, with W the raw
 * free space from a re-read, valid write_index). On a validation error the packets
 * before the bad one are still returned and consumed; the return value is the error. */
int vmb_ring_read(struct vmb_ring *r, uint8_t *out, uint32_t out_cap, uint32_t *index,
                  uint32_t max_pkts, uint32_t flags, struct vmb_read_result *res);
/* Commit nbytes that a PEEK read returned as `consumed` (a device that records the
 * batch elsewhere first, so a crash never loses it: vmbus/journal.py). nbytes must be
 * 8-aligned and at most what is available now (write_index re-loaded and validated:
 * WINDEX_*; else BAD_ARG and nothing moves); then the read_index store and the
 * pending_send_sz decision exactly as a non-PEEK read, *signal set. */
int vmb_ring_consume(struct vmb_ring *r, uint32_t nbytes, uint32_t *signal);
/* Bytes available to read (validated); negative VMB_E_* on a corrupt write_index. */
int64_t vmb_ring_bytes_to_read(struct vmb_ring *r);
void vmb_ring_mask(struct vmb_ring *r);                  /* interrupt_mask = 1, full barrier */
/* interrupt_mask = 0, full barrier, re-check: 1 if data arrived (or the index is corrupt,
 * so the caller's next read reports it), 0 if the ring is empty. */
int vmb_ring_unmask(struct vmb_ring *r);

/* Writer (producer). open: check size, take the current write_index as priv after
 * validating it, and set feature_bits bit 0 (we honour pending_send_sz). */
int vmb_ring_writer_open(struct vmb_ring *r);
/* Write a prefix of pkts[0..n) that fits (Linux rule: free > len8*8 + 8), each packet
 * as descriptor (built here), gathered body, zero pad to 8, trailer (start << 32).
 * The whole batch is checked first (BAD_ARG: ext_len not a multiple of 8 or beyond the
 * body, unknown flags; PKT_TOO_BIG: len8 > 0xffff or len8*8 + 8 >= size): an error
 * writes nothing. read_index is read once (RINDEX_* on corruption). If anything was
 * written: full barrier, one write_index store (release), clear our pending_send_sz
 * if we had set it (write barrier first), full barrier, then signal iff interrupt_mask
 * == 0 and a re-read read_index equals write_index before the batch.
 * flags: VMB_WRITE_TRANS_ID_BASE (then trans_id_base is used). */
int vmb_ring_write(struct vmb_ring *r, const struct vmb_send *pkts, uint32_t n,
                   const struct vmb_iov *iov, uint32_t flags, uint64_t trans_id_base,
                   struct vmb_write_result *res);
/* Write preformed packets: buf (buf_len bytes) holds packets as vmb_ring_read returns
 * them (descriptor included), index as vmb_ring_read fills it. Each entry is checked
 * first (BAD_ARG: outside buf, length not a multiple of 8 or < 16, len8*8 != length,
 * offset8 < 2 or > len8; PKT_TOO_BIG) and the trailer is ours; otherwise as
 * vmb_ring_write. flags: VMB_RAW_COMPLETE. */
int vmb_ring_write_raw(struct vmb_ring *r, const uint8_t *buf, uint64_t buf_len,
                       const uint32_t *index, uint32_t n, uint32_t flags,
                       struct vmb_write_result *res);
/* Free bytes as Linux counts them (raw free space); negative VMB_E_* on a corrupt read_index. */
int64_t vmb_ring_bytes_to_write(struct vmb_ring *r);
/* Blocked writer: pending_send_sz = need (the next packet's len8*8 + 8), full barrier,
 * re-read read_index. Returns 1 if the packet now fits (free > need; pending cleared
 * again), 0 if the caller must wait for a signal (pending stays set until the next
 * successful write), negative VMB_E_* on a corrupt read_index, BAD_ARG for need == 0,
 * PKT_TOO_BIG for need >= size. */
int vmb_ring_request_space(struct vmb_ring *r, uint32_t need);

/* Forward packets from reader ring rd straight into writer ring wr (a pass-through
 * device such as echo or a loopback NIC): each descriptor is copied once to private
 * memory and validated as vmb_ring_read does; the payload, opaque to a forwarder,
 * moves ring to ring. Stops at max_pkts, an empty rd, or a packet wr has no room for
 * (it stays in rd). flags: VMB_RAW_COMPLETE. One write_index and one read_index
 * update per call; both signal decisions are returned. On a validation error the
 * packets before the bad one are forwarded and the error is returned. */
struct vmb_fwd_result {
    uint32_t npkts;
    uint32_t consumed;      /* rd ring bytes consumed (= wr ring bytes written) */
    uint32_t read_signal;   /* rd's producer was waiting for room and now has it */
    uint32_t write_signal;  /* wr's consumer should be signalled */
};
int vmb_ring_forward(struct vmb_ring *rd, struct vmb_ring *wr, uint32_t max_pkts,
                     uint32_t flags, struct vmb_fwd_result *res);

/* cffi:end */

/* ------------------------------------------------------------- C only (ring.c) */

#define VMB_PKT_DESC_SIZE      16u
#define VMB_PKT_TRAILER_SIZE   8u
#define VMB_PKT_TYPE_XFER_PAGES 7u
#define VMB_PKT_TYPE_GPA_DIRECT 9u
#define VMB_PKT_TYPE_COMP      0xbu
#define VMB_PKT_FLAG_COMPLETION_REQUESTED 1u

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

#endif
