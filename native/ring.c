/* VMBus ring buffer, both ends (spec §3, Linux drivers/hv/ring_buffer.c).
 *
 * The data area and header page live in guest memory and may change under us
 * at any moment. Every guest-written header field is loaded once into a local
 * (vmb_ld32*), validated, then used; every packet is copied into private memory
 * before anyone looks at it. Our own index is kept in `priv` and never read
 * back from the shared page. The pure-Python twin is vmbus/ring.py; keep the
 * two in step (tests compare them byte for byte).
 *
 * Memory barriers come in pairs, one on each side of the ring; each comment names
 * its partner (QEMU style). The producer is the writer, the consumer the reader.
 *
 *  [B1]  producer, publish: packet bytes written, full barrier, write_index store
 *        (release).  Pairs with [B1'], consumer, read / forward / bytes_to_read /
 *        unmask: write_index load (acquire), then the packet bytes are read.
 *  [B2]  consumer, read: packet bytes read, full barrier, read_index store (in
 *        forward, publish's [B1] on the other ring is that barrier).  Pairs with
 *        [B2'], producer, write / write_raw / forward: read_index load, full
 *        barrier, then the space it freed is overwritten.
 *  [B3]  producer, publish: write_index store, full barrier, interrupt_mask and
 *        read_index loads (the signal decision).  Pairs with [B3'], consumer,
 *        unmask: interrupt_mask = 0, full barrier, write_index load. Store then
 *        load on both sides: the producer sees the mask clear and signals, or the
 *        consumer sees the new write_index and drains again; never neither.
 *  [B4]  producer, request_space: pending_send_sz store, full barrier, read_index
 *        load.  Pairs with [B4'], consumer, read / forward: read_index store, full
 *        barrier, pending_send_sz load. Store then load again: the consumer sees
 *        the need and signals, or the producer sees the room; never neither.
 *  [B5]  producer, publish: write_index store, write barrier, pending_send_sz = 0.
 *        Pairs with [B5'], consumer, pending_signal: pending_send_sz load, read
 *        barrier, write_index load.
 *
 * Unpaired, as in Linux: mask's full barrier (the mask is only a hint; late, it
 * costs one spurious signal), pending_signal's full barrier after the feature bits,
 * and publish's read barrier between the interrupt_mask and read_index loads.
 * The pure-Python twin has the same barriers under the same names. */
#include "ring.h"

static inline uint16_t le16(const uint8_t *p)
{
    return (uint16_t)(p[0] | (p[1] << 8));
}

static inline uint64_t le64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

static inline void put_le16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
}

static inline void put_le64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static inline int size_ok(const struct vmb_ring *r)
{
    return r->size >= VMB_RING_MIN_SIZE && r->size <= VMB_RING_MAX_SIZE && !(r->size & 7);
}

/* An index from the shared header: must name an 8-aligned slot inside the data area. */
static inline int check_index(uint32_t v, uint32_t size, int e_range, int e_align)
{
    if (v >= size)
        return e_range;
    if (v & 7)
        return e_align;
    return 0;
}

static inline uint32_t wrap(uint32_t pos, uint32_t size)
{
    return pos >= size ? pos - size : pos;
}

/* Copy len (<= size) bytes out of the data area at pos (< size). With the doubled
 * mapping one memcpy stays inside [data, data + 2*size); otherwise split at the end. */
static void ring_get(const struct vmb_ring *r, uint32_t pos, uint8_t *dst, uint32_t len)
{
    uint32_t first = r->size - pos;

    if (r->doubled || len <= first) {
        memcpy(dst, r->data + pos, len);
        return;
    }
    memcpy(dst, r->data + pos, first);
    memcpy(dst + first, r->data, len - first);
}

/* Copy len (< size) bytes into the data area at pos (< size); src NULL means zeros.
 * Returns the next position, reduced modulo size. */
static uint32_t ring_put(struct vmb_ring *r, uint32_t pos, const uint8_t *src, uint32_t len)
{
    uint32_t first = r->size - pos;

    if (!len)
        return pos;
    if (r->doubled || len <= first) {
        if (src)
            memcpy(r->data + pos, src, len);
        else
            memset(r->data + pos, 0, len);
    } else {
        if (src) {
            memcpy(r->data + pos, src, first);
            memcpy(r->data, src + first, len - first);
        } else {
            memset(r->data + pos, 0, first);
            memset(r->data, 0, len - first);
        }
    }
    return (uint32_t)(((uint64_t)pos + len) % r->size);
}

