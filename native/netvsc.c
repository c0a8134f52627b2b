/* netvsc per-packet work; contracts in netvsc.h, twins in devices/netvsc/fastpath.py.
 * Each check below names the reference line it mirrors (rndis.py / offload.py), so a
 * change there is a change here. All input is a private copy (see netvsc.h). */
#include <string.h>
#include "netvsc.h"

#define RNDIS_MSG_PACKET 1u
#define RNDIS_HDR 8u
#define RNDIS_PACKET_BODY 36u
#define PPI_HDR 12u
#define ETH_HLEN 14u
#define ETH_P_IP 0x0800u
#define ETH_P_IPV6 0x86DDu
#define ETH_P_8021Q 0x8100u
#define IPPROTO_TCP 6u
#define IPPROTO_UDP 17u
#define TXCSUM_IPV4 0x1u
#define TXCSUM_IPV6 0x2u
#define TXCSUM_TCP 0x4u
#define TXCSUM_UDP 0x8u
#define TXCSUM_IP_HEADER 0x10u
#define RXCSUM_TCP_FAILED 0x001u
#define RXCSUM_UDP_FAILED 0x002u
#define RXCSUM_IP_FAILED 0x004u
#define RXCSUM_TCP_SUCCEEDED 0x008u
#define RXCSUM_UDP_SUCCEEDED 0x010u
#define RXCSUM_IP_SUCCEEDED 0x020u
#define PPI_TCPIP_CHKSUM 0u
#define PPI_TCP_LARGESEND 2u
#define PPI_IEEE_8021Q 6u
#define PPI_HASH_VALUE 8u
#define PPI_HASH_INFO 9u
#define VLAN_ID_MAX 4094u
#define HASH_IPV4 0x100u
#define HASH_TCP_IPV4 0x200u
#define HASH_IPV6 0x400u
#define HASH_TCP_IPV6 0x1000u
#define HASH_FUNC_TOEPLITZ 0x1u

static inline uint32_t le32(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return v; /* x86-64 and aarch64 Linux: little endian, as the wire */
}

static inline void put_le32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static inline uint32_t be16(const uint8_t *p) { return ((uint32_t)p[0] << 8) | p[1]; }
static inline uint32_t be32(const uint8_t *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}
static inline void put_be16(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}
static inline void put_be32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

/* --- transmit: RNDIS PACKET checks (rndis.parse_packet and its helpers) -------------- */

/* _tx_checksum: 0 is "none"; else the request must be coherent. */
static int check_csum(uint32_t v, uint32_t frame_len)
{
    if (v == 0)
        return 0;
    int ipv4 = !!(v & TXCSUM_IPV4), ipv6 = !!(v & TXCSUM_IPV6);
    int tcp = !!(v & TXCSUM_TCP), udp = !!(v & TXCSUM_UDP);
    uint32_t l4 = (v >> 16) & 0x3FF;
    if (ipv4 == ipv6 || (tcp && udp))
        return -1;
    if ((tcp || udp) && !(ETH_HLEN <= l4 && l4 < frame_len))
        return -1;
    return 0;
}

/* _lso: v2 only, mss != 0, the TCP offset inside the frame. */
static int check_lso(uint32_t v, uint32_t frame_len)
{
    uint32_t mss = v & 0xFFFFF, tcp_off = (v >> 20) & 0x3FF;
    if (((v >> 30) & 1) != 1)
        return -1;
    if (mss == 0 || !(ETH_HLEN <= tcp_off && tcp_off < frame_len))
        return -1;
    return 0;
}

