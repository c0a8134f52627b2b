/* storvsc's per-request fast path: the READ/WRITE SRBs of a received batch
 * decoded, executed (memcpy for a memory disk; preadv2/pwritev2 RWF_NOWAIT for a
 * file) and completed in one call each. Contract shared with the pure-Python twin
 * in devices/storvsc/fastpath.py; tests compare the two byte for byte. The code is
 * native/storvsc.c.
 *
 * Only the hot case is decided here; everything else is VMB_SRB_SLOW and goes to
 * the general Python path (VstorProtocol.receive + ScsiController.execute), which
 * then answers it exactly as it always did: an INQUIRY, a bad packet size, a
 * read-only disk, an LBA out of range are all SLOW, never answered here.
 *
 * vmb_srb_decode: packet i of what ring read() put in buf/index (n packets), with
 * gpa[i] and segs what vmb_gpa_direct_batch made of the same batch, is FAST when
 * all of these hold (else SLOW with the first failing reason below):
 *   type 9 (GPA direct), flags == COMPLETION_REQUESTED, gpa status OK,
 *   payload (len8*8 - offset8*8) == size (64 or 48, the negotiated size),
 *   operation EXECUTE_SRB, ready != 0,
 *   path_id 0, target_id 0, lun < nluns with luns[lun].kind != VMB_LUN_NONE,
 *   1 <= cdb_length <= 16, cdb_length >= the opcode's CDB length,
 *   opcode READ/WRITE 6/10/12/16 whose CONTROL byte has no NACA/LINK and whose
 *   byte 1 has no reserved/protection bits set (READ/WRITE 6: bits 7-5; 10/12/16:
 *   bits 7-5, and bit 0 for 10/12),
 *   data_in == 1 for a READ and 0 for a WRITE,
 *   data_transfer_length == gpa total_bytes == blocks * block_size,
 *   0 < blocks, lba + blocks <= luns[lun].blocks (no overflow),
 *   length <= max_transfer (the controller's) and <= luns[lun].max_transfer,
 *   a WRITE to a LUN without VMB_LUN_READ_ONLY,
 *   the request's segments fit VMB_SRB_MAX_SEGS.
 * A FAST record names the request's segments (segs[first_seg, +seg_count)), the
 * byte offset and length on the disk, the WRITE/FUA flags, and what a completion
 * echoes (trans_id, port, lun, cdb_length, data_in). Returns the FAST count, or
 * VMB_SRB_E_BAD_ARG for an index entry outside buf (ring read() never makes one).
 *
 * vmb_srb_execute: every FAST record's I/O (a record whose LUN, segments or disk
 * range are not what decode checked -> LEFTOVER with err EINVAL, never an access
 * outside a region or a disk). A memory LUN: memcpy between the
 * guest's segments and base[offset, +length) (a WRITE also sets the chunk bits of
 * chunk_map); DONE. A file LUN: one preadv2/pwritev2(fd, ..., RWF_NOWAIT): all
 * bytes moved -> DONE; anything else (EAGAIN, a short transfer, an error, a FUA
 * write, a write to a VMB_LUN_BLOCKING_WRITES LUN, an O_DIRECT misalignment) ->
 * LEFTOVER with reason = errno (0 if none), for the caller's blocking path.
 * With flags VMB_SRB_X_BLOCKING (in a worker thread, on a private copy of the
 * records and segments) the LEFTOVER records instead: each file request as one
 * blocking preadv2/pwritev2 (RWF_DSYNC for a FUA write), short transfers
 * continued, EINTR retried -> DONE; a failure (an errno, end of file, an
 * O_DIRECT misalignment, a memory LUN) stays LEFTOVER with reason = errno, for
 * the general path, which retries it and answers with its sense data.
 * Returns how many records became DONE.
 *
 * vmb_srb_complete: for every record whose kind == want, one completion packet
 * (descriptor type 0xb, flags 0, the request's trans_id; a COMPLETE_IO vstor
 * packet of `size` bytes: SRB SUCCESS, SCSI GOOD, no sense, data_transfer_length
 * = length) into out at 8-aligned offsets, index pairs as ring read() makes them
 * (vmb_ring_write_raw takes them). Returns the number of packets, or
 * VMB_SRB_E_BAD_ARG if out is too small (each packet is 16 + size bytes).
 *
 * Between the cffi:begin and cffi:end lines is what Python sees: build_native.py
 * hands it to cffi (values of #defines come from the compiler). */
#ifndef VMBUSD_STORVSC_H
#define VMBUSD_STORVSC_H
#include <stdint.h>
#include "memory.h"
#include "packet.h"