/* ---------------------------------------------------------------- reader */

int vmb_ring_reader_open(struct vmb_ring *r)
{
    uint32_t ri;
    int rc;

    if (!size_ok(r))
        return VMB_E_BAD_ARG;
    /* Untrusted: the guest zeroed the header before OPENCHANNEL, or did not. */
    ri = vmb_ld32(r->hdr + VMB_RING_OFF_RINDEX);
    rc = check_index(ri, r->size, VMB_E_RINDEX_RANGE, VMB_E_RINDEX_ALIGN);
    if (rc)
        return rc;
    r->priv = ri;
    r->pending = 0;
    return 0;
}

/* Validate a descriptor already copied to private memory against the bytes
 * available. The checks run in a fixed order so both twins report the same code. */
static int check_desc(const struct vmb_ring *r, const struct vmb_desc *d, uint32_t avail)
{
    uint32_t min_off8 = 2;
    uint32_t total;

    if (d->type >= 32 || !(r->allowed_types & (1u << d->type)))
        return VMB_E_BAD_TYPE;
    if (d->flags & ~VMB_PKT_FLAG_COMPLETION_REQUESTED)
        return VMB_E_BAD_FLAGS;
    if (d->type == VMB_PKT_TYPE_XFER_PAGES || d->type == VMB_PKT_TYPE_GPA_DIRECT)
        min_off8 = 3;
    if (d->offset8 < min_off8)
        return VMB_E_OFFSET8_SMALL;
    if (d->len8 < d->offset8)
        return VMB_E_LEN8_LT_OFFSET8;
    total = (uint32_t)d->len8 * 8u + VMB_PKT_TRAILER_SIZE;
    if (total >= r->size)
        return VMB_E_LEN8_GT_RING;
    if (total > avail)
        return VMB_E_LEN8_GT_AVAIL;
    return 0;
}

/* The one read of the descriptor at pos (into raw, private), then its validation. */
static int fetch_desc(const struct vmb_ring *r, uint32_t pos, uint32_t avail,
                      uint8_t raw[VMB_PKT_DESC_SIZE], struct vmb_desc *d)
{
    if (avail < VMB_PKT_DESC_SIZE)
        return VMB_E_AVAIL_PARTIAL;
    ring_get(r, pos, raw, VMB_PKT_DESC_SIZE);
    d->type = le16(raw);
    d->offset8 = le16(raw + 2);
    d->len8 = le16(raw + 4);
    d->flags = le16(raw + 6);
    d->trans_id = le64(raw + 8);
    return check_desc(r, d, avail);
}

/* The releasing consumer's half of pending_send_sz (spec §3.4, Linux
 * hv_pkt_iter_close): wake the producer only on its blocked -> unblocked edge. */
static uint32_t pending_signal(const struct vmb_ring *r, uint32_t consumed)
{
    uint32_t feat, pending, w;
    int64_t free_now;

    feat = vmb_ld32(r->hdr + VMB_RING_OFF_FEATURES);  /* untrusted hint */
    if (!(feat & VMB_RING_FEAT_PENDING_SEND_SZ))
        return 0;  /* the producer polls instead */
    vmb_mb();  /* unpaired, as Linux hv_pkt_iter_close */
    pending = vmb_ld32(r->hdr + VMB_RING_OFF_PENDING);  /* untrusted hint */
    if (!pending)
        return 0;
    /* [B5'] read barrier: pairs with [B5], the producer's write barrier before it
     * lowers pending_send_sz, so write_index is at least as new as the pending value. */
    vmb_rmb();
    w = vmb_ld32(r->hdr + VMB_RING_OFF_WINDEX);  /* untrusted */
    if (check_index(w, r->size, VMB_E_WINDEX_RANGE, VMB_E_WINDEX_ALIGN))
        return 0;  /* corrupt: the next read reports it; no wake-up on garbage */
    free_now = vmb_ring_free(w, r->priv, r->size);
    if (free_now - (int64_t)consumed > (int64_t)pending)
        return 0;  /* it was not blocked before this batch */
    if (free_now <= (int64_t)pending)
        return 0;  /* still not enough room (exactly full counts as not enough) */
    return 1;
}

