// One optimiser step in two in-place passes (state, then parameter), torch.optim's
// formulas for SGD (momentum, dampening, Nesterov), RMSprop (centred; TensorFlow's
// variant) and Adam / AdamW. The state is [3, n]: rows a, b, c. Arithmetic in double;
// parameters and state are f32 or f64.
#include "common.cuh"

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