/* cffi:begin */
#define VMB_SRB_SLOW 0
#define VMB_SRB_FAST 1
#define VMB_SRB_DONE 2
#define VMB_SRB_LEFTOVER 3

/* why a record is SLOW (for tests and counters) */
#define VMB_SRB_R_NONE 0
#define VMB_SRB_R_TYPE 1          /* not GPA direct, or flags != COMPLETION_REQUESTED */
#define VMB_SRB_R_RANGES 2        /* the GPA range list is not OK */
#define VMB_SRB_R_SIZE 3          /* payload size != negotiated size */
#define VMB_SRB_R_OP 4            /* not EXECUTE_SRB, or not ready */
#define VMB_SRB_R_ADDRESS 5       /* path/target not 0, LUN absent or not fast */
#define VMB_SRB_R_CDB 6           /* cdb_length, opcode, CDB bits */
#define VMB_SRB_R_DIRECTION 7     /* data_in does not match the opcode */
#define VMB_SRB_R_LENGTH 8        /* data_transfer_length, GPA bytes, blocks disagree */
#define VMB_SRB_R_RANGE 9         /* blocks 0, past the end, over a transfer limit */
#define VMB_SRB_R_READ_ONLY 10    /* a WRITE to a read-only LUN */
#define VMB_SRB_R_SEGS 11         /* too many segments */

#define VMB_SRB_F_WRITE 1u
#define VMB_SRB_F_FUA 2u

#define VMB_LUN_NONE 0
#define VMB_LUN_MEMORY 1
#define VMB_LUN_FILE 2
#define VMB_LUN_READ_ONLY 1u
#define VMB_LUN_BLOCKING_WRITES 2u /* file: writes never try RWF_NOWAIT (EOPNOTSUPP) */

#define VMB_SRB_MAX_SEGS 1024     /* IOV_MAX */
#define VMB_SRB_X_BLOCKING 1u     /* execute flag: the LEFTOVER records, blocking */
#define VMB_SRB_E_BAD_ARG (-100)

struct vmb_srb_lun {
    uint32_t kind;           /* VMB_LUN_* */
    uint32_t flags;          /* VMB_LUN_READ_ONLY, VMB_LUN_BLOCKING_WRITES */
    uint32_t block_size;     /* bytes, power of two */
    uint32_t direct_align;   /* file opened O_DIRECT: buffer alignment; else 0 */
    uint64_t blocks;         /* capacity in blocks */
    uint64_t max_transfer;   /* bytes per request */
    int64_t fd;              /* file */
    uint8_t *base;           /* memory: the disk's bytes, len bytes */
    uint64_t len;
    uint8_t *chunk_map;      /* memory: bit c set = chunk c written (may be NULL) */
    uint64_t chunk_size;     /* memory: bytes per chunk bit */
};

struct vmb_srb_region {  /* a guest RAM region as mapped here (the segs' region index) */
    uint8_t *base;
    uint64_t len;
};

struct vmb_srb_rec {
    int32_t kind;            /* VMB_SRB_SLOW / FAST / DONE / LEFTOVER */
    uint32_t reason;         /* SLOW: VMB_SRB_R_*; LEFTOVER: errno or 0 */
    uint32_t lun;
    uint32_t flags;          /* VMB_SRB_F_* */
    uint32_t first_seg;
    uint32_t seg_count;
    uint8_t port;
    uint8_t cdb_length;
    uint8_t data_in;
    uint8_t _pad[5];
    uint64_t trans_id;
    uint64_t offset;         /* bytes on the disk */
    uint64_t length;         /* bytes */
};

int vmb_srb_decode(const uint8_t *buf, uint64_t buflen, const uint32_t *index, uint32_t n,
                   const struct vmb_gpa_pkt *gpa, const struct vmb_gpa_range_rec *ranges,
                   uint32_t ready, uint32_t size, uint64_t max_transfer,
                   const struct vmb_srb_lun *luns, uint32_t nluns,
                   struct vmb_srb_rec *recs);

int vmb_srb_execute(struct vmb_srb_rec *recs, uint32_t n,
                    const struct vmb_srb_lun *luns, uint32_t nluns,
                    const struct vmb_iov_seg *segs, uint32_t nsegs,
                    const struct vmb_srb_region *regions, uint32_t nregions, uint32_t flags);

int vmb_srb_complete(const struct vmb_srb_rec *recs, uint32_t n, int32_t want, uint32_t size,
                     uint8_t *out, uint64_t out_cap, uint32_t *index);
/* cffi:end */
#endif