static int parse_packet(const uint8_t *m, uint32_t msg_len, uint32_t base, uint32_t max_frame,
                        struct vmb_nv_tx_pkt *out)
{
    if (msg_len < VMB_NV_PKT_HDR || le32(m) != RNDIS_MSG_PACKET || le32(m + 4) != msg_len)
        return -1;
    uint32_t d_off = le32(m + 8), d_len = le32(m + 12), oob_off = le32(m + 16);
    uint32_t oob_len = le32(m + 20), oob_n = le32(m + 24), p_off = le32(m + 28);
    uint32_t p_len = le32(m + 32), vc = le32(m + 36);
    uint32_t body = msg_len - RNDIS_HDR;
    if (oob_off || oob_len || oob_n || vc)
        return -1;
    if (d_len == 0 || d_off < RNDIS_PACKET_BODY || d_off > body || d_len > body - d_off)
        return -1;
    memset(out, 0, sizeof *out);
    int has_lso = 0;
    if (p_len || p_off) {
        if (p_off < RNDIS_PACKET_BODY || p_off % 4 || p_off > body || p_len > body - p_off)
            return -1;
        if (p_off < d_off + d_len && d_off < p_off + p_len) /* no overflow: both <= body */
            return -1;
        const uint8_t *area = m + RNDIS_HDR + p_off;
        uint32_t seen[VMB_NV_MAX_PPI];
        uint32_t count = 0, pos = 0;
        while (pos < p_len) { /* pos grows by size >= 12 each time: no loop, no overlap */
            if (p_len - pos < PPI_HDR)
                return -1;
            uint32_t size = le32(area + pos), type = le32(area + pos + 4);
            uint32_t off = le32(area + pos + 8);
            if (size < PPI_HDR || size % 4 || size > p_len - pos)
                return -1;
            if (!(PPI_HDR <= off && off <= size))
                return -1;
            if (count >= VMB_NV_MAX_PPI)
                return -1;
            for (uint32_t i = 0; i < count; i++)
                if (seen[i] == type)
                    return -1;
            seen[count++] = type;
            uint32_t plen = size - off;
            const uint8_t *payload = area + pos + off;
            if (type == PPI_TCPIP_CHKSUM || type == PPI_TCP_LARGESEND || type == PPI_IEEE_8021Q ||
                type == PPI_HASH_VALUE) {
                if (plen < 4)
                    return -1;
                uint32_t v = le32(payload);
                if (type == PPI_TCPIP_CHKSUM) {
                    if (check_csum(v, d_len))
                        return -1;
                    out->csum = v;
                } else if (type == PPI_TCP_LARGESEND) {
                    if (check_lso(v, d_len))
                        return -1;
                    out->lso = v;
                    has_lso = 1;
                } else if (type == PPI_IEEE_8021Q) {
                    if (((v >> 4) & 0xFFF) > VLAN_ID_MAX || v >> 16)
                        return -1;
                    out->vlan = v;
                    out->flags |= VMB_NV_HAS_VLAN;
                } else {
                    out->hash_value = v;
                    out->flags |= VMB_NV_HAS_HASH;
                }
            }
            pos += size;
        }
    }
    if (!has_lso && d_len > max_frame)
        return -1;
    if (has_lso && d_len > VMB_NV_MAX_FRAME_LSO)
        return -1;
    out->data_off = base + RNDIS_HDR + d_off;
    out->data_len = d_len;
    return 0;
}

int vmb_nv_tx_parse(const uint8_t *buf, uint64_t buflen, const uint32_t *index, uint32_t n,
                    uint32_t max_frame, struct vmb_nv_tx_msg *msgs, struct vmb_nv_tx_pkt *pkts)
{
    uint32_t np = 0;
    for (uint32_t i = 0; i < n; i++) {
        uint64_t start = index[2 * i], len = index[2 * i + 1];
        if (start > buflen || len > buflen - start)
            return VMB_NV_E_ARG;
        struct vmb_nv_tx_msg *msg = &msgs[i];
        msg->status = VMB_NV_BAD;
        msg->first = np;
        msg->count = 0;
        msg->_pad = 0;
        /* split_messages */
        if (len > VMB_NV_MAX_XFER)
            continue;
        const uint8_t *b = buf + start;
        uint32_t pos = 0, count = 0, first_type = 0;
        int bad = 0;
        while (len - pos >= RNDIS_HDR) {
            uint32_t type = le32(b + pos), mlen = le32(b + pos + 4);
            if (type == 0 && mlen == 0 && count)
                break;
            if (mlen < RNDIS_HDR || mlen > len - pos) {
                bad = 1;
                break;
            }
            if (count && (type != RNDIS_MSG_PACKET || first_type != RNDIS_MSG_PACKET)) {
                bad = 1;
                break;
            }
            if (count >= VMB_NV_MAX_PKT_PER_MSG) {
                bad = 1;
                break;
            }
            if (!count)
                first_type = type;
            if (type == RNDIS_MSG_PACKET &&
                parse_packet(b + pos, mlen, (uint32_t)start + pos, max_frame, &pkts[np + count])) {
                bad = 1;
                break;
            }
            count++;
            pos += mlen;
        }
        if (bad || count == 0)
            continue;
        if (first_type != RNDIS_MSG_PACKET) {
            msg->status = VMB_NV_SLOW;
            continue;
        }
        msg->status = VMB_NV_OK;
        msg->count = count;
        np += count;
    }
    return (int)np;
}