int vmb_ring_read(struct vmb_ring *r, uint8_t *out, uint32_t out_cap, uint32_t *index,
                  uint32_t max_pkts, uint32_t flags, struct vmb_read_result *res)
{
    uint32_t size = r->size, pos = r->priv;
    uint32_t w, avail, used = 0, consumed = 0, npkts = 0;
    int rc;

    memset(res, 0, sizeof(*res));
    if (flags & ~VMB_READ_PEEK)
        return VMB_E_BAD_ARG;
    /* [B1'] acquire: pairs with [B1], the producer's release store of write_index:
     * the packet bytes we copy below are at least as new as this index. Loaded once. */
    w = vmb_ld32_acquire(r->hdr + VMB_RING_OFF_WINDEX);
    rc = check_index(w, size, VMB_E_WINDEX_RANGE, VMB_E_WINDEX_ALIGN);
    if (rc)
        return rc;
    avail = vmb_ring_avail(w, pos, size);

    while (npkts < max_pkts && avail) {
        uint8_t raw[VMB_PKT_DESC_SIZE];
        struct vmb_desc d;
        uint32_t len;

        rc = fetch_desc(r, pos, avail, raw, &d);
        if (rc)
            break;
        len = (uint32_t)d.len8 * 8u;
        if (len > out_cap - used) {
            if (!npkts)
                rc = VMB_E_OUT_TOO_SMALL;
            break;
        }
        /* The validated descriptor bytes, then the rest of the packet: the guest
         * rewriting the descriptor now cannot change what the caller parses. */
        memcpy(out + used, raw, VMB_PKT_DESC_SIZE);
        ring_get(r, wrap(pos + VMB_PKT_DESC_SIZE, size), out + used + VMB_PKT_DESC_SIZE,
                 len - VMB_PKT_DESC_SIZE);
        index[2 * npkts] = used;
        index[2 * npkts + 1] = len;
        used += len;
        consumed += len + VMB_PKT_TRAILER_SIZE;
        avail -= len + VMB_PKT_TRAILER_SIZE;
        pos = (uint32_t)(((uint64_t)pos + len + VMB_PKT_TRAILER_SIZE) % size);
        npkts++;
    }

    res->npkts = npkts;
    res->out_bytes = used;
    res->consumed = consumed;
    if (!(flags & VMB_READ_PEEK) && consumed) {
        vmb_mb();  /* [B2] every packet read is done before the guest may reuse the space */
        vmb_st32_release(r->hdr + VMB_RING_OFF_RINDEX, pos);
        r->priv = pos;
        vmb_mb();  /* [B4'] read_index is visible before we look at pending_send_sz */
        res->signal = pending_signal(r, consumed);
    }
    return rc;
}

int vmb_ring_consume(struct vmb_ring *r, uint32_t nbytes, uint32_t *signal)
{
    uint32_t size = r->size, pos = r->priv;
    uint32_t w = vmb_ld32_acquire(r->hdr + VMB_RING_OFF_WINDEX);  /* [B1'], untrusted */
    int rc = check_index(w, size, VMB_E_WINDEX_RANGE, VMB_E_WINDEX_ALIGN);

    *signal = 0;
    if (rc)
        return rc;
    if (nbytes % 8 || nbytes > vmb_ring_avail(w, pos, size))
        return VMB_E_BAD_ARG;
    if (!nbytes)
        return 0;
    pos = (uint32_t)(((uint64_t)pos + nbytes) % size);
    vmb_mb();  /* [B2] every packet read is done before the guest may reuse the space */
    vmb_st32_release(r->hdr + VMB_RING_OFF_RINDEX, pos);
    r->priv = pos;
    vmb_mb();  /* [B4'] read_index is visible before we look at pending_send_sz */
    *signal = pending_signal(r, nbytes);
    return 0;
}

