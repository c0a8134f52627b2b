/* storvsc's per-request fast path (contract: native/storvsc.h; pure-Python twin:
 * devices/storvsc/fastpath.py; tests compare the two byte for byte).
 *
 * decode reads the private copy ring read() made, never guest memory, so each
 * field is read once into a local and checked before use. execute touches guest
 * RAM only through the segments vmb_gpa_direct_batch produced (each already
 * inside its region, checked again here) and a memory disk only inside
 * [0, len); the data itself is opaque (the guest may change it meanwhile). */
#define _GNU_SOURCE
#include <errno.h>
#include <string.h>
#include <sys/uio.h>
#include "vmbusd.h"
#include "ring.h"
#include "memory.h"
#include "packet.h"
#include "storvsc.h"

#ifndef RWF_NOWAIT
#define RWF_NOWAIT 0x00000008
#endif

/* devices/storvsc/fastpath.py unpacks these in bulk. */
_Static_assert(sizeof(struct vmb_srb_rec) == 56, "struct vmb_srb_rec layout");
_Static_assert(sizeof(struct vmb_srb_lun) == 72, "struct vmb_srb_lun layout");

#define VSTOR_HDR 12u
#define VSTOR_OP_COMPLETE_IO 1u
#define VSTOR_OP_EXECUTE_SRB 3u
#define VSTOR_SIZE 64u
#define VSTOR_SIZE_PRE_WIN8 48u
#define SRB_SIZE 0x34u
#define SRB_SIZE_PRE_WIN8 0x24u
#define SRB_STATUS_SUCCESS 1u
#define PKT_COMPLETION_REQUESTED 1u

static inline uint32_t ld32(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) |
           ((uint32_t)p[3] << 24);
}

static inline uint64_t be(const uint8_t *p, unsigned n)
{
    uint64_t v = 0;
    for (unsigned i = 0; i < n; i++)
        v = (v << 8) | p[i];
    return v;
}

/* READ/WRITE opcodes: CDB length, write?, or 0 for anything else. */
static unsigned rw_length(uint8_t op, int *write)
{
    switch (op) {
    case 0x08: *write = 0; return 6;   /* READ(6) */
    case 0x0a: *write = 1; return 6;   /* WRITE(6) */
    case 0x28: *write = 0; return 10;  /* READ(10) */
    case 0x2a: *write = 1; return 10;  /* WRITE(10) */
    case 0xa8: *write = 0; return 12;  /* READ(12) */
    case 0xaa: *write = 1; return 12;  /* WRITE(12) */
    case 0x88: *write = 0; return 16;  /* READ(16) */
    case 0x8a: *write = 1; return 16;  /* WRITE(16) */
    default: return 0;
    }
}

