/* VMBus ring buffer, both ends. Contract shared with the pure-Python twin in
 * vmbus/ring.py (class PyRingReader / PyRingWriter); tests compare the two.
 *
 * A ring is one header page (4096 bytes, shared, guest-writable) and a data area
 * of `size` bytes. If `doubled` is 1 the data area is mapped twice back to back
 * (data[size..2*size) mirrors data[0..size)), so a packet that wraps is one span;
 * otherwise the code copies in two pieces. The struct itself is private memory:
 * `priv` is our own index (next read offset for a reader, next write offset for
 * a writer). The peer's index is only ever read once per call, then validated.
 *
 * Return codes: 0 = OK, negative = one of VMB_E_*. */

#define VMB_E_WINDEX_RANGE ...     /* write_index >= size */
#define VMB_E_WINDEX_ALIGN ...     /* write_index not 8-aligned */
#define VMB_E_RINDEX_RANGE ...     /* read_index >= size */
#define VMB_E_RINDEX_ALIGN ...     /* read_index not 8-aligned */
#define VMB_E_AVAIL_PARTIAL ...    /* 0 < bytes available < 16 (half a descriptor) */
#define VMB_E_OFFSET8_SMALL ...    /* offset8 < 2, or < 3 for types 7 and 9 */
#define VMB_E_LEN8_LT_OFFSET8 ...  /* len8 < offset8 */
#define VMB_E_LEN8_GT_AVAIL ...    /* len8*8 + 8 (trailer) > bytes available */
#define VMB_E_LEN8_GT_RING ...     /* len8*8 + 8 >= size: could never fit in this ring */
#define VMB_E_BAD_TYPE ...         /* packet type not in the reader's allowed mask */
#define VMB_E_BAD_FLAGS ...        /* flags other than COMPLETION_REQUESTED */
#define VMB_E_OUT_TOO_SMALL ...    /* first packet larger than the caller's out buffer */
#define VMB_E_PKT_TOO_BIG ...      /* writer: packet can never fit in this ring */
#define VMB_E_BAD_ARG ...          /* caller error: bad lengths, misaligned ext_len, ... */

#define VMB_READ_PEEK ...          /* flag: copy out but do not advance or commit */

#define VMB_RAW_COMPLETE ...       /* write_raw flag: packets with COMPLETION_REQUESTED
                                      are written as VM_PKT_COMP with flags 0 */

struct vmb_ring {
    uint8_t *hdr;        /* 4096-byte shared header page */
    uint8_t *data;       /* shared data area (size bytes, or 2*size if doubled) */
    uint32_t size;       /* data size D: multiple of 8, >= 32 */
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
    uint32_t bytes;      /* ring bytes used */
    uint32_t signal;     /* 1: the reader should be signalled (was empty, mask clear) */
    uint32_t _pad;
};

/* Reader (consumer). open: take the current read_index as priv after validating it. */
int vmb_ring_reader_open(struct vmb_ring *r);
/* Copy up to max_pkts whole packets (descriptor included, len8*8 bytes each) into out,
 * each at an 8-aligned offset; index[2i] = offset in out, index[2i+1] = length.
 * One write_index load (acquire), one read_index store (release) for the batch, then
 * the pending_send_sz decision. On a validation error the packets before the bad one
 * are still returned and consumed; the return value is the error. */
int vmb_ring_read(struct vmb_ring *r, uint8_t *out, uint32_t out_cap, uint32_t *index,
                  uint32_t max_pkts, uint32_t flags, struct vmb_read_result *res);
/* Bytes available to read (validated); negative VMB_E_* on a corrupt write_index. */
int64_t vmb_ring_bytes_to_read(struct vmb_ring *r);
void vmb_ring_mask(struct vmb_ring *r);                  /* interrupt_mask = 1, full barrier */
/* interrupt_mask = 0, full barrier, re-check: 1 if data arrived (or the index is corrupt,
 * so the caller's next read reports it), 0 if the ring is empty. */
int vmb_ring_unmask(struct vmb_ring *r);

/* Writer (producer). open: take the current write_index as priv after validating it,
 * and set feature_bits bit 0 (we honour pending_send_sz). */
int vmb_ring_writer_open(struct vmb_ring *r);
/* Write a prefix of pkts[0..n) that fits (Linux rule: free > len + 8), one write_index
 * store, clear our pending_send_sz if we had set it, then the signal decision
 * (interrupt_mask clear and read_index == write_index before the batch). */
int vmb_ring_write(struct vmb_ring *r, const struct vmb_send *pkts, uint32_t n,
                   const struct vmb_iov *iov, struct vmb_write_result *res);
/* Write preformed packets: buf holds packets as vmb_ring_read returns them (descriptor
 * included), index as vmb_ring_read fills it. Each descriptor is re-validated
 * (offset8/len8 against its length). flags: VMB_RAW_COMPLETE. */
int vmb_ring_write_raw(struct vmb_ring *r, const uint8_t *buf, const uint32_t *index,
                       uint32_t n, uint32_t flags, struct vmb_write_result *res);
/* Free bytes as Linux counts them (raw free space); negative VMB_E_* on a corrupt read_index. */
int64_t vmb_ring_bytes_to_write(struct vmb_ring *r);
/* Blocked writer: pending_send_sz = need, full barrier, re-read read_index.
 * Returns 1 if `need` bytes now fit (pending cleared again), 0 if the caller must wait
 * for a signal, negative VMB_E_* on a corrupt read_index. */
int vmb_ring_request_space(struct vmb_ring *r, uint32_t need);