/* --- checksums (offload.py) ------------------------------------------------------------ */

/* ones_sum: the folded 16-bit ones'-complement sum of big-endian words, odd tail padded. */
static uint32_t ones_sum(const uint8_t *p, uint32_t len, uint64_t start)
{
    uint64_t total = start;
    uint32_t i = 0;
    for (; i + 8 <= len; i += 8)
        total += be16(p + i) + be16(p + i + 2) + be16(p + i + 4) + be16(p + i + 6);
    for (; i + 2 <= len; i += 2)
        total += be16(p + i);
    if (i < len)
        total += (uint32_t)p[i] << 8;
    while (total >> 16)
        total = (total & 0xFFFF) + (total >> 16);
    return (uint32_t)total;
}

/* _ip_at: the IP header's offset and version after Ethernet (and one inline 802.1Q). */
static int ip_at(const uint8_t *f, uint32_t len, uint32_t *ip, int *version)
{
    if (len < ETH_HLEN)
        return -1;
    uint32_t proto = be16(f + 12), off = ETH_HLEN;
    if (proto == ETH_P_8021Q) {
        if (len < off + 4)
            return -1;
        proto = be16(f + 16);
        off += 4;
    }
    *ip = off;
    if (proto == ETH_P_IP)
        *version = 4;
    else if (proto == ETH_P_IPV6)
        *version = 6;
    else
        return -1;
    return 0;
}

static uint32_t pseudo(const uint8_t *f, uint32_t ip, int version, uint32_t proto, uint32_t l4_len)
{
    if (version == 4)
        return ones_sum(f + ip + 12, 8, (uint64_t)proto + (l4_len & 0xFFFF));
    return ones_sum(f + ip + 8, 32, (uint64_t)(l4_len >> 16) + (l4_len & 0xFFFF) + proto);
}

/* _l4_len: from the IP header's length, which must end inside the frame, after l4. */
static int l4_len_of(const uint8_t *f, uint32_t len, uint32_t ip, int version, uint32_t l4,
                     uint32_t *out)
{
    uint64_t end = version == 4 ? (uint64_t)ip + be16(f + ip + 2) : (uint64_t)ip + 40 + be16(f + ip + 4);
    if (end > len || end < l4)
        return -1;
    *out = (uint32_t)(end - l4);
    return 0;
}

static int ipv4_header_checksum(uint8_t *f, uint32_t len, uint32_t ip)
{
    uint32_t ihl = (f[ip] & 0xFu) * 4;
    if (ihl < 20 || ip + ihl > len)
        return -1;
    f[ip + 10] = f[ip + 11] = 0;
    put_be16(f + ip + 10, ~ones_sum(f + ip, ihl, 0) & 0xFFFF);
    return 0;
}

/* fill_checksum with TxChecksum(ipv4, ipv6, tcp, udp, ip_header, l4). */
static int fill(uint8_t *f, uint32_t len, int ipv4, int tcp, int udp, int ip_header, uint32_t l4)
{
    uint32_t ip;
    int version;
    if (ip_at(f, len, &ip, &version))
        return -1;
    if ((version == 4) != ipv4)
        return -1;
    uint32_t iph = version == 4 ? 20 : 40;
    if (len < ip + iph)
        return -1;
    if (ip_header && version == 4 && ipv4_header_checksum(f, len, ip))
        return -1;
    if (!(tcp || udp))
        return 0;
    uint32_t proto = tcp ? IPPROTO_TCP : IPPROTO_UDP, field = tcp ? 16 : 6;
    if (l4 < ip + iph || (uint64_t)l4 + field + 2 > len)
        return -1;
    uint32_t l4len;
    if (l4_len_of(f, len, ip, version, l4, &l4len))
        return -1;
    f[l4 + field] = f[l4 + field + 1] = 0;
    uint32_t value = ~ones_sum(f + l4, l4len, pseudo(f, ip, version, proto, l4len)) & 0xFFFF;
    if (proto == IPPROTO_UDP && value == 0)
        value = 0xFFFF;
    put_be16(f + l4 + field, value);
    return 0;
}

int vmb_nv_csum_fill(uint8_t *frame, uint32_t len, uint32_t csum)
{
    if (csum == 0)
        return 0;
    if (check_csum(csum, len)) /* parse_packet already did; a direct caller gets it too */
        return VMB_NV_E_FRAME;
    int r = fill(frame, len, !!(csum & TXCSUM_IPV4), !!(csum & TXCSUM_TCP), !!(csum & TXCSUM_UDP),
                 !!(csum & TXCSUM_IP_HEADER), (csum >> 16) & 0x3FF);
    return r ? VMB_NV_E_FRAME : 0;
}

