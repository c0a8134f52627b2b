/* Shared definitions for all native sources: barriers and little-endian access.
 * Every load of a guest-written field goes through vmb_ld* (one volatile access,
 * copied to a local) so it is read exactly once. */
#ifndef VMBUSD_H
#define VMBUSD_H
#include <stdint.h>
#include <stddef.h>
#include <string.h>

#define vmb_mb()   __atomic_thread_fence(__ATOMIC_SEQ_CST)
#define vmb_rmb()  __atomic_thread_fence(__ATOMIC_ACQUIRE)
#define vmb_wmb()  __atomic_thread_fence(__ATOMIC_RELEASE)

static inline uint32_t vmb_ld32_acquire(const uint8_t *p)
{
    return __atomic_load_n((const uint32_t *)p, __ATOMIC_ACQUIRE);
}
static inline uint32_t vmb_ld32(const uint8_t *p)
{
    return __atomic_load_n((const uint32_t *)p, __ATOMIC_RELAXED);
}
static inline void vmb_st32_release(uint8_t *p, uint32_t v)
{
    __atomic_store_n((uint32_t *)p, v, __ATOMIC_RELEASE);
}
static inline void vmb_st32(uint8_t *p, uint32_t v)
{
    __atomic_store_n((uint32_t *)p, v, __ATOMIC_RELAXED);
}

uint32_t vmb_native_abi(void);
#endif
