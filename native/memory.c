/* Guest memory: map scattered guest pages virtually contiguous, and turn a
 * guest-supplied GPA range into (region, offset, length) segments.
 * Contract: native/memory.h; pure-Python twin: vmbus/memory.py (_PyOps). */
#include <errno.h>
#include <sys/mman.h>
#include "vmbusd.h"
#include "memory.h"

#define VMB_PAGE_SHIFT 12
#define VMB_PAGE_SIZE  (1ull << VMB_PAGE_SHIFT)

/* vmbus/memory.py unpacks the segment array in bulk as "=IIQQ". */
_Static_assert(sizeof(struct vmb_iov_seg) == 24, "struct vmb_iov_seg layout");

/* Map every run, back to back from base, with MAP_FIXED|MAP_SHARED. The runs come
 * from our own validated PFN walk, but base+length must still never leave the
 * reservation, or MAP_FIXED would silently replace unrelated mappings: check the
 * sum (overflow-safe) before mapping anything. Returns 0 or -errno; on failure the
 * caller drops the whole reservation (the runs already mapped go with it). */
int vmb_va_map_runs(void *base, uint64_t reserved_pages,
                    const struct vmb_map_run *runs, uint32_t nruns)
{
    uint64_t total = 0;
    uint32_t i;

    if (base == NULL || ((uintptr_t)base & (VMB_PAGE_SIZE - 1)) != 0)
        return VMB_MEM_E_BAD_ARG;
    if (reserved_pages > (UINT64_MAX >> VMB_PAGE_SHIFT))
        return VMB_MEM_E_BAD_ARG;
    for (i = 0; i < nruns; i++) {
        if (runs[i].fd < 0 || runs[i].npages == 0 ||
            (runs[i].file_offset & (VMB_PAGE_SIZE - 1)) != 0 ||
            runs[i].file_offset > (uint64_t)INT64_MAX)
            return VMB_MEM_E_BAD_ARG;
        total += runs[i].npages;   /* nruns * UINT32_MAX cannot overflow a u64 */
        if (total > reserved_pages)
            return VMB_MEM_E_BAD_ARG;
    }

    uint8_t *at = base;
    for (i = 0; i < nruns; i++) {
        size_t len = (size_t)runs[i].npages << VMB_PAGE_SHIFT;
        void *p = mmap(at, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED,
                       runs[i].fd, (off_t)runs[i].file_offset);
        if (p == MAP_FAILED)
            return -errno;
        if (p != (void *)at)    /* cannot happen with MAP_FIXED; never trust it */
            return VMB_MEM_E_BAD_ARG;
        at += len;
    }
    return 0;
}

/* Index of the region holding gpa, or -1. Regions are sorted and disjoint. */
static inline int64_t find_region(const struct vmb_mem_region *r, uint32_t n, uint64_t gpa)
{
    uint32_t lo = 0, hi = n;

    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (gpa < r[mid].gpa)
            hi = mid;
        else if (gpa - r[mid].gpa >= r[mid].size)
            lo = mid + 1;
        else
            return mid;
    }
    return -1;
}

/* Untrusted input: byte_offset, byte_count and every PFN come from a guest
 * packet. Validate them all before the caller builds a single iovec: offset
 * < 4096, count != 0, offset + count fits a u32 (the wire fields are u32), exactly
 * ceil((offset + count) / 4096) PFNs, each PFN inside guest RAM. Physically
 * adjacent pages in one region coalesce into one segment.
 * Returns the segment count, or a negative VMB_MEM_E_*. */
int64_t vmb_gpa_range_walk(const struct vmb_mem_region *regions, uint32_t nregions,
                           uint64_t byte_offset, uint64_t byte_count,
                           const uint64_t *pfns, uint64_t npfns,
                           struct vmb_iov_seg *out, uint64_t max_out)
{
    if (byte_offset >= VMB_PAGE_SIZE || byte_count == 0 || byte_count > UINT32_MAX ||
        byte_offset + byte_count > UINT32_MAX)
        return VMB_MEM_E_RANGE;
    uint64_t end = byte_offset + byte_count;
    if (npfns != (end + VMB_PAGE_SIZE - 1) >> VMB_PAGE_SHIFT)
        return VMB_MEM_E_RANGE;

    uint64_t nout = 0;
    int64_t last = -1;       /* region of the previous page: most pages share one */
    for (uint64_t i = 0; i < npfns; i++) {
        uint64_t pfn = pfns[i];        /* read once */
        if (pfn > VMB_MEM_MAX_PFN)
            return VMB_MEM_E_PFN;
        uint64_t gpa = pfn << VMB_PAGE_SHIFT;
        int64_t ri;
        if (last >= 0 && gpa >= regions[last].gpa &&
            gpa - regions[last].gpa < regions[last].size)
            ri = last;
        else
            ri = find_region(regions, nregions, gpa);
        if (ri < 0)
            return VMB_MEM_E_PFN;
        /* Regions are page-aligned, so the whole page is inside region ri. The
         * range covers [byte_offset, end) of the concatenated pages. */
        uint64_t page_start = i << VMB_PAGE_SHIFT;
        uint64_t page_end = page_start + VMB_PAGE_SIZE;
        uint64_t start = i == 0 ? byte_offset : page_start;
        uint64_t len = (page_end < end ? page_end : end) - start;
        uint64_t off = gpa - regions[ri].gpa + (start - page_start);
        if (nout > 0 && out[nout - 1].region == (uint32_t)ri &&
            out[nout - 1].offset + out[nout - 1].len == off) {
            out[nout - 1].len += len;
        } else {
            if (nout >= max_out)
                return VMB_MEM_E_OUT_SMALL;
            out[nout].region = (uint32_t)ri;
            out[nout]._pad = 0;
            out[nout].offset = off;
            out[nout].len = len;
            nout++;
        }
        last = ri;
    }
    return (int64_t)nout;
}
