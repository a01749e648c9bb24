// The NCA objective of each row of a distance matrix d [N, P] against its label's column,
// fused: for row i with label y,
//   paper form (positive left out):  loss = d_iy + logsumexp_{j != y}(-d_ij)
//   softmax form, smoothing e:       loss = (1-e) d_iy + e mean_{j != y} d_ij + logsumexp_j(-d_ij)
// Output [N, 2]: the loss and the log-sum-exp (which the backward pass reuses). A label
// outside 0..P gives NaN. One block per row forward; one thread per element backward.
#include "common.cuh"

#define THREADS 256

template <typename A> __device__ __forceinline__ A nan_value() { return (A)NAN; }

template <typename T>
__device__ void nca_fwd(const T* d, const uint32_t* labels, T* out, int64_t p, int paper,
                        double smoothing) {
    typedef typename Acc<T>::type A;
    __shared__ A s_max[THREADS], s_sum[THREADS], s_neg[THREADS];
    int64_t row = blockIdx.x;
    const T* r = d + row * p;
    uint32_t y = labels[row];
    bool valid = (int64_t)y < p;
    A m = neg_inf<A>();
    for (int64_t j = threadIdx.x; j < p; j += blockDim.x)
        if (!(paper && j == y)) m = max(m, -to_acc(r[j]));
    s_max[threadIdx.x] = m;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
        if (threadIdx.x < stride)
            s_max[threadIdx.x] = max(s_max[threadIdx.x], s_max[threadIdx.x + stride]);
        __syncthreads();
    }
    m = s_max[0];
    A sum = 0, neg = 0;
    for (int64_t j = threadIdx.x; j < p; j += blockDim.x) {
        A v = to_acc(r[j]);
        if (!(paper && j == y)) sum += exp(-v - m);
        if (j != y) neg += v;
    }
    block_sum2(s_sum, s_neg, sum, neg);
    if (threadIdx.x == 0) {
        A lse = m + log(s_sum[0]);
        A loss;
        if (!valid) {
            loss = nan_value<A>();
        } else if (paper) {
            loss = to_acc(r[y]) + lse;
        } else {
            A e = (A)smoothing;
            A mean_neg = p > 1 ? s_neg[0] / (A)(p - 1) : (A)0;
            loss = ((A)1 - e) * to_acc(r[y]) + e * mean_neg + lse;
        }
        out[2 * row] = from_acc<T>(loss);
        out[2 * row + 1] = from_acc<T>(lse);
    }
}

template <typename T>
__device__ void nca_bwd(const T* d, const uint32_t* labels, const T* res, const T* g, T* dd,
                        int64_t n, int64_t p, int paper, double smoothing) {
    typedef typename Acc<T>::type A;
    GRID_STRIDE(i, n * p) {
        int64_t j, row = divmod(i, p, j);
        uint32_t y = labels[row];
        A gi = to_acc(g[2 * row]);
        A lse = to_acc(res[2 * row + 1]);
        A soft = exp(-to_acc(d[i]) - lse);
        A v;
        if ((int64_t)y >= p) {
            v = nan_value<A>();
        } else if (paper) {
            v = j == y ? gi : -gi * soft;
        } else {
            A e = (A)smoothing;
            A target = j == y ? (A)1 - e : (p > 1 ? e / (A)(p - 1) : (A)0);
            v = gi * (target - soft);
        }
        dd[i] = from_acc<T>(v);
    }
}

#define NCA_KERNELS(T, SUF)                                                                    \
    extern "C" __global__ void nca_fwd_##SUF(const T* d, const uint32_t* labels, T* out,      \
                                             int64_t p, int paper, double smoothing) {        \
        nca_fwd<T>(d, labels, out, p, paper, smoothing);                                       \
    }                                                                                          \
    extern "C" __global__ void nca_bwd_##SUF(const T* d, const uint32_t* labels, const T* res, \
                                             const T* g, T* dd, int64_t n, int64_t p,          \
                                             int paper, double smoothing) {                    \
        nca_bwd<T>(d, labels, res, g, dd, n, p, paper, smoothing);                             \
    }

NCA_KERNELS(float, f32)
NCA_KERNELS(double, f64)
