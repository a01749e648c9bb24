// One optimiser step in two in-place passes (state, then parameter), torch.optim's
// formulas for SGD (momentum, dampening, Nesterov), RMSprop (centred; TensorFlow's
// variant) and Adam / AdamW. The state is [3, n]: rows a, b, c. Arithmetic in double;
// parameters and state are f32 or f64. And the gradients' summed squares that clipping
// scales by, over many tensors per launch.
#include "common.cuh"

#define THREADS 256
// Tensors per launch of sumsq_partial, and elements per block.
#define SUMSQ_TENSORS 64
#define SUMSQ_CHUNK 4096

struct StepArgs {
    int kind, first, nesterov, centered, tf_style, pad;
    double scale, wd_l2, wd_decoupled, lr, momentum, dampening, alpha, eps, beta1, beta2, bc1,
        bc2;
    uint64_t live;      // address of {lr, bc1, bc2} read instead of the fields when not 0
    uint64_t sumsq_at;  // address of the gradients' summed squares: clip to max_norm
    double max_norm;
};

// The step's learning rate and bias corrections from `live` when it is set (a step
// captured in a CUDA graph reads each replay's values there), else as passed; and with
// `sumsq_at`, the gradient scale of clipping to `max_norm` from the global norm on the
// device (torch.nn.utils.clip_grad_norm_: min(1, max / (norm + 1e-6)), a NaN norm
// giving a NaN scale as torch.clamp does), instead of `scale`.
__device__ __forceinline__ StepArgs resolved(StepArgs s) {
    if (s.live) {
        const double* v = (const double*)s.live;
        s.lr = v[0];
        s.bc1 = v[1];
        s.bc2 = v[2];
    }
    if (s.sumsq_at) {
        double c = s.max_norm / (sqrt(*(const double*)s.sumsq_at) + 1e-6);
        s.scale = c > 1.0 ? 1.0 : c;
    }
    return s;
}

// Whether the update reads and writes state row 0 (a), 1 (b) or 2 (c): the others are
// neither loaded nor stored (Adam's c, SGD's b and c), as OptimizerKind::uses_row says.
__device__ __forceinline__ bool uses_row(const StepArgs& s, int row) {
    if (row == 0)
        return s.kind == 0 ? s.momentum != 0.0 : (s.kind == 2 || s.tf_style || s.momentum > 0.0);
    if (row == 1) return s.kind != 0;
    return s.kind == 1 && s.centered;
}

__device__ __forceinline__ double rms_ratio(const StepArgs& s, double g, double b, double c) {
    double var = s.centered ? b - c * c : b;
    return s.tf_style ? g / sqrt(var + s.eps) : g / (sqrt(var) + s.eps);
}

template <typename T>
__device__ void update_state(T* st, const T* grad, const T* param, int64_t n, StepArgs s) {
    s = resolved(s);
    const bool ua = uses_row(s, 0), ub = uses_row(s, 1), uc = uses_row(s, 2);
    GRID_STRIDE(i, n) {
        double g = s.scale * (double)grad[i] + s.wd_l2 * (double)param[i];
        double a = ua ? (double)st[i] : 0.0, b = ub ? (double)st[n + i] : 0.0;
        double c = uc ? (double)st[2 * n + i] : 0.0;
        if (s.kind == 0) {
            if (s.momentum != 0.0) a = s.first ? g : s.momentum * a + (1.0 - s.dampening) * g;
        } else if (s.kind == 1) {
            b = s.alpha * b + (1.0 - s.alpha) * g * g;
            if (s.centered) c = s.alpha * c + (1.0 - s.alpha) * g;
            double ratio = rms_ratio(s, g, b, c);
            if (s.tf_style)
                a = s.momentum * a + s.lr * ratio;
            else if (s.momentum > 0.0)
                a = s.momentum * a + ratio;
        } else {
            a = s.beta1 * a + (1.0 - s.beta1) * g;
            b = s.beta2 * b + (1.0 - s.beta2) * g * g;
        }
        if (ua) st[i] = (T)a;
        if (ub) st[n + i] = (T)b;
        if (uc) st[2 * n + i] = (T)c;
    }
}

