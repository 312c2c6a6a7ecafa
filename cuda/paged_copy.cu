// streamkv paged KV gather/scatter (CUDA; loaded at run time with NVRTC via CuPy RawModule).
//
// Why: the engine's KV lives in a paged pool (vLLM blocks / SGLang slots); the store wants one
// contiguous section per layer. These kernels move the bytes of a list of token slots between the
// two, dtype-agnostic (they copy bytes), with the widest vector load/store that the alignment of
// every pointer, stride and row allows (16, 8, 4, 2 or 1 bytes). The caller picks the width.
//
// One launch moves one "segment" of the pool: a strided 4-D byte view
//   pool[block][offset][head][0 .. seg_bytes)      (innermost bytes contiguous)
// where a token slot s sits at block = s / block_size, offset = s % block_size.
// K and V of MHA are two segments (two tensors, or two halves of vLLM's packed last dim);
// MLA's latent is one segment with heads = 1.
//
// Staging layout (the layer section): tokens are grouped in chunks of `chunk_tokens`; inside a
// chunk the segments follow each other, and inside a segment rows are [token][head][seg_bytes]:
//   off(tok, h) = chunk * chunk_bytes + n_in_chunk * seg_prefix + (tok % chunk) * row + h * seg_bytes
// with row = heads * seg_bytes, chunk_bytes = chunk_tokens * total_row (all segments), seg_prefix =
// row bytes of the segments before this one, n_in_chunk = tokens in this chunk (last may be short).
//
// Threads map onto rows: a row of `vecs` vectors gets min(vecs, blockDim.x) consecutive threads
// and a block covers blockDim.x / that many rows per step, so loads and stores are coalesced on
// both sides and the index arithmetic (the divisions) is done once per row, not per vector.
// Block size and chunk length use shifts when they are powers of two (the usual case). When the
// heads of a token are contiguous in the pool the launcher passes them as one row (heads = 1).
// ---- body shared with hip/paged_copy.hip (tests/test_kernel_build.py checks they match) ----

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
