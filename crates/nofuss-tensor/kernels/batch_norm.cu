// Batch normalisation (+ optional ReLU) over contiguous NCHW tensors: channel statistics
// by Welford/Chan merges, the fused normalise-scale-shift(-ReLU) pass, the backward
// reduction and input gradient, and the running-statistics update. Per-channel vectors
// (gamma, beta, mean, 1/sigma, sums) are in the accumulator type. `g` in the backward
// pass is the output gradient, zeroed where the rectified output is not positive.
// Reductions run on a (slices, channels) grid writing per-block partials that one thread
// per channel merges in order: no atomics, the same result every run. Channels take
// grid.y, folded into grid.z past its 65,535 rows (`channel`).
#include "common.cuh"

struct BnGeom {
    int64_t n;       // batch
    int64_t c;       // channels
    int64_t hw;      // plane size
    int64_t slices;  // blocks per channel
    // div_by's (mul, shift) for hw and c (0: divide; n * c * hw does not fit).
    uint32_t hw_mul, hw_shift, c_mul, c_shift;
};

#define THREADS 256

// The channel of a reduction's block: its grid.y row in grid.z planes of gridDim.y rows
// (the launcher folds the channels into planes when there are more than the 65,535 rows
// a grid can have). Blocks past the last channel, in the last plane, return at once.
__device__ __forceinline__ int64_t channel() {
    return (int64_t)blockIdx.z * gridDim.y + blockIdx.y;
}

// Element `e` (0 <= e < n*hw) of channel `ch`.
__device__ __forceinline__ int64_t at(const BnGeom& g, int64_t ch, int64_t e) {
    int64_t r, q = div_by(e, g.hw, g.hw_mul, g.hw_shift, r);
    return (q * g.c + ch) * g.hw + r;
}

// One value into a running (count, mean, M2).
template <typename A>
__device__ __forceinline__ void welford(A& n, A& mean, A& m2, A v) {
    n += 1;
    A d = v - mean;
    mean += d / n;
    m2 += d * (v - mean);
}

// Four values into a running (count, mean, M2): their own mean and M2, then one Chan
// merge (one division for the four, where welford takes one per value).
template <typename A>
__device__ __forceinline__ void welford4(A& n, A& mean, A& m2, A v0, A v1, A v2, A v3) {
    A m4 = ((v0 + v1) + (v2 + v3)) * (A)0.25;
    A d0 = v0 - m4, d1 = v1 - m4, d2 = v2 - m4, d3 = v3 - m4;
    A q4 = (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3);
    A tot = n + (A)4, d = m4 - mean, f = (A)4 / tot;
    mean += d * f;
    m2 += q4 + d * d * n * f;
    n = tot;
}

template <typename A>
__device__ __forceinline__ void chan_merge(A& n, A& mean, A& m2, A n2, A mean2, A m22) {
    if (n2 == 0) return;
    A tot = n + n2;
    A d = mean2 - mean;
    mean += d * n2 / tot;
    m2 += m22 + d * d * n * n2 / tot;
    n = tot;
}

// partial[(ch * slices + s) * 3 + {0,1,2}] = (count, mean, M2) of one slice of a channel.
template <typename T>
__device__ void bn_stats_partial(const T* x, typename Acc<T>::type* partial, BnGeom g) {
    typedef typename Acc<T>::type A;
    __shared__ A sn[THREADS], smean[THREADS], sm2[THREADS];
    int64_t ch = channel(), s = blockIdx.x, m = g.n * g.hw;
    if (ch >= g.c) return;
    int64_t chunk = (m + g.slices - 1) / g.slices;
    int64_t lo = s * chunk, hi = min(lo + chunk, m);
    A n = 0, mean = 0, m2 = 0;
    // Four loads in flight per thread, then their updates in order (the same sequence as
    // one element at a time): a reduction this memory-bound needs the loads overlapped.
    const int64_t step = blockDim.x;
    int64_t e = lo + threadIdx.x;
    for (; e + 3 * step < hi; e += 4 * step) {
        A v0 = to_acc(x[at(g, ch, e)]), v1 = to_acc(x[at(g, ch, e + step)]);
        A v2 = to_acc(x[at(g, ch, e + 2 * step)]), v3 = to_acc(x[at(g, ch, e + 3 * step)]);
        welford4(n, mean, m2, v0, v1, v2, v3);
    }
    for (; e < hi; e += step) welford(n, mean, m2, to_acc(x[at(g, ch, e)]));
    sn[threadIdx.x] = n;
    smean[threadIdx.x] = mean;
    sm2[threadIdx.x] = m2;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
        if (threadIdx.x < stride) {
            A a = sn[threadIdx.x], b = smean[threadIdx.x], c = sm2[threadIdx.x];
            chan_merge(a, b, c, sn[threadIdx.x + stride], smean[threadIdx.x + stride],
                       sm2[threadIdx.x + stride]);
            sn[threadIdx.x] = a;
            smean[threadIdx.x] = b;
            sm2[threadIdx.x] = c;
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        A* p = partial + (ch * g.slices + s) * 3;
        p[0] = sn[0];
        p[1] = smean[0];
        p[2] = sm2[0];
    }
}