int vmb_nv_lso_segment(const uint8_t *frame, uint32_t len, uint32_t lso, uint8_t *out,
                       uint32_t out_cap, uint32_t *lens, uint32_t max_lens, uint32_t *need)
{
    uint32_t ip, l4 = (lso >> 20) & 0x3FF, mss = lso & 0xFFFFF;
    int version;
    *need = 0;
    if (check_lso(lso, len))
        return VMB_NV_E_FRAME;
    if (ip_at(frame, len, &ip, &version))
        return VMB_NV_E_FRAME;
    if ((version == 6) != (int)(lso >> 31))
        return VMB_NV_E_FRAME;
    if (version == 4) {
        if (len < ip + 20 || frame[ip + 9] != IPPROTO_TCP)
            return VMB_NV_E_FRAME;
    } else if (len < ip + 40 || (frame[ip + 6] != IPPROTO_TCP && l4 == ip + 40)) {
        return VMB_NV_E_FRAME;
    }
    if (l4 < ip + (version == 4 ? 20 : 40) || len < l4 + 20)
        return VMB_NV_E_FRAME;
    uint32_t thl = (uint32_t)(frame[l4 + 12] >> 4) * 4;
    if (thl < 20 || len < l4 + thl)
        return VMB_NV_E_FRAME;
    uint32_t head = l4 + thl, payload = len - head;
    if (payload == 0)
        return VMB_NV_E_FRAME;
    uint32_t nseg = (uint32_t)(((uint64_t)payload + mss - 1) / mss);
    if (nseg > VMB_NV_MAX_SEGMENTS)
        return VMB_NV_E_FRAME;
    uint32_t biggest = head + (payload < mss ? payload : mss) - ip - (version == 4 ? 0 : 40);
    if (biggest > 0xFFFF) /* the IP length field */
        return VMB_NV_E_FRAME;
    if (version == 4) { /* ipv4_header_checksum on the first segment: its IHL must fit */
        uint32_t ihl = (frame[ip] & 0xFu) * 4, seg0 = head + (payload < mss ? payload : mss);
        if (ihl < 20 || ip + ihl > seg0)
            return VMB_NV_E_FRAME;
    }
    uint64_t total = (uint64_t)nseg * head + payload;
    if (total > out_cap || nseg > max_lens) {
        *need = total > UINT32_MAX ? UINT32_MAX : (uint32_t)total;
        return VMB_NV_E_SPACE;
    }
    uint32_t seq = be32(frame + l4 + 4), flags = frame[l4 + 13];
    uint32_t ip_id = version == 4 ? be16(frame + ip + 4) : 0;
    uint8_t *seg = out;
    for (uint32_t i = 0; i < nseg; i++) {
        uint32_t chunk = payload - i * mss < mss ? payload - i * mss : mss;
        uint32_t slen = head + chunk;
        memcpy(seg, frame, head);
        memcpy(seg + head, frame + head + (uint64_t)i * mss, chunk);
        put_be32(seg + l4 + 4, seq + i * mss);
        uint32_t f = flags;
        if (i != nseg - 1)
            f &= ~0x09u; /* FIN, PSH on the last segment only */
        if (i)
            f &= ~0x80u; /* CWR on the first only */
        seg[l4 + 13] = (uint8_t)f;
        if (version == 4) {
            put_be16(seg + ip + 2, slen - ip);
            put_be16(seg + ip + 4, (ip_id + i) & 0xFFFF);
            if (ipv4_header_checksum(seg, slen, ip))
                return VMB_NV_E_FRAME;
        } else {
            put_be16(seg + ip + 4, slen - ip - 40);
        }
        if (fill(seg, slen, version == 4, 1, 0, 0, l4))
            return VMB_NV_E_FRAME;
        lens[i] = slen;
        seg += slen;
    }
    return (int)nseg;
}

