/* The request journal's per-packet work: see journal.h for the contract. */
#include "journal.h"
#include "ring.h"
#include "vmbusd.h"

static int entries_ok(uint64_t slot_len, uint32_t entry_size, const uint32_t *entries,
                      uint32_t n)
{
    uint64_t cap;

    if (entry_size % 8 || entry_size < VMB_JOURNAL_ENTRY_HEADER + 16 ||
        slot_len < VMB_JOURNAL_HEADER)
        return 0;
    cap = (slot_len - VMB_JOURNAL_HEADER) / entry_size;
    for (uint32_t i = 0; i < n; i++)
        if (entries[i] >= cap)
            return 0;
    return 1;
}

int vmb_journal_stage(uint8_t *slot, uint64_t slot_len, uint32_t entry_size, int copy,
                      const uint8_t *out, uint64_t out_len, const uint32_t *index,
                      uint32_t n, const uint32_t *entries, uint64_t seq)
{
    uint32_t room = entry_size - VMB_JOURNAL_ENTRY_HEADER;

    if (!entries_ok(slot_len, entry_size, entries, n))
        return VMB_E_BAD_ARG;
    for (uint32_t i = 0; i < n; i++) {
        uint64_t off = index[2 * i], len = index[2 * i + 1];
        if (len < VMB_PKT_DESC_SIZE || off + len > out_len)
            return VMB_E_BAD_ARG;
    }
    for (uint32_t i = 0; i < n; i++) {
        const uint8_t *pkt = out + index[2 * i];
        uint32_t len = index[2 * i + 1];
        uint8_t *e = slot + VMB_JOURNAL_HEADER + (uint64_t)entries[i] * entry_size;
        uint32_t kept = 0, flags = 0, state = VMB_JOURNAL_STAGED, zero = 0;
        uint64_t tid, s = seq + i;

        if (copy) {
            kept = len < room ? len : room;
            if (kept < len)
                flags = VMB_JOURNAL_F_TRUNCATED;
            memcpy(e + VMB_JOURNAL_ENTRY_HEADER, pkt, kept);
        }
        memcpy(&tid, pkt + 8, 8);
        memcpy(e + 4, &kept, 4);
        memcpy(e + 8, &tid, 8);
        memcpy(e + 16, &flags, 4);
        memcpy(e + 20, &zero, 4);
        memcpy(e + 24, &s, 8);
        /* The state last, so a crash between never shows a STAGED entry with an old
         * body (a process dies between any two stores: only the compiler can reorder). */
        __atomic_signal_fence(__ATOMIC_SEQ_CST);
        memcpy(e, &state, 4);
    }
    return 0;
}

int vmb_journal_set_states(uint8_t *slot, uint64_t slot_len, uint32_t entry_size,
                           const uint32_t *entries, uint32_t n, uint32_t state)
{
    if (!entries_ok(slot_len, entry_size, entries, n))
        return VMB_E_BAD_ARG;
    for (uint32_t i = 0; i < n; i++) {
        uint8_t *e = slot + VMB_JOURNAL_HEADER + (uint64_t)entries[i] * entry_size;
        uint32_t old;

        memcpy(&old, e, 4);
        if (state == VMB_JOURNAL_COMPLETING && old == VMB_JOURNAL_REPLY) {
            uint32_t f = VMB_JOURNAL_F_REPLY_DONE;
            memcpy(e + 16, &f, 4);
            __atomic_signal_fence(__ATOMIC_SEQ_CST);
        }
        memcpy(e, &state, 4);
    }
    return 0;
}