int64_t vmb_ring_bytes_to_read(struct vmb_ring *r)
{
    uint32_t w = vmb_ld32_acquire(r->hdr + VMB_RING_OFF_WINDEX);  /* [B1'], untrusted */
    int rc = check_index(w, r->size, VMB_E_WINDEX_RANGE, VMB_E_WINDEX_ALIGN);

    if (rc)
        return rc;
    return vmb_ring_avail(w, r->priv, r->size);
}

void vmb_ring_mask(struct vmb_ring *r)
{
    vmb_st32(r->hdr + VMB_RING_OFF_IMASK, 1);
    vmb_mb();  /* unpaired: the producer sees the mask before we start draining */
}

int vmb_ring_unmask(struct vmb_ring *r)
{
    uint32_t w;

    vmb_st32(r->hdr + VMB_RING_OFF_IMASK, 0);
    /* [B3'] pairs with [B3], the producer's barrier between its write_index store
     * and its interrupt_mask load: either it sees the mask clear and signals, or we
     * see its new write_index here. */
    vmb_mb();
    w = vmb_ld32_acquire(r->hdr + VMB_RING_OFF_WINDEX);  /* [B1'], untrusted */
    if (check_index(w, r->size, VMB_E_WINDEX_RANGE, VMB_E_WINDEX_ALIGN))
        return 1;  /* let the caller's next read report the corruption */
    return w != r->priv;
}

/* ---------------------------------------------------------------- writer */

int vmb_ring_writer_open(struct vmb_ring *r)
{
    uint32_t w, feat;
    int rc;

    if (!size_ok(r))
        return VMB_E_BAD_ARG;
    w = vmb_ld32(r->hdr + VMB_RING_OFF_WINDEX);  /* untrusted: set up by the guest */
    rc = check_index(w, r->size, VMB_E_WINDEX_RANGE, VMB_E_WINDEX_ALIGN);
    if (rc)
        return rc;
    r->priv = w;
    r->pending = 0;
    /* We honour pending_send_sz on this ring (we set it when blocked). */
    feat = vmb_ld32(r->hdr + VMB_RING_OFF_FEATURES);
    vmb_st32(r->hdr + VMB_RING_OFF_FEATURES, feat | VMB_RING_FEAT_PENDING_SEND_SZ);
    return 0;
}

/* Ring bytes of one packet without the trailer, or a VMB_E_* code. */
static int64_t send_len(const struct vmb_ring *r, const struct vmb_send *p,
                        const struct vmb_iov *iov, uint64_t *body_out)
{
    uint64_t body = 0, pkt;

    for (uint32_t k = 0; k < p->iov_cnt; k++) {
        uint64_t l = iov[(uint64_t)p->iov_start + k].len;
        if (l > VMB_RING_MAX_SIZE)
            return VMB_E_PKT_TOO_BIG;
        body += l;
    }
    if (p->ext_len & 7)
        return VMB_E_BAD_ARG;
    if (p->ext_len > body)
        return VMB_E_BAD_ARG;
    pkt = VMB_PKT_DESC_SIZE + ((body + 7) & ~(uint64_t)7);
    if (pkt / 8 > 0xffff || pkt + VMB_PKT_TRAILER_SIZE >= r->size)
        return VMB_E_PKT_TOO_BIG;
    *body_out = body;
    return (int64_t)pkt;
}

/* Publish packets written at [old_w, pos): one write_index store, drop our
 * pending_send_sz, then decide whether the reader needs a signal (spec §3.2). */
static void publish(struct vmb_ring *r, uint32_t old_w, uint32_t pos, struct vmb_write_result *res)
{
    uint32_t imask, ri;

    vmb_mb();  /* [B1] packet bytes are visible before write_index; pairs with [B1'] */
    vmb_st32_release(r->hdr + VMB_RING_OFF_WINDEX, pos);
    r->priv = pos;
    if (r->pending) {
        vmb_wmb();  /* [B5] pairs with [B5'], the consumer's read barrier after pending */
        vmb_st32(r->hdr + VMB_RING_OFF_PENDING, 0);
        r->pending = 0;
    }
    /* [B3] write_index is visible before we read interrupt_mask / read_index; pairs
     * with [B3'] in the consumer's unmask. */
    vmb_mb();
    imask = vmb_ld32(r->hdr + VMB_RING_OFF_IMASK);  /* untrusted hint */
    if (imask)
        return;
    vmb_rmb();  /* unpaired: interrupt_mask before read_index, as Linux hv_signal_on_write */
    ri = vmb_ld32(r->hdr + VMB_RING_OFF_RINDEX);  /* untrusted; compared only */
    /* Signal only on empty -> non-empty: the reader had caught up with old_w. */
    res->signal = ri == old_w;
}