// Channel `ch` of the statistics rows (length C): mean, biased variance,
// 1/sqrt(variance + eps), from its partials merged in slice order.
template <typename A>
__device__ void bn_stats_merge(const volatile A* partial, A* out, BnGeom g, double eps,
                               int64_t ch) {
    A n = 0, mean = 0, m2 = 0;
    for (int64_t s = 0; s < g.slices; ++s) {
        const volatile A* p = partial + (ch * g.slices + s) * 3;
        chan_merge(n, mean, m2, (A)p[0], (A)p[1], (A)p[2]);
    }
    A var = n > 0 ? m2 / n : (A)0;
    out[ch] = mean;
    out[g.c + ch] = var;
    out[2 * g.c + ch] = (A)1 / sqrt(var + (A)eps);
}

// out rows (length C) from the partials, a thread per channel.
template <typename A>
__device__ void bn_stats_final(const A* partial, A* out, BnGeom g, double eps) {
    int64_t ch = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (ch < g.c) bn_stats_merge<A>(partial, out, g, eps, ch);
}

// The partials and, in the channel's last block to finish, their merge: the statistics
// in one launch. `done` holds a zero counter per channel.
template <typename T>
__device__ void bn_stats(const T* x, typename Acc<T>::type* partial, typename Acc<T>::type* out,
                         unsigned* done, BnGeom g, double eps) {
    const int64_t ch = channel();
    if (ch >= g.c) return;
    bn_stats_partial<T>(x, partial, g);
    if (last_block(done + ch, (unsigned)g.slices) && threadIdx.x == 0)
        bn_stats_merge<typename Acc<T>::type>(partial, out, g, eps, ch);
}

template <typename T>
__device__ void bn_apply(const T* x, const typename Acc<T>::type* gamma,
                         const typename Acc<T>::type* beta, const typename Acc<T>::type* mean,
                         const typename Acc<T>::type* invstd, T* y, BnGeom g, int relu) {
    typedef typename Acc<T>::type A;
    int64_t total = g.n * g.c * g.hw;
    GRID_STRIDE(i, total) {
        int64_t r, ch;
        div_by(div_by(i, g.hw, g.hw_mul, g.hw_shift, r), g.c, g.c_mul, g.c_shift, ch);
        A v = (to_acc(x[i]) - mean[ch]) * invstd[ch] * gamma[ch] + beta[ch];
        if (relu && v <= 0) v = 0;  // a NaN stays NaN, as in PyTorch
        y[i] = from_acc<T>(v);
    }
}

// The output gradient where the rectified output is positive (PyTorch's ReLU gradient).
template <typename T>
__device__ __forceinline__ typename Acc<T>::type masked(const T* dy, const T* y, int64_t i,
                                                        int relu) {
    typedef typename Acc<T>::type A;
    A d = to_acc(dy[i]);
    if (relu && !(to_acc(y[i]) > 0)) d = 0;
    return d;
}