template <typename T>
__device__ void update_param(T* param, const T* grad, const T* st, int64_t n, StepArgs s) {
    s = resolved(s);
    const bool ua = uses_row(s, 0), ub = uses_row(s, 1), uc = uses_row(s, 2);
    GRID_STRIDE(i, n) {
        double p = param[i];
        double g = s.scale * (double)grad[i] + s.wd_l2 * p;
        double a = ua ? (double)st[i] : 0.0, b = ub ? (double)st[n + i] : 0.0;
        double c = uc ? (double)st[2 * n + i] : 0.0;
        if (s.kind == 0) {
            double d = s.momentum == 0.0 ? g : (s.nesterov ? g + s.momentum * a : a);
            p -= s.lr * d;
        } else if (s.kind == 1) {
            if (s.tf_style)
                p -= a;
            else if (s.momentum > 0.0)
                p -= s.lr * a;
            else
                p -= s.lr * rms_ratio(s, g, b, c);
        } else {
            p *= 1.0 - s.lr * s.wd_decoupled;
            p -= (s.lr / s.bc1) * (a / (sqrt(b / s.bc2) + s.eps));
        }
        param[i] = (T)p;
    }
}

#define OPTIM_KERNELS(T, SUF)                                                                 \
    extern "C" __global__ void optim_state_##SUF(T* st, const T* grad, const T* param,       \
                                                 int64_t n, StepArgs s) {                    \
        update_state<T>(st, grad, param, n, s);                                              \
    }                                                                                         \
    extern "C" __global__ void optim_param_##SUF(T* param, const T* grad, const T* st,       \
                                                 int64_t n, StepArgs s) {                    \
        update_param<T>(param, grad, st, n, s);                                              \
    }

OPTIM_KERNELS(float, f32)
OPTIM_KERNELS(double, f64)

// Up to SUMSQ_TENSORS tensors of one launch (src/cuda.rs fills it, src/sumsq.rs plans it): tensor i's
// address and length, and the first of its ceil(len / SUMSQ_CHUNK) blocks. `blocks` is
// the launch's grid, `base` where its blocks' partial sums start in the output.
struct SumsqTable {
    uint64_t data[SUMSQ_TENSORS];
    int64_t len[SUMSQ_TENSORS];
    uint32_t first_block[SUMSQ_TENSORS];
    uint32_t count, blocks, base, pad;
};

// partial[base + b] = the sum of squares (in double) of block b's chunk: SUMSQ_CHUNK
// elements of the tensor the block falls in. Every chunk is summed in the same order on
// every run, so the total is deterministic.
template <typename T>
__device__ void sumsq_partial(const SumsqTable& t, double* partial) {
    __shared__ double s[THREADS];
    const unsigned b = blockIdx.x;
    // The last tensor whose first block is b or before (no tensor is empty).
    unsigned lo = 0, hi = t.count;
    while (hi - lo > 1) {
        unsigned mid = (lo + hi) / 2;
        if (t.first_block[mid] <= b) lo = mid;
        else hi = mid;
    }
    const T* x = (const T*)t.data[lo];
    const int64_t start = (int64_t)(b - t.first_block[lo]) * SUMSQ_CHUNK;
    const int64_t end = min(start + (int64_t)SUMSQ_CHUNK, t.len[lo]);
    double acc = 0.0;
    for (int64_t i = start + threadIdx.x; i < end; i += blockDim.x) {
        double v = (double)x[i];
        acc += v * v;
    }
    block_sum(s, acc);
    if (threadIdx.x == 0) partial[t.base + b] = s[0];
}

// out[0] = the sum of partial[0..n], by one block in a fixed order.
template <typename A>
__device__ void sumsq_total(const A* partial, int64_t n, A* out) {
    __shared__ A s[THREADS];
    A acc = 0.0;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) acc += partial[i];
    block_sum(s, acc);
    if (threadIdx.x == 0) out[0] = s[0];
}

#define SUMSQ_PARTIAL(T, SUF)                                                                 \
    extern "C" __global__ void sumsq_partial_##SUF(SumsqTable t, double* partial) {          \
        sumsq_partial<T>(t, partial);                                                         \
    }
#define SUMSQ_TOTAL(A, SUF)                                                                   \
    extern "C" __global__ void sumsq_total_##SUF(const A* partial, int64_t n, A* out) {      \
        sumsq_total<A>(partial, n, out);                                                      \
    }

SUMSQ_PARTIAL(float, f32)
SUMSQ_PARTIAL(double, f64)
SUMSQ_TOTAL(double, f64)
