// The K smallest entries of every row of a float matrix, in ascending order (ties by
// column), optionally leaving out one column per row (row r + skip_offset: a query's own
// point in a kNN search). One block per row:
//   1. radix selection on order-preserving 32-bit keys, 8 bits a pass, finds the K-th
//      smallest key T and how many entries equal to T belong to the K;
//   2. the row is read again a tile of columns at a time; a block-wide scan of each
//      tile's flags (below T, equal to T) gives every kept entry its slot, so the entries
//      equal to T that are kept are the ones with the lowest columns;
//   3. the K (key, column) pairs are bitonic-sorted in shared memory and written out.
// Nothing is materialised but the [rows, K] outputs. NaN sorts after +inf, -0 ties with +0.
#include "common.cuh"

#define SELECT_THREADS 256
#define SELECT_MAX_K 4096

// Order-preserving map of a float to an unsigned key: every NaN maps to the largest key,
// -0 to the key of +0 (so the order is torch.sort's, and equal values go by column).
__device__ __forceinline__ uint32_t float_key(float v) {
    if (isnan(v)) return 0xffffffffu;
    uint32_t u = __float_as_uint(v);
    if ((u << 1) == 0) u = 0;  // -0
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// x: [rows, cols] (rows = gridDim.x); vals, idx: [rows, k]. Needs 1 <= k <= SELECT_MAX_K,
// k <= cols - skip, cols < 2^32, blockDim.x == SELECT_THREADS.
extern "C" __global__ void smallest_k_f32(const float* x, float* vals, uint32_t* idx,
                                          int64_t cols, int32_t k, int64_t skip_offset,
                                          int32_t skip) {
    __shared__ uint32_t hist[256];
    __shared__ uint32_t s_prefix, s_need;
    __shared__ uint32_t s_scan[SELECT_THREADS];
    __shared__ uint32_t keys[SELECT_MAX_K], ids[SELECT_MAX_K];
    const int64_t row = blockIdx.x;
    const float* r = x + row * cols;
    const int64_t skip_col = skip ? row + skip_offset : -1;
    const unsigned t = threadIdx.x;

    // 1. The K-th smallest key, a byte at a time from the top.
    uint32_t prefix = 0, mask = 0, need = (uint32_t)k;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (unsigned i = t; i < 256; i += blockDim.x) hist[i] = 0;
        __syncthreads();
        for (int64_t j = t; j < cols; j += blockDim.x) {
            if (j == skip_col) continue;
            uint32_t key = float_key(r[j]);
            if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 255u], 1u);
        }
        __syncthreads();
        if (t == 0) {
            uint32_t below = 0;
            unsigned d = 0;
            for (; d < 255; ++d) {
                if (below + hist[d] >= need) break;
                below += hist[d];
            }
            s_prefix = prefix | (d << shift);
            s_need = need - below;
        }
        __syncthreads();
        prefix = s_prefix;
        need = s_need;
        mask |= 255u << shift;
    }
    // prefix is now the K-th smallest key T: the K are every key below T and the first
    // `need` (by column) equal to T.
    const uint32_t less = (uint32_t)k - need;

    // 2. Gather in column order, a tile of blockDim.x columns at a time (coalesced reads):
    //    a block-wide scan of the tile's (below T, equal to T) flags gives each candidate
    //    its slot; tiles without a candidate skip the scan.
    uint32_t run_lt = 0, run_eq = 0;
    for (int64_t base = 0; base < cols; base += blockDim.x) {
        const int64_t j = base + t;
        uint32_t key = 0xffffffffu;
        if (j < cols && j != skip_col) key = float_key(r[j]);
        const uint32_t flags = (key < prefix ? 1u : 0u) | (key == prefix ? 0x10000u : 0u);
        if (__syncthreads_count(flags != 0) == 0) continue;
        // Inclusive scan of the packed flags (below T in the low half, equal in the high).
        s_scan[t] = flags;
        __syncthreads();
        for (unsigned off = 1; off < blockDim.x; off <<= 1) {
            uint32_t add = t >= off ? s_scan[t - off] : 0u;
            __syncthreads();
            s_scan[t] += add;
            __syncthreads();
        }
        const uint32_t before = s_scan[t] - flags, total = s_scan[blockDim.x - 1];
        if (flags & 1u) {
            const uint32_t at = run_lt + (before & 0xffffu);
            keys[at] = key;
            ids[at] = (uint32_t)j;
        } else if (flags) {
            const uint32_t at = run_eq + (before >> 16);
            if (at < need) {
                keys[less + at] = key;
                ids[less + at] = (uint32_t)j;
            }
        }
        run_lt += total & 0xffffu;
        run_eq += total >> 16;
        // The next tile's __syncthreads_count keeps s_scan until every thread has read it.
    }
    unsigned k_pad = 1;
    while (k_pad < (unsigned)k) k_pad <<= 1;
    for (unsigned i = (unsigned)k + t; i < k_pad; i += blockDim.x) {
        keys[i] = 0xffffffffu;
        ids[i] = 0xffffffffu;
    }
    __syncthreads();

    // 3. Bitonic sort of the K (key, column) pairs, ascending.
    for (unsigned size = 2; size <= k_pad; size <<= 1) {
        for (unsigned stride = size >> 1; stride > 0; stride >>= 1) {
            for (unsigned i = t; i < k_pad; i += blockDim.x) {
                unsigned j = i ^ stride;
                if (j > i) {
                    bool up = (i & size) == 0;
                    bool after = keys[i] > keys[j] || (keys[i] == keys[j] && ids[i] > ids[j]);
                    if (after == up) {
                        uint32_t kk = keys[i], ii = ids[i];
                        keys[i] = keys[j];
                        ids[i] = ids[j];
                        keys[j] = kk;
                        ids[j] = ii;
                    }
                }
            }
            __syncthreads();
        }
    }
    for (unsigned i = t; i < (unsigned)k; i += blockDim.x) {
        vals[row * k + i] = r[ids[i]];
        idx[row * k + i] = ids[i];
    }
}
