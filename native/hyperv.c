/* SynIC message and event slots: see native/hyperv.h for the contracts. */
#include "hyperv.h"

int vmb_hv_msg_deliver(uint8_t *slot, const uint8_t *msg)
{
    uint32_t type;

    if (vmb_ld32_acquire(slot) != 0) {
        /* Pairs with the guest's cmpxchg(message_type -> NONE) followed by its load of
         * msg_pending in vmbus_signal_eom(): the locked OR orders this store before the
         * load of message_type below. */
        __atomic_fetch_or(slot + 5, (uint8_t)1, __ATOMIC_SEQ_CST);
        if (vmb_ld32_acquire(slot) != 0)
            return 0;
    }
    memcpy(slot + 4, msg + 4, VMB_HV_MESSAGE_SIZE - 4);
    memcpy(&type, msg, sizeof(type));
    /* Pairs with the guest's read of message_type before it copies the slot
     * (vmbus_isr / vmbus_on_msg_dpc): the rest of the message is visible first. */
    vmb_st32_release(slot, type);
    return 1;
}

int vmb_hv_event_set(uint8_t *slot, uint32_t flag)
{
    uint64_t bit, old;

    if (flag >= VMB_HV_EVENT_FLAGS)
        return -1;
    bit = (uint64_t)1 << (flag % 64);
    old = __atomic_fetch_or((uint64_t *)(slot + (flag / 64) * 8), bit, __ATOMIC_SEQ_CST);
    return (old & bit) == 0;
}