/* One packet: 0 (and the record filled) when FAST, else a VMB_SRB_R_* reason. */
static uint32_t decide(const uint8_t *pkt, uint32_t len, const struct vmb_gpa_pkt *g,
                       const struct vmb_gpa_range_rec *ranges, uint32_t ready, uint32_t size,
                       uint64_t max_transfer, const struct vmb_srb_lun *luns, uint32_t nluns,
                       struct vmb_srb_rec *r)
{
    uint16_t type = (uint16_t)(pkt[0] | (pkt[1] << 8));
    uint32_t off = 8u * (uint32_t)(pkt[2] | (pkt[3] << 8));
    uint16_t flags = (uint16_t)(pkt[6] | (pkt[7] << 8));
    if (type != VMB_PKT_TYPE_GPA_DIRECT || flags != PKT_COMPLETION_REQUESTED)
        return VMB_SRB_R_TYPE;
    if (g->status != VMB_GPA_OK)
        return VMB_SRB_R_RANGES;
    if (off > len || len - off != size || (size != VSTOR_SIZE && size != VSTOR_SIZE_PRE_WIN8))
        return VMB_SRB_R_SIZE;
    const uint8_t *v = pkt + off;
    if (ld32(v) != VSTOR_OP_EXECUTE_SRB || !ready)
        return VMB_SRB_R_OP;
    const uint8_t *s = v + VSTOR_HDR;   /* vmscsi_request */
    uint8_t port = s[4], path = s[5], target = s[6], lun = s[7];
    uint8_t cdb_len = s[8], data_in = s[10];
    uint32_t dtl = ld32(s + 12);
    uint8_t cdb[16];
    memcpy(cdb, s + 16, sizeof cdb);
    if (path != 0 || target != 0 || lun >= nluns || luns[lun].kind == VMB_LUN_NONE)
        return VMB_SRB_R_ADDRESS;
    const struct vmb_srb_lun *L = &luns[lun];
    int write = 0;
    unsigned need = rw_length(cdb[0], &write);
    if (cdb_len < 1 || cdb_len > 16 || need == 0 || cdb_len < need)
        return VMB_SRB_R_CDB;
    if (cdb[need - 1] & 0x05)           /* CONTROL: NACA, LINK */
        return VMB_SRB_R_CDB;
    uint64_t lba, blocks;
    uint32_t fua = 0;
    if (need == 6) {
        if (cdb[1] & 0xe0)
            return VMB_SRB_R_CDB;
        lba = ((uint64_t)(cdb[1] & 0x1f) << 16) | be(cdb + 2, 2);
        blocks = cdb[4] ? cdb[4] : 256;
    } else {
        if ((cdb[1] & 0xe0) || (need != 16 && (cdb[1] & 0x01)))
            return VMB_SRB_R_CDB;
        fua = (cdb[1] & 0x08) ? VMB_SRB_F_FUA : 0;
        if (need == 10) {
            lba = be(cdb + 2, 4);
            blocks = be(cdb + 7, 2);
        } else if (need == 12) {
            lba = be(cdb + 2, 4);
            blocks = be(cdb + 6, 4);
        } else {
            lba = be(cdb + 2, 8);
            blocks = be(cdb + 10, 4);
        }
    }
    if (data_in != (write ? 0 : 1))
        return VMB_SRB_R_DIRECTION;
    if (blocks == 0 || lba > L->blocks || blocks > L->blocks - lba)
        return VMB_SRB_R_RANGE;
    uint64_t bs = L->block_size;
    if (bs == 0 || blocks > UINT32_MAX)
        return VMB_SRB_R_RANGE;
    uint64_t length = blocks * bs;      /* < 2^32 * 2^32: no overflow for bs < 2^32 */
    if (length > max_transfer || length > L->max_transfer)
        return VMB_SRB_R_RANGE;
    if ((uint64_t)dtl != g->total_bytes || (uint64_t)dtl != length)
        return VMB_SRB_R_LENGTH;
    if (write && (L->flags & VMB_LUN_READ_ONLY))
        return VMB_SRB_R_READ_ONLY;
    if (g->range_count == 0)
        return VMB_SRB_R_LENGTH;
    const struct vmb_gpa_range_rec *r0 = &ranges[g->first_range];
    const struct vmb_gpa_range_rec *rl = &ranges[g->first_range + g->range_count - 1];
    uint64_t nseg = (uint64_t)rl->first_seg + rl->seg_count - r0->first_seg;
    if (nseg == 0 || nseg > VMB_SRB_MAX_SEGS)
        return VMB_SRB_R_SEGS;
    r->lun = lun;
    r->flags = (write ? VMB_SRB_F_WRITE : 0) | fua;
    r->first_seg = r0->first_seg;
    r->seg_count = (uint32_t)nseg;
    r->port = port;
    r->cdb_length = cdb_len;
    r->data_in = data_in;
    r->offset = lba * bs;
    r->length = length;
    return VMB_SRB_R_NONE;
}

int vmb_srb_decode(const uint8_t *buf, uint64_t buflen, const uint32_t *index, uint32_t n,
                   const struct vmb_gpa_pkt *gpa, const struct vmb_gpa_range_rec *ranges,
                   uint32_t ready, uint32_t size, uint64_t max_transfer,
                   const struct vmb_srb_lun *luns, uint32_t nluns,
                   struct vmb_srb_rec *recs)
{
    int fast = 0;
    for (uint32_t i = 0; i < n; i++) {
        uint64_t off = index[2 * i], len = index[2 * i + 1];
        if (off > buflen || len > buflen - off || len < VMB_PKT_DESC_SIZE)
            return VMB_SRB_E_BAD_ARG;
        struct vmb_srb_rec *r = &recs[i];
        memset(r, 0, sizeof *r);
        const uint8_t *pkt = buf + off;
        uint64_t tid;
        memcpy(&tid, pkt + 8, 8);
        r->trans_id = tid;
        uint32_t why = decide(pkt, (uint32_t)len, &gpa[i], ranges, ready, size, max_transfer,
                              luns, nluns, r);
        if (why != VMB_SRB_R_NONE) {
            uint64_t keep = r->trans_id;
            memset(r, 0, sizeof *r);
            r->trans_id = keep;
            r->kind = VMB_SRB_SLOW;
            r->reason = why;
            continue;
        }
        r->kind = VMB_SRB_FAST;
        fast++;
    }
    return fast;
}

