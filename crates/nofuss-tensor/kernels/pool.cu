// 2-D max and average pooling with padding and ceil mode (PyTorch's semantics), forward
// and backward, over contiguous NCHW planes. Max pooling keeps each window's argmax for
// its backward pass. Backward kernels gather (one thread per input element) so they need
// no atomics and are deterministic.
#include "common.cuh"

struct PoolGeom {
    int64_t planes;
    int h, w, oh, ow, k, s, p;
    // div_by's (mul, shift) for ow and oh (forward: 0 when planes * oh * ow does not fit),
    // for w and h (backward: 0 when planes * h * w does not fit) and for the stride
    // (backward: a row or column plus the padding).
    uint32_t ow_mul, ow_shift, oh_mul, oh_shift, w_mul, w_shift, h_mul, h_shift, s_mul, s_shift;
};

// Output element i's (plane, row, column).
__device__ __forceinline__ int64_t out_at(const PoolGeom& g, int64_t i, int64_t& yo,
                                          int64_t& xo) {
    return div_by(div_by(i, g.ow, g.ow_mul, g.ow_shift, xo), g.oh, g.oh_mul, g.oh_shift, yo);
}

// Input element i's (plane, row, column).
__device__ __forceinline__ int64_t in_at(const PoolGeom& g, int64_t i, int64_t& r, int64_t& c) {
    return div_by(div_by(i, g.w, g.w_mul, g.w_shift, c), g.h, g.h_mul, g.h_shift, r);
}

// Window of output (y, x): [hs, he) x [ws, we), clipped to the input.
__device__ __forceinline__ void window(const PoolGeom& g, int y, int x, int& hs, int& he,
                                       int& ws, int& we) {
    hs = y * g.s - g.p;
    ws = x * g.s - g.p;
    he = min(hs + g.k, g.h);
    we = min(ws + g.k, g.w);
    hs = max(hs, 0);
    ws = max(ws, 0);
}

// PyTorch's divisor: the window clipped to the padded input, or to the input itself.
__device__ __forceinline__ int avg_divisor(const PoolGeom& g, int y, int x, bool include_pad) {
    int hs = y * g.s - g.p, ws = x * g.s - g.p;
    int he = min(hs + g.k, g.h + g.p), we = min(ws + g.k, g.w + g.p);
    if (include_pad) return (he - hs) * (we - ws);
    he = min(he, g.h);
    we = min(we, g.w);
    return (he - max(hs, 0)) * (we - max(ws, 0));
}

// Position in the plane of the first maximum of the window (a NaN wins, as in PyTorch).
template <typename T>
__device__ __forceinline__ int argmax(const T* plane, const PoolGeom& g, int y, int x) {
    typedef typename Acc<T>::type A;
    int hs, he, ws, we;
    window(g, y, x, hs, he, ws, we);
    int best = hs * g.w + ws;
    A m = neg_inf<A>();
    for (int yy = hs; yy < he; ++yy)
        for (int xx = ws; xx < we; ++xx) {
            A v = to_acc(plane[yy * g.w + xx]);
            if (v > m || isnan(v)) {
                m = v;
                best = yy * g.w + xx;
            }
        }
    return best;
}

// Outputs whose windows contain input row `r` of `out` output rows: [lo, hi] (the
// stride's divisions by div_by).
__device__ __forceinline__ void covering(const PoolGeom& g, int r, int out, int& lo, int& hi) {
    int64_t rem;
    const int a = r + g.p;
    lo = (a < g.k) ? 0 : (int)div_by(a - g.k, g.s, g.s_mul, g.s_shift, rem) + 1;
    hi = min((int)div_by(a, g.s, g.s_mul, g.s_shift, rem), out - 1);
}

// y and, for the backward pass, each window's argmax position in its plane.
template <typename T>
__device__ void max_pool_fwd(const T* x, T* y, uint32_t* idx, PoolGeom g) {
    int64_t n = g.planes * g.oh * g.ow;
    GRID_STRIDE(i, n) {
        int64_t xo, yo, b = out_at(g, i, yo, xo);
        const T* plane = x + b * g.h * g.w;
        int a = argmax(plane, g, yo, xo);
        y[i] = plane[a];
        idx[i] = (uint32_t)a;
    }
}

