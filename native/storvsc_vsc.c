/* The simulated guest's storvsc load generator: submit a batch of prebuilt
 * EXECUTE_SRB packets, parse a batch of completions. Contract in storvsc_vsc.h.
 *
 * This is the guest's side: the templates and the completions copy are the
 * guest's own private memory, and the ring it writes is its outgoing ring. The
 * completions were copied out of the host-written ring by vmb_ring_read, so each
 * field is read once from that private copy. */
#include "storvsc_vsc.h"

#define VSC_PKT_DESC 16u
#define VSC_PKT_TYPE_COMP 0xbu

static inline uint64_t vsc_splitmix64(uint64_t *state)
{
    uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static inline void vsc_st_be64(uint8_t *p, uint64_t v)
{
    v = __builtin_bswap64(v);
    memcpy(p, &v, 8);
}

static inline void vsc_st_be32(uint8_t *p, uint32_t v)
{
    v = __builtin_bswap32(v);
    memcpy(p, &v, 4);
}

static inline uint32_t vsc_ld_le32(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

int vmb_vsc_submit(struct vmb_ring *wr, uint8_t *tmpl, uint64_t tmpl_len, uint32_t pkt_len,
                   uint32_t nslots, uint32_t lba_at, const uint64_t *tids, uint32_t n,
                   struct vmb_vsc_gen *gen, uint64_t now_ns, uint64_t *t0, uint8_t *busy,
                   uint32_t *index, struct vmb_write_result *res)
{
    memset(res, 0, sizeof(*res));
    if ((uint64_t)nslots * pkt_len > tmpl_len || (uint64_t)lba_at + 12 > pkt_len ||
        gen->span == 0)
        return VMB_VSC_E_BAD_ARG;
    for (uint32_t k = 0; k < n; k++) {
        if (tids[k] == 0 || tids[k] > nslots || busy[tids[k] - 1]) {
            while (k--)  /* undo: nothing changes on an error */
                busy[tids[k] - 1] = 0;
            return VMB_VSC_E_TRANS_ID;
        }
        busy[tids[k] - 1] = 1;
    }
    const uint64_t span = gen->span;
    const uint32_t blocks = gen->blocks;
    for (uint32_t k = 0; k < n; k++) {
        const uint64_t tid = tids[k];
        const uint32_t slot = (uint32_t)(tid - 1);
        uint8_t *p = tmpl + (uint64_t)slot * pkt_len;
        uint64_t unit;
        if (gen->random) {
            unit = vsc_splitmix64(&gen->rng) % span;
        } else {
            unit = gen->next % span;
            gen->next++;
        }
        memcpy(p + 8, &tid, 8); /* descriptor trans_id (little-endian host) */
        vsc_st_be64(p + lba_at, unit * blocks);
        vsc_st_be32(p + lba_at + 8, blocks);
        t0[slot] = now_ns;
        index[2 * k] = (uint32_t)((uint64_t)slot * pkt_len);
        index[2 * k + 1] = pkt_len;
    }
    return vmb_ring_write_raw(wr, tmpl, tmpl_len, index, n, 0, res);
}

int vmb_vsc_parse(const uint8_t *buf, uint64_t buflen, const uint32_t *index, uint32_t n,
                  uint32_t nslots, const uint64_t *t0, uint8_t *busy, uint64_t now_ns,
                  uint64_t *trans_id,
                  uint32_t *vstor_status, uint8_t *srb_status, uint8_t *scsi_status,
                  uint32_t *xfer_len, uint64_t *lat_ns, struct vmb_vsc_parse_result *res)
{
    memset(res, 0, sizeof(*res));
    for (uint32_t k = 0; k < n; k++) {
        const uint64_t off = index[2 * k], len = index[2 * k + 1];
        res->n = k;
        if (off + len > buflen || len < VSC_PKT_DESC)
            return VMB_VSC_E_BAD_ARG;
        const uint8_t *p = buf + off;
        uint16_t type, off8;
        uint64_t tid;
        memcpy(&type, p, 2);
        memcpy(&off8, p + 2, 2);
        memcpy(&tid, p + 8, 8);
        if ((uint64_t)off8 * 8 > len || off8 < 2)
            return VMB_VSC_E_BAD_ARG;
        if (type != VSC_PKT_TYPE_COMP)
            return VMB_VSC_E_NOT_COMP;
        const uint8_t *pl = p + (uint64_t)off8 * 8;
        if (len - (uint64_t)off8 * 8 < VMB_VSC_COMP_MIN)
            return VMB_VSC_E_SHORT;
        if (tid == 0 || tid > nslots || !busy[tid - 1])
            return VMB_VSC_E_TRANS_ID;
        busy[tid - 1] = 0;
        const uint32_t op = vsc_ld_le32(pl), status = vsc_ld_le32(pl + 8);
        const uint8_t srb = pl[14];
        const uint32_t xfer = vsc_ld_le32(pl + 24);
        const uint64_t sent = t0[tid - 1];
        trans_id[k] = tid;
        vstor_status[k] = status;
        srb_status[k] = srb;
        scsi_status[k] = pl[15];
        xfer_len[k] = xfer;
        lat_ns[k] = now_ns >= sent ? now_ns - sent : 0;
        if (op != VMB_VSC_COMPLETE_IO || status != 0 || srb != VMB_VSC_SRB_SUCCESS) {
            if (res->nfailed++ == 0)
                res->first_failed = k;
        }
        res->bytes += xfer;
    }
    res->n = n;
    return 0;
}