static void put_trailer(struct vmb_ring *r, uint32_t *pos, uint32_t start)
{
    uint8_t tr[VMB_PKT_TRAILER_SIZE];

    put_le64(tr, (uint64_t)start << 32);
    *pos = ring_put(r, *pos, tr, VMB_PKT_TRAILER_SIZE);
}

int vmb_ring_write(struct vmb_ring *r, const struct vmb_send *pkts, uint32_t n,
                   const struct vmb_iov *iov, uint32_t flags, uint64_t trans_id_base,
                   struct vmb_write_result *res)
{
    uint32_t size = r->size, old_w = r->priv, pos = r->priv;
    uint32_t ri, free_b, bytes = 0, i;
    int rc;

    memset(res, 0, sizeof(*res));
    if (flags & ~VMB_WRITE_TRANS_ID_BASE)
        return VMB_E_BAD_ARG;
    /* Validate the whole batch first, so an error writes nothing at all. */
    for (i = 0; i < n; i++) {
        uint64_t body;
        int64_t l = send_len(r, &pkts[i], iov, &body);
        if (l < 0)
            return (int)l;
    }
    ri = vmb_ld32(r->hdr + VMB_RING_OFF_RINDEX);  /* untrusted, read once */
    rc = check_index(ri, size, VMB_E_RINDEX_RANGE, VMB_E_RINDEX_ALIGN);
    if (rc)
        return rc;
    free_b = vmb_ring_free(pos, ri, size);
    vmb_mb();  /* [B2'] read_index is read before we overwrite the space it freed */

    for (i = 0; i < n; i++) {
        const struct vmb_send *p = &pkts[i];
        uint8_t desc[VMB_PKT_DESC_SIZE];
        uint64_t body;
        uint32_t pkt = (uint32_t)send_len(r, p, iov, &body);
        uint32_t start = pos;
        uint64_t tid = (flags & VMB_WRITE_TRANS_ID_BASE) ? trans_id_base + i : p->trans_id;

        if (free_b <= pkt + VMB_PKT_TRAILER_SIZE)
            break;  /* never fill the ring completely (Linux: free must exceed T) */
        put_le16(desc, p->type);
        put_le16(desc + 2, (uint16_t)((VMB_PKT_DESC_SIZE + p->ext_len) / 8));
        put_le16(desc + 4, (uint16_t)(pkt / 8));
        put_le16(desc + 6, p->flags);
        put_le64(desc + 8, tid);
        pos = ring_put(r, pos, desc, VMB_PKT_DESC_SIZE);
        for (uint32_t k = 0; k < p->iov_cnt; k++) {
            const struct vmb_iov *v = &iov[(uint64_t)p->iov_start + k];
            pos = ring_put(r, pos, v->base, (uint32_t)v->len);
        }
        pos = ring_put(r, pos, NULL, (uint32_t)(pkt - VMB_PKT_DESC_SIZE - body));
        put_trailer(r, &pos, start);
        free_b -= pkt + VMB_PKT_TRAILER_SIZE;
        bytes += pkt + VMB_PKT_TRAILER_SIZE;
    }
    res->npkts = i;
    res->bytes = bytes;
    if (i)
        publish(r, old_w, pos, res);
    return 0;
}

int vmb_ring_write_raw(struct vmb_ring *r, const uint8_t *buf, uint64_t buf_len,
                       const uint32_t *index, uint32_t n, uint32_t flags,
                       struct vmb_write_result *res)
{
    uint32_t size = r->size, old_w = r->priv, pos = r->priv;
    uint32_t ri, free_b, bytes = 0, i;
    int rc;

