/* The Hyper-V SynIC pages the KVM VMM shares with its guest (vmbus/kvm/hyperv.py):
 * putting a message into a SIMP slot with the message-pending/EOM handshake, and
 * setting an event flag in a SIEFP slot, each as the guest's own atomics expect.
 * Twins: vmbus/kvm/hyperv.py (_PySlots), which documents the races it cannot close.
 * The code is native/hyperv.c.
 *
 * Between the cffi:begin and cffi:end lines is what Python sees: build_native.py
 * hands it to cffi (values of #defines come from the compiler). */
#ifndef VMBUSD_HYPERV_H
#define VMBUSD_HYPERV_H
#include "vmbusd.h"

/* cffi:begin */
#define VMB_HV_MESSAGE_SIZE 256     /* struct hv_message: 16-byte header + 240 payload */
#define VMB_HV_EVENT_FLAGS 2048     /* event flags in one SIEFP slot (256 bytes) */

/* Deliver the 256-byte message `msg` into the SIMP slot `slot` if the slot is free
 * (message_type, its first u32, is HVMSG_NONE = 0): copy bytes 4..255, then store
 * message_type with release order, so a guest that sees the type sees the rest.
 * If the slot is busy: set msg_pending (bit 0 of the flags byte at offset 5) with a
 * locked OR - a full barrier - and look at message_type again: the guest clears
 * message_type with a cmpxchg and then reads msg_pending (vmbus_signal_eom), so either
 * it sees msg_pending and writes EOM, or this second look sees the slot free and
 * delivers. Returns 1 when delivered, 0 when the slot stays busy (msg_pending set). */
int vmb_hv_msg_deliver(uint8_t *slot, const uint8_t *msg);

/* Set event flag `flag` in the SIEFP slot `slot` (256 bytes = 2048 flags, as 32
 * little-endian u64 words) with a locked OR, as the guest clears them with locked
 * bit operations (sync_test_and_clear_bit). Returns 1 when the flag was clear (the
 * guest needs an interrupt), 0 when it was already set, -1 when flag >= 2048. */
int vmb_hv_event_set(uint8_t *slot, uint32_t flag);
/* cffi:end */
#endif
