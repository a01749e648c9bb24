// One optimiser step of many parameters per launch, in place (the state, then the
// parameter, per element), torch.optim's formulas for SGD (momentum, dampening,
// Nesterov), RMSprop (centred; TensorFlow's variant) and Adam / AdamW. A parameter's
// state is [3, n]: rows a, b, c. Arithmetic in double; parameters and state are f32 or
// f64. And the gradients' summed squares that clipping scales by, over many tensors per
// launch.
#include "common.cuh"

#define THREADS 256
// Tensors per launch of the many-tensor kernels (optim_step, sumsq_partial), and
// elements per block.
#define TABLE_TENSORS 64
#define TABLE_CHUNK 4096

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

// One element's new state (a, b, c) in place, from its effective gradient `g`.
__device__ __forceinline__ void new_state(const StepArgs& s, double g, double& a, double& b,
                                          double& c) {
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
}

// One parameter element's new value from `g`, its old value `p` and its updated state.
__device__ __forceinline__ double new_param(const StepArgs& s, double g, double p, double a,
                                            double b, double c) {
    if (s.kind == 0) {
        double d = s.momentum == 0.0 ? g : (s.nesterov ? g + s.momentum * a : a);
        return p - s.lr * d;
    }
    if (s.kind == 1) {
        if (s.tf_style) return p - a;
        if (s.momentum > 0.0) return p - s.lr * a;
        return p - s.lr * rms_ratio(s, g, b, c);
    }
    p *= 1.0 - s.lr * s.wd_decoupled;
    return p - (s.lr / s.bc1) * (a / (sqrt(b / s.bc2) + s.eps));
}

// Up to TABLE_TENSORS parameters of one launch, each with its gradient and its state
// [3, len] (src/cuda.rs fills it, src/tables.rs plans it): addresses, lengths and the
// first of each tensor's ceil(len / TABLE_CHUNK) blocks; `blocks` is the launch's grid.
struct OptimTable {
    uint64_t param[TABLE_TENSORS];
    uint64_t grad[TABLE_TENSORS];
    uint64_t state[TABLE_TENSORS];
    int64_t len[TABLE_TENSORS];
    uint32_t first_block[TABLE_TENSORS];
    uint32_t count, blocks;
};

// The table entry block `b` falls in: the last whose first block is b or before (no
// entry is empty).
__device__ __forceinline__ unsigned entry_of(const uint32_t* first_block, unsigned count,
                                             unsigned b) {
    unsigned lo = 0, hi = count;
    while (hi - lo > 1) {
        unsigned mid = (lo + hi) / 2;
        if (first_block[mid] <= b) lo = mid;
        else hi = mid;
    }
    return lo;
}

// One optimiser step of every tensor of the table, a block per TABLE_CHUNK elements of
// one of them: per element the state, stored in its type, then the parameter from the
// state as stored (the arithmetic of the CPU's one-pass step, UpdateBoth, in the same
// order). One launch for up
// to TABLE_TENSORS parameters of a group (torch.optim's fused/foreach steps), instead of
// two per parameter: BN-Inception's ~280 parameters took ~560 launches.
template <typename T>
__device__ void optim_step(const OptimTable& t, StepArgs s) {
    s = resolved(s);
    const bool ua = uses_row(s, 0), ub = uses_row(s, 1), uc = uses_row(s, 2);
    const unsigned e = entry_of(t.first_block, t.count, blockIdx.x);
    T* param = (T*)t.param[e];
    const T* grad = (const T*)t.grad[e];
    T* st = (T*)t.state[e];
    const int64_t n = t.len[e];
    const int64_t start = (int64_t)(blockIdx.x - t.first_block[e]) * TABLE_CHUNK;
    const int64_t end = min(start + (int64_t)TABLE_CHUNK, n);
    for (int64_t i = start + threadIdx.x; i < end; i += blockDim.x) {
        double p = param[i];
        double g = s.scale * (double)grad[i] + s.wd_l2 * p;
        double a = ua ? (double)st[i] : 0.0, b = ub ? (double)st[n + i] : 0.0;
        double c = uc ? (double)st[2 * n + i] : 0.0;
        new_state(s, g, a, b, c);
        // The rows as stored (unused rows stay 0, as they are read).
        a = (double)(T)a;
        b = (double)(T)b;
        c = (double)(T)c;
        if (ua) st[i] = (T)a;
        if (ub) st[n + i] = (T)b;
        if (uc) st[2 * n + i] = (T)c;
        param[i] = (T)new_param(s, g, p, a, b, c);
    }
}

#define OPTIM_STEP(T, SUF)                                                                    \
    extern "C" __global__ void optim_step_##SUF(OptimTable t, StepArgs s) {                 \
        optim_step<T>(t, s);                                                                  \
    }

OPTIM_STEP(float, f32)
OPTIM_STEP(double, f64)

// Up to TABLE_TENSORS tensors of one launch (src/cuda.rs fills it, src/tables.rs plans
// it): tensor i's address and length, and the first of its ceil(len / TABLE_CHUNK) blocks. `blocks` is
// the launch's grid, `base` where its blocks' partial sums start in the output.
struct SumsqTable {
    uint64_t data[TABLE_TENSORS];
    int64_t len[TABLE_TENSORS];
    uint32_t first_block[TABLE_TENSORS];
    uint32_t count, blocks, base, pad;
};

// partial[base + b] = the sum of squares (in double) of block b's chunk: TABLE_CHUNK
// elements of the tensor the block falls in. Every chunk is summed in the same order on
// every run, so the total is deterministic.
template <typename T>
__device__ void sumsq_partial(const SumsqTable& t, double* partial) {
    __shared__ double s[THREADS];
    const unsigned b = blockIdx.x, lo = entry_of(t.first_block, t.count, b);
    const T* x = (const T*)t.data[lo];
    const int64_t start = (int64_t)(b - t.first_block[lo]) * TABLE_CHUNK;
    const int64_t end = min(start + (int64_t)TABLE_CHUNK, t.len[lo]);
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
