/* The simulated guest's storvsc load generator, per request in C: the contract,
 * shared with the pure-Python twin in devices/storvsc/vsc.py (PySrbSlots); tests
 * compare the two byte for byte (tests/test_storvsc_vsc_fastpath.py). The code is
 * native/storvsc_vsc.c.
 *
 * Why: `vmbusd bench disk` measures the host (the storvsc VSP and its backends).
 * The guest that drives it must cost far less per request than the host, so its
 * per-request work (pick an LBA, patch the request, write it to the ring; read a
 * completion's status, match it to its slot) is one C call per batch each way.
 *
 * Slots: `nslots` preformed GPA-direct EXECUTE_SRB packets (descriptor included,
 * as vmb_ring_read returns packets and vmb_ring_write_raw takes them), each
 * `pkt_len` bytes, back to back in `tmpl`. Slot s is trans id s + 1. The CDB is a
 * READ(16)/WRITE(16): its big-endian LBA at byte `lba_at` of a packet, its block
 * count (u32, big-endian) right after it.
 *
 * Between the cffi:begin and cffi:end lines is what Python sees: build_native.py
 * hands it to cffi (values of #defines come from the compiler). */
#ifndef VMBUSD_STORVSC_VSC_H
#define VMBUSD_STORVSC_VSC_H
#include "vmbusd.h"
#include "ring.h"
/* cffi:begin */
#define VMB_VSC_E_BAD_ARG (-100)      /* caller error: slots outside tmpl, lba_at, span 0, ... */
#define VMB_VSC_E_TRANS_ID (-101)     /* submit: a trans id not in 1..nslots or of a slot
                                       * in flight; parse: a completion for no slot in
                                       * flight (a host completing a request twice) */
#define VMB_VSC_E_NOT_COMP (-102)     /* parse: a packet that is not VM_PKT_COMP */
#define VMB_VSC_E_SHORT (-103)        /* parse: payload shorter than VMB_VSC_COMP_MIN */
#define VMB_VSC_COMP_MIN 28u          /* vstor header (12) + vmscsi_request up to and
                                       * including data_transfer_length (16) */
#define VMB_VSC_SRB_SUCCESS 1u        /* SRB_STATUS_SUCCESS */
#define VMB_VSC_COMPLETE_IO 1u        /* VSTOR_OPERATION_COMPLETE_IO */

/* The LBA sequence: unit k of the disk (request-sized, `blocks` blocks each) is
 * LBA k * blocks. Random: unit = splitmix64(&rng) % span; sequential: unit = next %
 * span, then next + 1. Both fields are advanced in place, one unit per request. */
struct vmb_vsc_gen {
    uint64_t rng;        /* splitmix64 state */
    uint64_t next;       /* next sequential unit */
    uint64_t span;       /* units on the disk, > 0 */
    uint32_t blocks;     /* blocks per request (the CDB's transfer length) */
    uint32_t random;     /* 1 random, 0 sequential */
};

struct vmb_vsc_parse_result {
    uint32_t n;          /* completions parsed (all of them unless an error is returned:
                          * then the index of the bad packet) */
    uint32_t nfailed;    /* of those: operation != COMPLETE_IO, vstor status != 0 or
                          * srb_status != SRB_STATUS_SUCCESS */
    uint32_t first_failed; /* index of the first failed one (0 if none) */
    uint32_t _pad;
    uint64_t bytes;      /* sum of the completions' data_transfer_length */
};

/* Submit: for k in 0..n, slot s = tids[k] - 1 gets the next LBA of gen, the block
 * count gen->blocks, trans id tids[k] in its descriptor, t0[s] = now_ns and
 * busy[s] = 1 (in flight: set here, cleared by the parse of its completion); then
 * the n packets are written with vmb_ring_write_raw (flags 0) in that order, as
 * many as fit (res->npkts; the rest stay patched: write them later from
 * index[2 * npkts ..], which holds (offset in tmpl, pkt_len) per packet). Checked
 * first, nothing patched or written on error: nslots * pkt_len <= tmpl_len,
 * lba_at + 12 <= pkt_len, gen->span > 0 (BAD_ARG); every tids[k] in 1..nslots
 * and its slot not busy, nor twice in tids (TRANS_ID). Otherwise returns what
 * vmb_ring_write_raw returns (busy stays set for every packet patched). */
int vmb_vsc_submit(struct vmb_ring *wr, uint8_t *tmpl, uint64_t tmpl_len, uint32_t pkt_len,
                   uint32_t nslots, uint32_t lba_at, const uint64_t *tids, uint32_t n,
                   struct vmb_vsc_gen *gen, uint64_t now_ns, uint64_t *t0, uint8_t *busy,
                   uint32_t *index, struct vmb_write_result *res);

/* Parse n completions as vmb_ring_read left them (buf, index pairs of offset and
 * length; each entry inside buf, >= 16 bytes, offset8 * 8 <= length, else BAD_ARG).
 * Per packet k, in order: type VM_PKT_COMP (NOT_COMP), payload >= VMB_VSC_COMP_MIN
 * bytes (SHORT), trans id in 1..nslots with its slot busy (TRANS_ID); then busy
 * is cleared and trans_id[k],
 * vstor_status[k] (u32 at payload 8), srb_status[k] (u8 at 14), scsi_status[k]
 * (u8 at 15), xfer_len[k] (u32 at 24, data_transfer_length) and lat_ns[k] = now_ns -
 * t0[trans id - 1] (0 if t0[...] > now_ns). On an error res->n is the bad packet's
 * index and the arrays hold the packets before it. Returns 0 or VMB_VSC_E_*. */
int vmb_vsc_parse(const uint8_t *buf, uint64_t buflen, const uint32_t *index, uint32_t n,
                  uint32_t nslots, const uint64_t *t0, uint8_t *busy, uint64_t now_ns,
                  uint64_t *trans_id,
                  uint32_t *vstor_status, uint8_t *srb_status, uint8_t *scsi_status,
                  uint32_t *xfer_len, uint64_t *lat_ns, struct vmb_vsc_parse_result *res);
/* cffi:end */
#endif