// partial[(ch * slices + s) * 2 + {0,1}] = (sum g, sum g * xhat) over one slice.
template <typename T>
__device__ void bn_bwd_partial(const T* x, const T* dy, const T* y,
                               const typename Acc<T>::type* mean,
                               const typename Acc<T>::type* invstd,
                               typename Acc<T>::type* partial, BnGeom g, int relu) {
    typedef typename Acc<T>::type A;
    __shared__ A s0[THREADS], s1[THREADS];
    int64_t ch = channel(), s = blockIdx.x, m = g.n * g.hw;
    if (ch >= g.c) return;
    int64_t chunk = (m + g.slices - 1) / g.slices;
    int64_t lo = s * chunk, hi = min(lo + chunk, m);
    A a = 0, b = 0;
    const A mu = mean[ch], is = invstd[ch];
    // Four elements' loads first, then their sums in order (as in bn_stats_partial).
    const int64_t step = blockDim.x;
    int64_t e = lo + threadIdx.x;
    for (; e + 3 * step < hi; e += 4 * step) {
        int64_t i[4] = {at(g, ch, e), at(g, ch, e + step), at(g, ch, e + 2 * step),
                        at(g, ch, e + 3 * step)};
        A d[4], xv[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            d[k] = masked(dy, y, i[k], relu);
            xv[k] = to_acc(x[i[k]]);
        }
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            a += d[k];
            b += d[k] * (xv[k] - mu) * is;
        }
    }
    for (; e < hi; e += step) {
        int64_t i = at(g, ch, e);
        A d = masked(dy, y, i, relu);
        a += d;
        b += d * (to_acc(x[i]) - mu) * is;
    }
    block_sum2(s0, s1, a, b);
    if (threadIdx.x == 0) {
        partial[(ch * g.slices + s) * 2] = s0[0];
        partial[(ch * g.slices + s) * 2 + 1] = s1[0];
    }
}

// out[ch] = sum g (the shift's gradient), out[C + ch] = sum g * xhat (the scale's), from
// channel `ch`'s partials added in slice order.
template <typename A>
__device__ void bn_bwd_merge(const volatile A* partial, A* out, BnGeom g, int64_t ch) {
    A a = 0, b = 0;
    for (int64_t s = 0; s < g.slices; ++s) {
        a += (A)partial[(ch * g.slices + s) * 2];
        b += (A)partial[(ch * g.slices + s) * 2 + 1];
    }
    out[ch] = a;
    out[g.c + ch] = b;
}

// The sums from the partials, a thread per channel.
template <typename A>
__device__ void bn_bwd_final(const A* partial, A* out, BnGeom g) {
    int64_t ch = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (ch < g.c) bn_bwd_merge<A>(partial, out, g, ch);
}

// The partials and, in the channel's last block to finish, their sums: one launch.
template <typename T>
__device__ void bn_bwd_sums(const T* x, const T* dy, const T* y,
                            const typename Acc<T>::type* mean,
                            const typename Acc<T>::type* invstd,
                            typename Acc<T>::type* partial, typename Acc<T>::type* out,
                            unsigned* done, BnGeom g, int relu) {
    const int64_t ch = channel();
    if (ch >= g.c) return;
    bn_bwd_partial<T>(x, dy, y, mean, invstd, partial, g, relu);
    if (last_block(done + ch, (unsigned)g.slices) && threadIdx.x == 0)
        bn_bwd_merge<typename Acc<T>::type>(partial, out, g, ch);
}

// dx = gamma * invstd * (g - [batch statistics] (sum g + xhat * sum g xhat) / M).
template <typename T>
__device__ void bn_bwd_data(const T* x, const T* dy, const T* y,
                            const typename Acc<T>::type* gamma, const typename Acc<T>::type* mean,
                            const typename Acc<T>::type* invstd, const typename Acc<T>::type* sums,
                            T* dx, BnGeom g, int relu, int batch_stats) {
    typedef typename Acc<T>::type A;
    int64_t total = g.n * g.c * g.hw;
    A inv_m = (A)1 / (A)(g.n * g.hw);
    GRID_STRIDE(i, total) {
        int64_t r, ch;
        div_by(div_by(i, g.hw, g.hw_mul, g.hw_shift, r), g.c, g.c_mul, g.c_shift, ch);
        A d = masked(dy, y, i, relu);
        if (batch_stats) {
            A xhat = (to_acc(x[i]) - mean[ch]) * invstd[ch];
            d -= (sums[ch] + xhat * sums[g.c + ch]) * inv_m;
        }
        dx[i] = from_acc<T>(d * gamma[ch] * invstd[ch]);
    }
}

