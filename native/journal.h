/* The request journal's per-packet work (vmbus/journal.py), in one call per batch.
 * Contract shared with the pure-Python twins in vmbus/journal.py (_py_stage,
 * _py_set_states); tests compare the two byte for byte. The code is native/journal.c.
 *
 * The slot: a 64-byte header, then entries of entry_size bytes from offset 64; an
 * entry is a 32-byte header (u32 state, u32 length, u64 trans_id, u32 flags, u32 0,
 * u64 seq) and the packet's first entry_size - 32 bytes.
 *
 * vmb_journal_stage: packet i of a batch (out/index as vmb_ring_read made them) goes
 * into entry entries[i]: state STAGED, length = bytes kept (0 unless copy), trans_id
 * from its descriptor, flags TRUNCATED when it did not fit, seq + i; the packet bytes
 * are stored before the header. Returns 0, or VMB_E_BAD_ARG (nothing written) for a
 * caller error: entry_size not a multiple of 8 or < 48, an entry past the slot, an
 * index pair outside out or shorter than a descriptor.
 *
 * vmb_journal_set_states: every entries[i]'s state word becomes `state`; going
 * COMPLETING, an entry that was REPLY gets the flag REPLY_DONE first. Returns 0 or
 * VMB_E_BAD_ARG (an entry past the slot: nothing written). */
#ifndef VMBUSD_JOURNAL_H
#define VMBUSD_JOURNAL_H
#include <stdint.h>

/* cffi:begin */
#define VMB_JOURNAL_HEADER 64
#define VMB_JOURNAL_ENTRY_HEADER 32
#define VMB_JOURNAL_STAGED 1
#define VMB_JOURNAL_REPLY 3
#define VMB_JOURNAL_COMPLETING 4
#define VMB_JOURNAL_F_TRUNCATED 1
#define VMB_JOURNAL_F_REPLY_DONE 2
int vmb_journal_stage(uint8_t *slot, uint64_t slot_len, uint32_t entry_size, int copy,
                      const uint8_t *out, uint64_t out_len, const uint32_t *index,
                      uint32_t n, const uint32_t *entries, uint64_t seq);
int vmb_journal_set_states(uint8_t *slot, uint64_t slot_len, uint32_t entry_size,
                           const uint32_t *entries, uint32_t n, uint32_t state);
/* cffi:end */
#endif
