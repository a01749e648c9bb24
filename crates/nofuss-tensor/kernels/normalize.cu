// Scaled L2 normalisation of the rows of a contiguous [N, D] matrix,
//   y = s x / c,  c = |x| if |x| > eps, else eps   (a zero row stays zero),
// and its gradient, dx = s/c (g - x (g.x) / |x|^2) (just s/eps g where c = eps).
// One block per row: a shared-memory reduction of the row's sums, then one pass.
#include "common.cuh"

#define THREADS 256

// Sums of x*x and, when `g` is given, g*x over row `r`, reduced across the block.
template <typename T>
__device__ void row_sums(const T* x, const T* g, int64_t d, typename Acc<T>::type& xx,
                         typename Acc<T>::type& gx) {
    typedef typename Acc<T>::type A;
    __shared__ A s_xx[THREADS], s_gx[THREADS];
    A a = 0, b = 0;
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
        A v = to_acc(x[j]);
        a += v * v;
        if (g) b += to_acc(g[j]) * v;
    }
    block_sum2(s_xx, s_gx, a, b);
    xx = s_xx[0];
    gx = s_gx[0];
}

template <typename T>
__device__ void l2n_fwd(const T* x, T* y, int64_t d, double scale, double eps) {
    typedef typename Acc<T>::type A;
    const int64_t off = (int64_t)blockIdx.x * d;
    A xx, gx;
    row_sums<T>(x + off, (const T*)0, d, xx, gx);
    A norm = sqrt(xx);
    A c = norm > (A)eps ? (A)scale / norm : (A)scale / (A)eps;
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x) y[off + j] = from_acc<T>(to_acc(x[off + j]) * c);
}

template <typename T>
__device__ void l2n_bwd(const T* x, const T* g, T* dx, int64_t d, double scale, double eps) {
    typedef typename Acc<T>::type A;
    const int64_t off = (int64_t)blockIdx.x * d;
    A xx, gx;
    row_sums<T>(x + off, g + off, d, xx, gx);
    A norm = sqrt(xx);
    bool unit = norm > (A)eps;
    A c = unit ? (A)scale / norm : (A)scale / (A)eps;
    A k = unit ? gx / xx : (A)0;
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x)
        dx[off + j] = from_acc<T>(c * (to_acc(g[off + j]) - to_acc(x[off + j]) * k));
}

#define L2N_KERNELS(T, SUF)                                                                   \
    extern "C" __global__ void l2n_fwd_##SUF(const T* x, T* y, int64_t d, double scale,       \
                                             double eps) {                                    \
        l2n_fwd<T>(x, y, d, scale, eps);                                                      \
    }                                                                                         \
    extern "C" __global__ void l2n_bwd_##SUF(const T* x, const T* g, T* dx, int64_t d,       \
                                             double scale, double eps) {                      \
        l2n_bwd<T>(x, g, dx, d, scale, eps);                                                  \
    }

FOR_EACH_DTYPE(L2N_KERNELS)
