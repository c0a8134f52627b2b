/* netvsc per-packet work, one call per batch: the guest's RNDIS PACKETs checked and
 * read (transmit), checksum fill and LSO v2 segmentation for backends without vnet
 * headers, the receive filter and vRSS steering, and the host's RNDIS PACKETs built
 * into receive-buffer sections. The code is native/netvsc.c.
 *
 * Every function has a pure-Python twin with the same contract in
 * devices/netvsc/fastpath.py (VMBUSD_NATIVE=0 selects it); tests/test_netvsc_fastpath.py
 * compares the two on random and hostile input. The twins are the reference parsers
 * of rndis.py and offload.py, so "native OK" always means "Python would accept it
 * with the same result"; anything native does not accept goes to the Python slow
 * path, which gives the guest the same answer (and log line) as it always did.
 *
 * All input is our own private copy of guest bytes (the VSP copies a send section or
 * GPA-direct pages once): nothing here reads guest memory twice. Lengths are the
 * guest's word and are bounded against the copy before anything is read through them
 * (the CVE-2021-28476 class).
 *
 * Between the cffi:begin and cffi:end lines is what Python sees: build_native.py
 * hands it to cffi (values of #defines come from the compiler). */
#ifndef VMBUSD_NETVSC_H
#define VMBUSD_NETVSC_H
#include <stdint.h>

/* cffi:begin */
#define VMB_NV_OK 0            /* an NVSP message of data PACKETs, every one valid */
#define VMB_NV_SLOW 1          /* a control message (INITIALIZE, QUERY, ...): Python's */
#define VMB_NV_BAD (-1)        /* anything the reference parser refuses: Python's, too */
#define VMB_NV_E_ARG (-100)    /* caller error: an index entry outside buf, no room */
#define VMB_NV_E_SPACE (-101)  /* vmb_nv_lso_segment: out or lens too small (see *need) */
#define VMB_NV_E_FRAME (-102)  /* offload asked for what the frame cannot carry */

#define VMB_NV_MAX_XFER 262144u       /* one NVSP message's RNDIS bytes (rndis.MAX_XFER_SIZE) */
#define VMB_NV_MAX_PKT_PER_MSG 8u     /* PACKETs in one NVSP message (rndis.MAX_PKT_PER_MSG) */
#define VMB_NV_MAX_PPI 16u            /* PPIs in one PACKET (rndis.MAX_PPI_COUNT) */
#define VMB_NV_MAX_FRAME_LSO 65554u   /* 64 KiB of IP + 14 + 4 (rndis.MAX_FRAME_LSO) */
#define VMB_NV_MAX_SEGMENTS 1024u     /* segments of one LSO send (offload.MAX_SEGMENTS) */
#define VMB_NV_PKT_HDR 44u            /* RNDIS header + struct rndis_packet */
#define VMB_NV_PPI_SIZE 16u           /* one host PPI: 12-byte header + u32 */

#define VMB_NV_HAS_VLAN 0x1u          /* tx/rx: vlan holds an 802.1Q PPI value */
#define VMB_NV_HAS_HASH 0x2u          /* tx/rx: hash_value holds a hash value PPI */

#define VMB_NV_F_DIRECTED 0x1u        /* RNDIS packet filter bits (rndis.h) */
#define VMB_NV_F_MULTICAST 0x2u
#define VMB_NV_F_ALL_MULTICAST 0x4u
#define VMB_NV_F_BROADCAST 0x8u
#define VMB_NV_F_PROMISCUOUS 0x20u

/* One guest RNDIS PACKET, checked: the frame is buf[data_off, data_off + data_len). */
struct vmb_nv_tx_pkt {
    uint32_t data_off;       /* offset in buf (the batch), not in the message */
    uint32_t data_len;
    uint32_t csum;           /* the checksum PPI's value; 0: none asked for */
    uint32_t lso;            /* the LSO v2 PPI's value; 0: no LSO */
    uint32_t vlan;           /* the 802.1Q PPI's value when flags & VMB_NV_HAS_VLAN */
    uint32_t hash_value;     /* when flags & VMB_NV_HAS_HASH */
    uint32_t flags;
    uint32_t _pad;
};