/* The guest RAM segments of a record as iovecs; -1 if one is not inside its region. */
static int seg_iov(const struct vmb_srb_rec *r, const struct vmb_iov_seg *segs, uint32_t nsegs,
                   const struct vmb_srb_region *regions, uint32_t nregions, struct iovec *iov,
                   uint64_t *total)
{
    if (r->seg_count == 0 || r->seg_count > VMB_SRB_MAX_SEGS || r->first_seg > nsegs ||
        r->seg_count > nsegs - r->first_seg)
        return -1;
    uint64_t sum = 0;
    for (uint32_t k = 0; k < r->seg_count; k++) {
        const struct vmb_iov_seg *s = &segs[r->first_seg + k];
        if (s->region >= nregions)
            return -1;
        const struct vmb_srb_region *g = &regions[s->region];
        if (s->offset > g->len || s->len > g->len - s->offset || s->len == 0)
            return -1;
        iov[k].iov_base = g->base + s->offset;
        iov[k].iov_len = s->len;
        sum += s->len;
    }
    *total = sum;
    return 0;
}

static void mark_chunks(const struct vmb_srb_lun *L, uint64_t off, uint64_t len)
{
    if (!L->chunk_map || !L->chunk_size)
        return;
    uint64_t first = off / L->chunk_size, last = (off + len - 1) / L->chunk_size;
    for (uint64_t c = first; c <= last; c++)
        L->chunk_map[c >> 3] |= (uint8_t)(1u << (c & 7));
}

/* A blocking transfer of the whole request: short transfers continued, EINTR
 * retried; 0 or -errno. A FUA write is RWF_DSYNC (durable on return). */