// dx at an input element: the output gradients of the windows whose argmax it is.
template <typename T>
__device__ void max_pool_bwd(const uint32_t* idx, const T* dy, T* dx, PoolGeom g) {
    typedef typename Acc<T>::type A;
    int64_t n = g.planes * g.h * g.w;
    GRID_STRIDE(i, n) {
        int64_t c, r, b = in_at(g, i, r, c);
        const uint32_t* win = idx + b * g.oh * g.ow;
        const T* grad = dy + b * g.oh * g.ow;
        int ylo, yhi, xlo, xhi;
        covering(g, r, g.oh, ylo, yhi);
        covering(g, c, g.ow, xlo, xhi);
        uint32_t self = (uint32_t)(r * g.w + c);
        A acc = 0;
        for (int yo = ylo; yo <= yhi; ++yo)
            for (int xo = xlo; xo <= xhi; ++xo)
                if (win[yo * g.ow + xo] == self) acc += to_acc(grad[yo * g.ow + xo]);
        dx[i] = from_acc<T>(acc);
    }
}

template <typename T>
__device__ void avg_pool_fwd(const T* x, T* y, PoolGeom g, int include_pad) {
    typedef typename Acc<T>::type A;
    int64_t n = g.planes * g.oh * g.ow;
    GRID_STRIDE(i, n) {
        int64_t xo, yo, b = out_at(g, i, yo, xo);
        const T* plane = x + b * g.h * g.w;
        int hs, he, ws, we;
        window(g, yo, xo, hs, he, ws, we);
        A acc = 0;
        for (int yy = hs; yy < he; ++yy)
            for (int xx = ws; xx < we; ++xx) acc += to_acc(plane[yy * g.w + xx]);
        y[i] = from_acc<T>(acc / (A)avg_divisor(g, yo, xo, include_pad != 0));
    }
}

template <typename T>
__device__ void avg_pool_bwd(const T* dy, T* dx, PoolGeom g, int include_pad) {
    typedef typename Acc<T>::type A;
    int64_t n = g.planes * g.h * g.w;
    GRID_STRIDE(i, n) {
        int64_t c, r, b = in_at(g, i, r, c);
        const T* grad = dy + b * g.oh * g.ow;
        int ylo, yhi, xlo, xhi;
        covering(g, r, g.oh, ylo, yhi);
        covering(g, c, g.ow, xlo, xhi);
        A acc = 0;
        for (int yo = ylo; yo <= yhi; ++yo)
            for (int xo = xlo; xo <= xhi; ++xo)
                acc += to_acc(grad[yo * g.ow + xo]) / (A)avg_divisor(g, yo, xo, include_pad != 0);
        dx[i] = from_acc<T>(acc);
    }
}

#define POOL_KERNELS(T, SUF)                                                                 \
    extern "C" __global__ void max_pool_fwd_##SUF(const T* x, T* y, uint32_t* idx,          \
                                                  PoolGeom g) {                              \
        max_pool_fwd<T>(x, y, idx, g);                                                       \
    }                                                                                        \
    extern "C" __global__ void max_pool_bwd_##SUF(const uint32_t* idx, const T* dy, T* dx,   \
                                                  PoolGeom g) {                              \
        max_pool_bwd<T>(idx, dy, dx, g);                                                     \
    }                                                                                        \
    extern "C" __global__ void avg_pool_fwd_##SUF(const T* x, T* y, PoolGeom g, int inc) {    \
        avg_pool_fwd<T>(x, y, g, inc);                                                       \
    }                                                                                        \
    extern "C" __global__ void avg_pool_bwd_##SUF(const T* dy, T* dx, PoolGeom g, int inc) {  \
        avg_pool_bwd<T>(dy, dx, g, inc);                                                     \
    }

FOR_EACH_DTYPE(POOL_KERNELS)