    memset(res, 0, sizeof(*res));
    if (flags & ~VMB_RAW_COMPLETE)
        return VMB_E_BAD_ARG;
    for (i = 0; i < n; i++) {
        uint64_t off = index[2 * i], len = index[2 * i + 1];
        const uint8_t *p;

        if (off + len > buf_len || len < VMB_PKT_DESC_SIZE || (len & 7))
            return VMB_E_BAD_ARG;
        p = buf + off;
        if ((uint64_t)le16(p + 4) * 8 != len || le16(p + 2) < 2 || le16(p + 2) > le16(p + 4))
            return VMB_E_BAD_ARG;
        if (len + VMB_PKT_TRAILER_SIZE >= size)
            return VMB_E_PKT_TOO_BIG;
    }
    ri = vmb_ld32(r->hdr + VMB_RING_OFF_RINDEX);  /* untrusted, read once */
    rc = check_index(ri, size, VMB_E_RINDEX_RANGE, VMB_E_RINDEX_ALIGN);
    if (rc)
        return rc;
    free_b = vmb_ring_free(pos, ri, size);
    vmb_mb();  /* [B2'] as in vmb_ring_write */

    for (i = 0; i < n; i++) {
        uint32_t off = index[2 * i], len = index[2 * i + 1], start = pos;
        uint8_t desc[VMB_PKT_DESC_SIZE];

        if (free_b <= len + VMB_PKT_TRAILER_SIZE)
            break;
        memcpy(desc, buf + off, VMB_PKT_DESC_SIZE);
        if ((flags & VMB_RAW_COMPLETE) && (le16(desc + 6) & VMB_PKT_FLAG_COMPLETION_REQUESTED)) {
            put_le16(desc, VMB_PKT_TYPE_COMP);
            put_le16(desc + 6, 0);
        }
        pos = ring_put(r, pos, desc, VMB_PKT_DESC_SIZE);
        pos = ring_put(r, pos, buf + off + VMB_PKT_DESC_SIZE, len - VMB_PKT_DESC_SIZE);
        put_trailer(r, &pos, start);
        free_b -= len + VMB_PKT_TRAILER_SIZE;
        bytes += len + VMB_PKT_TRAILER_SIZE;
    }
    res->npkts = i;
    res->bytes = bytes;
    if (i)
        publish(r, old_w, pos, res);
    return 0;
}

int64_t vmb_ring_bytes_to_write(struct vmb_ring *r)
{
    uint32_t ri = vmb_ld32(r->hdr + VMB_RING_OFF_RINDEX);  /* untrusted */
    int rc = check_index(ri, r->size, VMB_E_RINDEX_RANGE, VMB_E_RINDEX_ALIGN);

    if (rc)
        return rc;
    return vmb_ring_free(r->priv, ri, r->size);
}

int vmb_ring_request_space(struct vmb_ring *r, uint32_t need)
{
    uint32_t ri;
    int rc;

    if (!need)
        return VMB_E_BAD_ARG;
    if (need >= r->size)
        return VMB_E_PKT_TOO_BIG;  /* even an empty ring has only size bytes free */
    vmb_st32(r->hdr + VMB_RING_OFF_PENDING, need);
    r->pending = need;
    vmb_mb();  /* [B4] pending_send_sz is visible before we re-read read_index; pairs
                * with [B4'] in the consumer's read */
    ri = vmb_ld32(r->hdr + VMB_RING_OFF_RINDEX);  /* untrusted */
    rc = check_index(ri, r->size, VMB_E_RINDEX_RANGE, VMB_E_RINDEX_ALIGN);
    if (rc)
        return rc;
    if (vmb_ring_free(r->priv, ri, r->size) > need) {
        vmb_st32(r->hdr + VMB_RING_OFF_PENDING, 0);
        r->pending = 0;
        return 1;
    }
    return 0;
}

/* ---------------------------------------------------------------- forward */

/* Copy n bytes from ring `src` at spos to ring `dst` at dpos, wrapping either side;
 * returns the next dst position. Both positions are < their ring size, n < both sizes. */