/* One NVSP message's result: status and its PACKETs pkts[first, first + count). */
struct vmb_nv_tx_msg {
    int32_t status;          /* VMB_NV_OK, VMB_NV_SLOW or VMB_NV_BAD */
    uint32_t first;
    uint32_t count;          /* OK only; else 0 */
    uint32_t _pad;
};

/* Check and read the RNDIS messages of n NVSP messages (buf[index[2i], +index[2i+1])),
 * as rndis.split_messages + rndis.parse_packet(max_frame=) do. pkts needs room for
 * n * VMB_NV_MAX_PKT_PER_MSG records. Returns the number of PACKET records written,
 * or VMB_NV_E_ARG (an index entry outside buf). */
int vmb_nv_tx_parse(const uint8_t *buf, uint64_t buflen, const uint32_t *index, uint32_t n,
                    uint32_t max_frame, struct vmb_nv_tx_msg *msgs, struct vmb_nv_tx_pkt *pkts);

/* Fill the checksums the checksum PPI value csum asks for, in place (offload.fill_checksum).
 * Returns 0, or VMB_NV_E_FRAME when the reference raises OffloadError. */
int vmb_nv_csum_fill(uint8_t *frame, uint32_t len, uint32_t csum);

/* LSO v2 (offload.segment): the segments back to back in out, their lengths in lens.
 * Returns the segment count, VMB_NV_E_FRAME when the reference raises OffloadError,
 * or VMB_NV_E_SPACE with *need set to the bytes out must hold (call again). */
int vmb_nv_lso_segment(const uint8_t *frame, uint32_t len, uint32_t lso, uint8_t *out,
                       uint32_t out_cap, uint32_t *lens, uint32_t max_lens, uint32_t *need);

/* The receive checksum PPI for a frame: what we validated (offload.rx_checksum_info). */
uint32_t vmb_nv_rx_csum(const uint8_t *frame, uint32_t len);

/* The Toeplitz hash of data over key (rndis.toeplitz_hash); key_len*8 >= len*8 + 32. */
uint32_t vmb_nv_toeplitz(const uint8_t *key, uint32_t key_len, const uint8_t *data, uint32_t len);

/* One received frame (from the backend): where it is, and what the guest is told. */
struct vmb_nv_rx_frame {
    uint32_t data_off;       /* in the batch buffer */
    uint32_t data_len;
    uint32_t vlan;           /* when flags & VMB_NV_HAS_VLAN */
    uint32_t hash_value;     /* when flags & VMB_NV_HAS_HASH (classify sets it) */
    uint32_t hash_info;      /* its hash info PPI, 0: none */
    uint32_t queue;          /* classify: the indirection table's queue (0 without RSS) */
    uint32_t flags;
    int32_t accept;          /* classify: 1 the packet filter passes it, 0 dropped */
};

/* The receive filter and vRSS for a batch: per frame, `accept` by the packet filter
 * (promiscuous; broadcast; multicast when all-multicast, or listed with multicast;
 * unicast to mac with directed), and when rss_hash_info != 0 its Toeplitz hash over
 * key (40 bytes) of what rndis.rss_input picks, hash_info and table's queue. Returns
 * the number accepted. mcast holds nmcast 6-byte addresses. */
int vmb_nv_rx_classify(const uint8_t *buf, uint64_t buflen, struct vmb_nv_rx_frame *frames,
                       uint32_t n, uint32_t filter, const uint8_t *mac, const uint8_t *mcast,
                       uint32_t nmcast, uint32_t rss_hash_info, const uint8_t *key,
                       const uint32_t *table, uint32_t ntable);

/* Build the host RNDIS PACKET of frames[i] (rndis.packet_header with the checksum
 * result of vmb_nv_rx_csum, then the frame) at rbuf + offsets[i], i < n. A message
 * larger than max_len is not written: msg_lens[i] = 0. Returns VMB_NV_E_ARG if a
 * frame or an offset + max_len is outside its buffer, else the number written. */
int vmb_nv_rx_build(uint8_t *rbuf, uint64_t rbuf_len, const uint8_t *buf, uint64_t buflen,
                    const struct vmb_nv_rx_frame *frames, uint32_t n, const uint32_t *offsets,
                    uint32_t max_len, uint32_t *msg_lens);
/* cffi:end */
#endif
