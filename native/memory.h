/* Guest memory mapping and GPA-range walk; see native/cdef/memory.h for the
 * contract (the declarations cffi parses). */
#ifndef VMBUSD_MEMORY_H
#define VMBUSD_MEMORY_H
#include <stdint.h>
#include <sys/mman.h>

/* Below -4095 so that they never collide with a -errno from vmb_va_map_runs. */
#define VMB_MEM_E_BAD_ARG   (-4097)
#define VMB_MEM_E_RANGE     (-4098)
#define VMB_MEM_E_PFN       (-4099)
#define VMB_MEM_E_OUT_SMALL (-4100)
#define VMB_MEM_MAX_PFN     (UINT64_MAX >> 12)
#define VMB_MAP_NORESERVE   MAP_NORESERVE

struct vmb_map_run {
    int32_t fd;
    uint32_t npages;
    uint64_t file_offset;
};

struct vmb_mem_region {
    uint64_t gpa;
    uint64_t size;
};

struct vmb_iov_seg {
    uint32_t region;
    uint32_t _pad;
    uint64_t offset;
    uint64_t len;
};

int vmb_va_map_runs(void *base, uint64_t reserved_pages,
                    const struct vmb_map_run *runs, uint32_t nruns);

int64_t vmb_gpa_range_walk(const struct vmb_mem_region *regions, uint32_t nregions,
                           uint64_t byte_offset, uint64_t byte_count,
                           const uint64_t *pfns, uint64_t npfns,
                           struct vmb_iov_seg *out, uint64_t max_out);
#endif