// running = (1 - momentum) running + momentum factor (batch + shift), over n channels; the
// shift (a folded convolution bias moving the mean) only when `has_shift`.
template <typename A>
__device__ void bn_update_running(A* running, const A* batch, const A* shift, int64_t n,
                                  double momentum, double factor, int has_shift) {
    GRID_STRIDE(i, n) {
        A b = has_shift ? batch[i] + shift[i] : batch[i];
        running[i] = (A)((1.0 - momentum) * running[i] + momentum * factor * b);
    }
}

#define ACC(T) Acc<T>::type
#define BN_KERNELS(T, SUF)                                                                      \
    extern "C" __global__ void bn_stats_partial_##SUF(const T* x, ACC(T) * partial, BnGeom g) { \
        bn_stats_partial<T>(x, partial, g);                                                     \
    }                                                                                           \
    extern "C" __global__ void bn_stats_##SUF(const T* x, ACC(T) * partial, ACC(T) * out,       \
                                              unsigned* done, BnGeom g, double eps) {           \
        bn_stats<T>(x, partial, out, done, g, eps);                                             \
    }                                                                                           \
    extern "C" __global__ void bn_bwd_sums_##SUF(                                               \
        const T* x, const T* dy, const T* y, const ACC(T) * mean, const ACC(T) * invstd,        \
        ACC(T) * partial, ACC(T) * out, unsigned* done, BnGeom g, int relu) {                   \
        bn_bwd_sums<T>(x, dy, y, mean, invstd, partial, out, done, g, relu);                    \
    }                                                                                           \
    extern "C" __global__ void bn_apply_##SUF(const T* x, const ACC(T) * gamma,                 \
                                              const ACC(T) * beta, const ACC(T) * mean,         \
                                              const ACC(T) * invstd, T* y, BnGeom g, int relu) { \
        bn_apply<T>(x, gamma, beta, mean, invstd, y, g, relu);                                  \
    }                                                                                           \
    extern "C" __global__ void bn_bwd_partial_##SUF(const T* x, const T* dy, const T* y,        \
                                                    const ACC(T) * mean, const ACC(T) * invstd, \
                                                    ACC(T) * partial, BnGeom g, int relu) {     \
        bn_bwd_partial<T>(x, dy, y, mean, invstd, partial, g, relu);                            \
    }                                                                                           \
    extern "C" __global__ void bn_bwd_data_##SUF(                                               \
        const T* x, const T* dy, const T* y, const ACC(T) * gamma, const ACC(T) * mean,         \
        const ACC(T) * invstd, const ACC(T) * sums, T* dx, BnGeom g, int relu, int batch_stats) { \
        bn_bwd_data<T>(x, dy, y, gamma, mean, invstd, sums, dx, g, relu, batch_stats);          \
    }

FOR_EACH_DTYPE(BN_KERNELS)

#define BN_ACC_KERNELS(A, SUF)                                                                  \
    extern "C" __global__ void bn_stats_final_##SUF(const A* p, A* out, BnGeom g, double eps) { \
        bn_stats_final<A>(p, out, g, eps);                                                      \
    }                                                                                           \
    extern "C" __global__ void bn_bwd_final_##SUF(const A* p, A* out, BnGeom g) {               \
        bn_bwd_final<A>(p, out, g);                                                             \
    }                                                                                           \
    extern "C" __global__ void bn_update_running_##SUF(A* running, const A* batch,              \
                                                       const A* shift, int64_t n,               \
                                                       double momentum, double factor,          \
                                                       int has_shift) {                         \
        bn_update_running<A>(running, batch, shift, n, momentum, factor, has_shift);            \
    }

BN_ACC_KERNELS(float, f32)
BN_ACC_KERNELS(double, f64)