uint32_t vmb_nv_rx_csum(const uint8_t *f, uint32_t len)
{
    uint32_t ip, proto, l4, bits = 0;
    int version;
    if (ip_at(f, len, &ip, &version))
        return 0;
    if (version == 4) {
        if (len < ip + 20)
            return 0;
        uint32_t ihl = (f[ip] & 0xFu) * 4;
        if (ihl < 20 || len < ip + ihl)
            return 0;
        bits |= ones_sum(f + ip, ihl, 0) == 0xFFFF ? RXCSUM_IP_SUCCEEDED : RXCSUM_IP_FAILED;
        if (be16(f + ip + 6) & 0x3FFF)
            return bits;
        proto = f[ip + 9];
        l4 = ip + ihl;
    } else {
        if (len < ip + 40)
            return 0;
        proto = f[ip + 6];
        l4 = ip + 40;
    }
    if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
        return bits;
    uint32_t l4len;
    if (l4_len_of(f, len, ip, version, l4, &l4len))
        return bits;
    if (l4len < (proto == IPPROTO_TCP ? 20u : 8u))
        return bits;
    if (proto == IPPROTO_UDP && version == 4 && f[l4 + 6] == 0 && f[l4 + 7] == 0)
        return bits;
    int ok = ones_sum(f + l4, l4len, pseudo(f, ip, version, proto, l4len)) == 0xFFFF;
    if (proto == IPPROTO_TCP)
        bits |= ok ? RXCSUM_TCP_SUCCEEDED : RXCSUM_TCP_FAILED;
    else
        bits |= ok ? RXCSUM_UDP_SUCCEEDED : RXCSUM_UDP_FAILED;
    return bits;
}

/* --- receive: filter, vRSS, RNDIS PACKET build -------------------------------------- */

uint32_t vmb_nv_toeplitz(const uint8_t *key, uint32_t key_len, const uint8_t *data, uint32_t len)
{
    if ((uint64_t)key_len * 8 < (uint64_t)len * 8 + 32)
        return 0; /* the twin raises ValueError; callers pass 40-byte keys, <= 36 bytes */
    uint32_t result = 0;
    uint32_t window = be32(key); /* key bits [pos, pos + 32) */
    for (uint32_t i = 0; i < len; i++) {
        uint8_t next = i + 4 < key_len ? key[i + 4] : 0;
        for (int bit = 0; bit < 8; bit++) {
            if (data[i] & (0x80 >> bit))
                result ^= window;
            window = (window << 1) | ((next >> (7 - bit)) & 1);
        }
    }
    return result;
}

/* rss_input: the bytes NDIS hashes (into in[]) and the hash type, 0 for none. */
static uint32_t rss_input(const uint8_t *f, uint32_t len, uint32_t hash_info, uint8_t *in,
                          uint32_t *in_len)
{
    uint32_t off = ETH_HLEN;
    if (len < off)
        return 0;
    uint32_t proto = be16(f + 12);
    if (proto == ETH_P_8021Q && len >= off + 4) {
        proto = be16(f + 16);
        off += 4;
    }
    if (proto == ETH_P_IP && len >= off + 20) {
        uint32_t ihl = (f[off] & 0xFu) * 4, l4 = off + ihl;
        int tcp_ok = f[off + 9] == IPPROTO_TCP && !(be16(f + off + 6) & 0x3FFF) && len >= l4 + 4;
        memcpy(in, f + off + 12, 8);
        if (ihl >= 20 && tcp_ok && (hash_info & HASH_TCP_IPV4)) {
            memcpy(in + 8, f + l4, 4);
            *in_len = 12;
            return HASH_TCP_IPV4;
        }
        if (hash_info & HASH_IPV4) {
            *in_len = 8;
            return HASH_IPV4;
        }
        return 0;
    }
    if (proto == ETH_P_IPV6 && len >= off + 40) {
        uint32_t l4 = off + 40;
        memcpy(in, f + off + 8, 32);
        if (f[off + 6] == IPPROTO_TCP && len >= l4 + 4 && (hash_info & HASH_TCP_IPV6)) {
            memcpy(in + 32, f + l4, 4);
            *in_len = 36;
            return HASH_TCP_IPV6;
        }
        if (hash_info & HASH_IPV6) {
            *in_len = 32;
            return HASH_IPV6;
        }
    }
    return 0;
}

static int passes(const uint8_t *f, uint32_t len, uint32_t filter, const uint8_t *mac,
                  const uint8_t *mcast, uint32_t nmcast)
{
    static const uint8_t bcast[6] = {0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF};
    if (filter & VMB_NV_F_PROMISCUOUS)
        return 1;
    if (len < 6)
        return 0;
    if (!memcmp(f, bcast, 6))
        return !!(filter & VMB_NV_F_BROADCAST);
    if (f[0] & 1) {
        if (filter & VMB_NV_F_ALL_MULTICAST)
            return 1;
        if (filter & VMB_NV_F_MULTICAST)
            for (uint32_t i = 0; i < nmcast; i++)
                if (!memcmp(f, mcast + 6 * i, 6))
                    return 1;
        return 0;
    }
    return (filter & VMB_NV_F_DIRECTED) && !memcmp(f, mac, 6);
}

