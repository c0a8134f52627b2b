/* Guest memory: batched MAP_FIXED of page runs into a reserved VA range, and the
 * per-request GPA-range walk. Contract shared with the pure-Python twin in
 * vmbus/memory.py (_PyOps); tests compare the two. The code is native/memory.c.
 * Return codes: >= 0 OK, negative = -errno (map only) or one of VMB_MEM_E_* (both;
 * all below -4095, so they never collide with a -errno).
 *
 * Between the cffi:begin and cffi:end lines is what Python sees: build_native.py
 * hands it to cffi (values of #defines come from the compiler). */
#ifndef VMBUSD_MEMORY_H
#define VMBUSD_MEMORY_H
#include <stdint.h>
#include <sys/mman.h>

/* cffi:begin */
#define VMB_MEM_E_BAD_ARG   (-4097)     /* caller error: runs do not fit the reservation, ... */
#define VMB_MEM_E_RANGE     (-4098)     /* byte_offset >= 4096, byte_count 0, u32 overflow,
                                         * or PFN count != ceil((offset + count) / 4096) */
#define VMB_MEM_E_PFN       (-4099)     /* a PFN outside every guest RAM region */
#define VMB_MEM_E_OUT_SMALL (-4100)     /* caller error: out array too small */
#define VMB_MEM_MAX_PFN     (UINT64_MAX >> 12)  /* PFNs above this cannot be shifted into a
                                                 * u64 GPA */
#define VMB_MAP_NORESERVE   MAP_NORESERVE  /* this platform's, for the reservation */

struct vmb_map_run {
    int32_t fd;            /* fd of the guest RAM region */
    uint32_t npages;       /* pages in this run, >= 1 */
    uint64_t file_offset;  /* byte offset in fd, page-aligned */
};

struct vmb_mem_region {
    uint64_t gpa;          /* page-aligned guest-physical base */
    uint64_t size;         /* page-aligned size in bytes, > 0 */
};

struct vmb_iov_seg {
    uint32_t region;       /* index into the region table */
    uint32_t _pad;
    uint64_t offset;       /* byte offset inside the region */
    uint64_t len;          /* bytes, > 0 */
};

int vmb_va_map_runs(void *base, uint64_t reserved_pages,
                    const struct vmb_map_run *runs, uint32_t nruns);

int64_t vmb_gpa_range_walk(const struct vmb_mem_region *regions, uint32_t nregions,
                           uint64_t byte_offset, uint64_t byte_count,
                           const uint64_t *pfns, uint64_t npfns,
                           struct vmb_iov_seg *out, uint64_t max_out);
/* cffi:end */
#endif