static uint32_t ring_copy(const struct vmb_ring *src, uint32_t spos, struct vmb_ring *dst,
                          uint32_t dpos, uint32_t n)
{
    if (src->doubled && dst->doubled) {
        memcpy(dst->data + dpos, src->data + spos, n);
        return (uint32_t)(((uint64_t)dpos + n) % dst->size);
    }
    while (n) {
        uint32_t s_run = src->doubled ? n : src->size - spos;
        uint32_t d_run = dst->doubled ? n : dst->size - dpos;
        uint32_t k = n < s_run ? n : s_run;

        if (k > d_run)
            k = d_run;
        memcpy(dst->data + dpos, src->data + spos, k);
        spos = wrap(spos + k, src->size);
        dpos = wrap(dpos + k, dst->size);
        n -= k;
    }
    return dpos;
}

int vmb_ring_forward(struct vmb_ring *rd, struct vmb_ring *wr, uint32_t max_pkts,
                     uint32_t flags, struct vmb_fwd_result *res)
{
    uint32_t rpos = rd->priv, wpos = wr->priv, old_w = wr->priv;
    uint32_t w, ri, avail, free_b, consumed = 0, npkts = 0;
    struct vmb_write_result wres;
    int rc;

    memset(res, 0, sizeof(*res));
    if (flags & ~VMB_RAW_COMPLETE)
        return VMB_E_BAD_ARG;
    /* [B1'] acquire: pairs with the guest's [B1] release store; loaded once. */
    w = vmb_ld32_acquire(rd->hdr + VMB_RING_OFF_WINDEX);
    rc = check_index(w, rd->size, VMB_E_WINDEX_RANGE, VMB_E_WINDEX_ALIGN);
    if (rc)
        return rc;
    ri = vmb_ld32(wr->hdr + VMB_RING_OFF_RINDEX);  /* untrusted, read once */
    rc = check_index(ri, wr->size, VMB_E_RINDEX_RANGE, VMB_E_RINDEX_ALIGN);
    if (rc)
        return rc;
    avail = vmb_ring_avail(w, rpos, rd->size);
    free_b = vmb_ring_free(wpos, ri, wr->size);
    vmb_mb();  /* [B2'] wr's read_index is read before we overwrite the space */

    while (npkts < max_pkts && avail) {
        uint8_t raw[VMB_PKT_DESC_SIZE];
        struct vmb_desc d;
        uint32_t len, start = wpos;

        rc = fetch_desc(rd, rpos, avail, raw, &d);
        if (rc)
            break;
        len = (uint32_t)d.len8 * 8u;
        if (len + VMB_PKT_TRAILER_SIZE >= wr->size) {
            rc = VMB_E_PKT_TOO_BIG;  /* could never fit the other ring */
            break;
        }
        if (free_b <= len + VMB_PKT_TRAILER_SIZE)
            break;  /* no room now: the rest stays in rd for the next call */
        if ((flags & VMB_RAW_COMPLETE) && (d.flags & VMB_PKT_FLAG_COMPLETION_REQUESTED)) {
            put_le16(raw, VMB_PKT_TYPE_COMP);
            put_le16(raw + 6, 0);
        }
        /* The validated descriptor copy goes out; the payload is opaque to a forwarder,
         * so it moves ring to ring (a guest rewriting it only changes its own data). */
        wpos = ring_put(wr, wpos, raw, VMB_PKT_DESC_SIZE);
        wpos = ring_copy(rd, wrap(rpos + VMB_PKT_DESC_SIZE, rd->size), wr, wpos,
                         len - VMB_PKT_DESC_SIZE);
        put_trailer(wr, &wpos, start);
        free_b -= len + VMB_PKT_TRAILER_SIZE;
        consumed += len + VMB_PKT_TRAILER_SIZE;
        avail -= len + VMB_PKT_TRAILER_SIZE;
        rpos = (uint32_t)(((uint64_t)rpos + len + VMB_PKT_TRAILER_SIZE) % rd->size);
        npkts++;
    }

    res->npkts = npkts;
    res->consumed = consumed;
    if (npkts) {
        memset(&wres, 0, sizeof(wres));
        /* wr's [B1] is rd's [B2]: the payload reads are done before rd's read_index */
        publish(wr, old_w, wpos, &wres);
        res->write_signal = wres.signal;
        vmb_st32_release(rd->hdr + VMB_RING_OFF_RINDEX, rpos);
        rd->priv = rpos;
        vmb_mb();  /* [B4'] read_index is visible before we look at pending_send_sz */
        res->read_signal = pending_signal(rd, consumed);
    }
    return rc;
}
