// streamkv paged KV gather/scatter (HIP/ROCm; loaded at run time with hiprtc via CuPy RawModule).
//
// The same kernels as cuda/paged_copy.cu, for AMD GPUs: see that file for the layouts and the
// staging format. Only this header differs; the body below the marker line is kept identical to the
// CUDA file (tests/test_kernel_build.py checks it), so the two cannot drift.
#if !defined(__HIPCC_RTC__)
#include <hip/hip_runtime.h>
#endif

// ---- body shared with cuda/paged_copy.cu (tests/test_kernel_build.py checks they match) ----

struct PagedCopyArgs {
    unsigned char* pool;          // segment base (already offset to the segment's first byte)
    unsigned char* staging;       // layer section base
    const long long* slots;       // token slot per staged token, >= 0
    long long n_tokens;
    long long heads;
    long long block_size;
    long long seg_bytes;          // contiguous bytes per (token, head)
    long long stride_block;       // bytes
    long long stride_offset;      // bytes
    long long stride_head;        // bytes
    long long chunk_tokens;       // tokens per staging chunk group
    long long seg_prefix;         // row bytes of earlier segments in a chunk
    long long total_row;          // row bytes of all segments
    long long block_shift;        // log2(block_size), or -1 when not a power of two
    long long chunk_shift;        // log2(chunk_tokens), or -1 when not a power of two
};

template <typename Vec, bool kGather>
__device__ __forceinline__ void paged_copy_body(const PagedCopyArgs& a) {
    const long long vecs = a.seg_bytes / (long long)sizeof(Vec);
    const int threads = (int)blockDim.x;
    const int per_row = vecs < (long long)threads ? (int)vecs : threads;
    const int rows_per_step = threads / per_row;
    const int lane_row = (int)threadIdx.x / per_row;
    const int lane_vec = (int)threadIdx.x - lane_row * per_row;
    if (lane_row >= rows_per_step) return;
    const long long rows = a.n_tokens * a.heads;
    const long long row_bytes = a.heads * a.seg_bytes;
    const long long step = (long long)gridDim.x * rows_per_step;
    for (long long r = (long long)blockIdx.x * rows_per_step + lane_row; r < rows; r += step) {
        long long tok = r, h = 0;
        if (a.heads != 1) {
            tok = r / a.heads;
            h = r - tok * a.heads;
        }
        const long long slot = a.slots[tok];
        long long blk, off;
        if (a.block_shift >= 0) {
            blk = slot >> a.block_shift;
            off = slot & ((1LL << a.block_shift) - 1);
        } else {
            blk = slot / a.block_size;
            off = slot - blk * a.block_size;
        }
        const long long chunk = a.chunk_shift >= 0 ? (tok >> a.chunk_shift) : (tok / a.chunk_tokens);
        const long long first = chunk * a.chunk_tokens;
        const long long left = a.n_tokens - first;
        const long long in_chunk = left < a.chunk_tokens ? left : a.chunk_tokens;
        unsigned char* s = a.staging + first * a.total_row + in_chunk * a.seg_prefix
                         + (tok - first) * row_bytes + h * a.seg_bytes;
        unsigned char* p = a.pool + blk * a.stride_block + off * a.stride_offset + h * a.stride_head;
        for (long long v = lane_vec; v < vecs; v += per_row) {
            if (kGather) {
                reinterpret_cast<Vec*>(s)[v] = reinterpret_cast<const Vec*>(p)[v];
            } else {
                reinterpret_cast<Vec*>(p)[v] = reinterpret_cast<const Vec*>(s)[v];
            }
        }
    }
}

// Scalar parameters (not a struct) so that every launcher (CuPy, a host harness) passes plain
// 8-byte values: pointers as uint64, the rest as int64.
#define STREAMKV_PAGED_COPY_PARAMS                                                          \
    unsigned char* pool, unsigned char* staging, const long long* slots, long long n_tokens,   \
    long long heads, long long block_size, long long seg_bytes, long long stride_block,       \
    long long stride_offset, long long stride_head, long long chunk_tokens,                   \
    long long seg_prefix, long long total_row, long long block_shift, long long chunk_shift
#define STREAMKV_PAGED_COPY_ARGS                                                            \
    {pool, staging, slots, n_tokens, heads, block_size, seg_bytes, stride_block,             \
     stride_offset, stride_head, chunk_tokens, seg_prefix, total_row, block_shift, chunk_shift}

#define STREAMKV_PAGED_COPY(NAME, VEC)                                                     \
    extern "C" __global__ void paged_gather_##NAME(STREAMKV_PAGED_COPY_PARAMS) {          \
        const PagedCopyArgs a = STREAMKV_PAGED_COPY_ARGS;                                  \
        paged_copy_body<VEC, true>(a);                                                     \
    }                                                                                      \
    extern "C" __global__ void paged_scatter_##NAME(STREAMKV_PAGED_COPY_PARAMS) {         \
        const PagedCopyArgs a = STREAMKV_PAGED_COPY_ARGS;                                  \
        paged_copy_body<VEC, false>(a);                                                    \
    }

STREAMKV_PAGED_COPY(v16, uint4)
STREAMKV_PAGED_COPY(v8, uint2)
STREAMKV_PAGED_COPY(v4, unsigned int)
STREAMKV_PAGED_COPY(v2, unsigned short)
STREAMKV_PAGED_COPY(v1, unsigned char)