int vmb_nv_rx_classify(const uint8_t *buf, uint64_t buflen, struct vmb_nv_rx_frame *frames,
                       uint32_t n, uint32_t filter, const uint8_t *mac, const uint8_t *mcast,
                       uint32_t nmcast, uint32_t rss_hash_info, const uint8_t *key,
                       const uint32_t *table, uint32_t ntable)
{
    int accepted = 0;
    for (uint32_t i = 0; i < n; i++) {
        struct vmb_nv_rx_frame *fr = &frames[i];
        if (fr->data_off > buflen || fr->data_len > buflen - fr->data_off)
            return VMB_NV_E_ARG;
        const uint8_t *f = buf + fr->data_off;
        fr->accept = passes(f, fr->data_len, filter, mac, mcast, nmcast);
        fr->queue = 0;
        if (!fr->accept)
            continue;
        accepted++;
        if (!rss_hash_info)
            continue;
        uint8_t in[36];
        uint32_t in_len = 0;
        uint32_t type = rss_input(f, fr->data_len, rss_hash_info, in, &in_len);
        if (!type)
            continue;
        fr->hash_value = vmb_nv_toeplitz(key, 40, in, in_len);
        fr->hash_info = HASH_FUNC_TOEPLITZ | type;
        fr->flags |= VMB_NV_HAS_HASH;
        fr->queue = ntable ? table[fr->hash_value % ntable] : 0;
    }
    return accepted;
}

static uint8_t *put_ppi(uint8_t *p, uint32_t type, uint32_t value)
{
    put_le32(p, VMB_NV_PPI_SIZE);
    put_le32(p + 4, type);
    put_le32(p + 8, PPI_HDR);
    put_le32(p + 12, value);
    return p + VMB_NV_PPI_SIZE;
}

int vmb_nv_rx_build(uint8_t *rbuf, uint64_t rbuf_len, const uint8_t *buf, uint64_t buflen,
                    const struct vmb_nv_rx_frame *frames, uint32_t n, const uint32_t *offsets,
                    uint32_t max_len, uint32_t *msg_lens)
{
    int written = 0;
    for (uint32_t i = 0; i < n; i++) {
        const struct vmb_nv_rx_frame *fr = &frames[i];
        if (fr->data_off > buflen || fr->data_len > buflen - fr->data_off)
            return VMB_NV_E_ARG;
        if (offsets[i] > rbuf_len || max_len > rbuf_len - offsets[i])
            return VMB_NV_E_ARG;
        const uint8_t *f = buf + fr->data_off;
        uint32_t csum = vmb_nv_rx_csum(f, fr->data_len);
        uint32_t nppi = !!csum + !!(fr->flags & VMB_NV_HAS_VLAN);
        if (fr->flags & VMB_NV_HAS_HASH)
            nppi += 1 + !!fr->hash_info;
        uint32_t ppis = nppi * VMB_NV_PPI_SIZE;
        uint64_t msg_len = (uint64_t)VMB_NV_PKT_HDR + ppis + fr->data_len;
        if (msg_len > max_len) {
            msg_lens[i] = 0;
            continue;
        }
        uint8_t *m = rbuf + offsets[i];
        put_le32(m, RNDIS_MSG_PACKET);
        put_le32(m + 4, (uint32_t)msg_len);
        put_le32(m + 8, RNDIS_PACKET_BODY + ppis);
        put_le32(m + 12, fr->data_len);
        memset(m + 16, 0, 12);
        put_le32(m + 28, ppis ? RNDIS_PACKET_BODY : 0);
        put_le32(m + 32, ppis);
        memset(m + 36, 0, 8);
        uint8_t *p = m + VMB_NV_PKT_HDR;
        if (csum)
            p = put_ppi(p, PPI_TCPIP_CHKSUM, csum);
        if (fr->flags & VMB_NV_HAS_VLAN)
            p = put_ppi(p, PPI_IEEE_8021Q, fr->vlan);
        if (fr->flags & VMB_NV_HAS_HASH) {
            p = put_ppi(p, PPI_HASH_VALUE, fr->hash_value);
            if (fr->hash_info)
                p = put_ppi(p, PPI_HASH_INFO, fr->hash_info);
        }
        memcpy(p, f, fr->data_len);
        msg_lens[i] = (uint32_t)msg_len;
        written++;
    }
    return written;
}
