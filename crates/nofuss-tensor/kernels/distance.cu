// Squared Euclidean distances from a matrix product: d = max((|a_i|^2 + |b_j|^2) - 2 ab_ij, 0)
// over a contiguous [N, P] product, one pass (a NaN stays NaN), and its gradient with
// respect to the product, -2 g where d > 0 (the norms' gradients are its row and column
// sums). The arithmetic is the element type's, in the order of the element-wise ops it
// replaces (2 ab is exact, so a fused multiply-add rounds the same).
#include "common.cuh"

template <typename T>
__device__ void sqdist_fwd(const T* ab, const T* aa, const T* bb, T* out, int64_t n, int64_t p) {
    typedef typename Acc<T>::type A;
    GRID_STRIDE(i, n * p) {
        int64_t j, r = divmod(i, p, j);
        // The norms' sum is rounded to T first, as the separate add did.
        A v = to_acc(from_acc<T>(to_acc(aa[r]) + to_acc(bb[j]))) - to_acc(ab[i]) * (A)2;
        out[i] = from_acc<T>(v > (A)0 || isnan(v) ? v : (A)0);
    }
}

template <typename T>
__device__ void sqdist_bwd(const T* g, const T* d, T* dab, int64_t total) {
    typedef typename Acc<T>::type A;
    GRID_STRIDE(i, total) {
        dab[i] = from_acc<T>(to_acc(d[i]) > (A)0 ? (A)-2 * to_acc(g[i]) : (A)0);
    }
}

#define SQDIST_KERNELS(T, SUF)                                                                \
    extern "C" __global__ void sqdist_fwd_##SUF(const T* ab, const T* aa, const T* bb, T* out, \
                                                int64_t n, int64_t p) {                       \
        sqdist_fwd<T>(ab, aa, bb, out, n, p);                                                 \
    }                                                                                         \
    extern "C" __global__ void sqdist_bwd_##SUF(const T* g, const T* d, T* dab,               \
                                                int64_t total) {                              \
        sqdist_bwd<T>(g, d, dab, total);                                                      \
    }

FOR_EACH_DTYPE(SQDIST_KERNELS)