static int blocking_rw(int fd, int write, uint32_t fua, struct iovec *iov, uint32_t cnt,
                       uint64_t off, uint64_t len)
{
    uint64_t done = 0;
    while (done < len) {
        ssize_t got = write ? pwritev2(fd, iov, (int)cnt, (off_t)(off + done), fua ? RWF_DSYNC : 0)
                            : preadv2(fd, iov, (int)cnt, (off_t)(off + done), 0);
        if (got < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (got == 0)
            return -EIO;                /* end of file, or a write that made no progress */
        done += (uint64_t)got;
        uint64_t skip = (uint64_t)got;  /* advance the iovecs past what moved */
        while (cnt && skip >= iov->iov_len) {
            skip -= iov->iov_len;
            iov++;
            cnt--;
        }
        if (cnt) {
            iov->iov_base = (uint8_t *)iov->iov_base + skip;
            iov->iov_len -= skip;
        }
    }
    return 0;
}

int vmb_srb_execute(struct vmb_srb_rec *recs, uint32_t n,
                    const struct vmb_srb_lun *luns, uint32_t nluns,
                    const struct vmb_iov_seg *segs, uint32_t nsegs,
                    const struct vmb_srb_region *regions, uint32_t nregions, uint32_t flags)
{
    struct iovec iov[VMB_SRB_MAX_SEGS];
    int done = 0;
    int blocking = (flags & VMB_SRB_X_BLOCKING) != 0;
    for (uint32_t i = 0; i < n; i++) {
        struct vmb_srb_rec *r = &recs[i];
        if (r->kind != (blocking ? VMB_SRB_LEFTOVER : VMB_SRB_FAST))
            continue;
        uint64_t total = 0;
        const struct vmb_srb_lun *L = r->lun < nluns ? &luns[r->lun] : NULL;
        int write = (r->flags & VMB_SRB_F_WRITE) != 0;
        if (!L || L->kind == VMB_LUN_NONE ||
            seg_iov(r, segs, nsegs, regions, nregions, iov, &total) < 0 || total != r->length) {
            r->kind = VMB_SRB_LEFTOVER;
            r->reason = EINVAL;
            continue;
        }
        if (blocking) {
            /* A file LUN's leftover, in a worker thread: O_DIRECT alignment is
             * checked as below; everything else fails to the general path. */
            int bad = L->kind != VMB_LUN_FILE;
            if (!bad && L->direct_align) {
                uint64_t a = L->direct_align;
                bad = (r->offset % a) != 0;
                for (uint32_t k = 0; k < r->seg_count && !bad; k++)
                    bad = ((uintptr_t)iov[k].iov_base % a) || (iov[k].iov_len % a);
            }
            int rc = bad ? -EINVAL
                         : blocking_rw((int)L->fd, write, r->flags & VMB_SRB_F_FUA, iov,
                                       r->seg_count, r->offset, r->length);
            if (rc == 0) {
                r->kind = VMB_SRB_DONE;
                done++;
            } else {
                r->reason = (uint32_t)-rc;
            }
            continue;
        }
        if (L->kind == VMB_LUN_MEMORY) {
            if (r->offset > L->len || r->length > L->len - r->offset) {
                r->kind = VMB_SRB_LEFTOVER;
                r->reason = EINVAL;
                continue;
            }
            uint8_t *disk = L->base + r->offset;
            for (uint32_t k = 0; k < r->seg_count; k++) {
                if (write)
                    memcpy(disk, iov[k].iov_base, iov[k].iov_len);
                else
                    memcpy(iov[k].iov_base, disk, iov[k].iov_len);
                disk += iov[k].iov_len;
            }
            if (write)
                mark_chunks(L, r->offset, r->length);
            r->kind = VMB_SRB_DONE;
            done++;
            continue;
        }
        /* A file. FUA and O_DIRECT misalignment take the blocking path. */
        if (write && ((r->flags & VMB_SRB_F_FUA) || (L->flags & VMB_LUN_BLOCKING_WRITES))) {
            r->kind = VMB_SRB_LEFTOVER;
            r->reason = 0;
            continue;
        }
        if (L->direct_align) {
            uint64_t a = L->direct_align;
            int bad = (r->offset % a) != 0;
            for (uint32_t k = 0; k < r->seg_count && !bad; k++)
                bad = ((uintptr_t)iov[k].iov_base % a) || (iov[k].iov_len % a);
            if (bad) {
                r->kind = VMB_SRB_LEFTOVER;
                r->reason = 0;
                continue;
            }
        }
        ssize_t got = write ? pwritev2((int)L->fd, iov, (int)r->seg_count, (off_t)r->offset,
                                       RWF_NOWAIT)
                            : preadv2((int)L->fd, iov, (int)r->seg_count, (off_t)r->offset,
                                      RWF_NOWAIT);
        if (got >= 0 && (uint64_t)got == r->length) {
            r->kind = VMB_SRB_DONE;
            done++;
        } else {
            r->kind = VMB_SRB_LEFTOVER;
            r->reason = got < 0 ? (uint32_t)errno : 0;
        }
    }
    return done;
}

int vmb_srb_complete(const struct vmb_srb_rec *recs, uint32_t n, int32_t want, uint32_t size,
                     uint8_t *out, uint64_t out_cap, uint32_t *index)
{
    if (size != VSTOR_SIZE && size != VSTOR_SIZE_PRE_WIN8)
        return VMB_SRB_E_BAD_ARG;
    uint32_t plen = VMB_PKT_DESC_SIZE + size;   /* a multiple of 8 */
    uint64_t pos = 0;
    int k = 0;
    for (uint32_t i = 0; i < n; i++) {
        const struct vmb_srb_rec *r = &recs[i];
        if (r->kind != want)
            continue;
        if (out_cap < plen || pos > out_cap - plen)
            return VMB_SRB_E_BAD_ARG;
        uint8_t *p = out + pos;
        memset(p, 0, plen);
        struct vmb_desc d = {VMB_PKT_TYPE_COMP, 2, (uint16_t)(plen / 8), 0, r->trans_id};
        memcpy(p, &d, sizeof d);
        uint8_t *v = p + VMB_PKT_DESC_SIZE;
        v[0] = VSTOR_OP_COMPLETE_IO;                 /* operation; flags, status 0 */
        uint8_t *s = v + VSTOR_HDR;
        uint16_t srb_len = size == VSTOR_SIZE ? SRB_SIZE : SRB_SIZE_PRE_WIN8;
        s[0] = (uint8_t)srb_len;
        s[1] = (uint8_t)(srb_len >> 8);
        s[2] = SRB_STATUS_SUCCESS;
        s[3] = 0;                                    /* SCSI GOOD */
        s[4] = r->port;                              /* path, target 0 */
        s[7] = (uint8_t)r->lun;
        s[8] = r->cdb_length;
        s[9] = 0;                                    /* no sense */
        s[10] = r->data_in;
        uint32_t dtl = (uint32_t)r->length;
        memcpy(s + 12, &dtl, 4);
        index[2 * k] = (uint32_t)pos;
        index[2 * k + 1] = plen;
        pos += plen;
        k++;
    }
    return k;
}
