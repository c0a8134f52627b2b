/* Shared definitions for all native sources: the ABI number, barriers and
 * little-endian access. Every load of a guest-written field goes through vmb_ld*
 * (one volatile access, copied to a local) so it is read exactly once.
 *
 * Between the cffi:begin and cffi:end lines is what Python sees: build_native.py
 * hands it to cffi (values of #defines come from the compiler). */
#ifndef VMBUSD_H
#define VMBUSD_H
#include <stdint.h>
#include <stddef.h>
#include <string.h>

/* cffi:begin */
/* The native ABI: bump it when anything between cffi:begin and cffi:end changes in
 * any native header, or when a function's contract does. The one place it is written:
 * the extension reports it as lib.VMBUSD_NATIVE_ABI and vmbus/native.py compares
 * that with this line of the source tree, so a build older than the checkout is
 * refused at import. */
#define VMBUSD_NATIVE_ABI 12
/* cffi:end */

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
#endif
