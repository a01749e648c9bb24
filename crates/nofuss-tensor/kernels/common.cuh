// Shared helpers of nofuss's CUDA kernels: element types and their accumulators.
#pragma once
#ifdef NOFUSS_HOST_EMULATION
#include "host_emulation.h"  // the kernels compiled as plain C++ (tests/kernels_on_host)
#else
#include <cuda_bf16.h>
#endif
#include <stdint.h>

// Accumulator of an element type: float for float and bfloat16, double for double.
template <typename T> struct Acc { typedef float type; };
template <> struct Acc<double> { typedef double type; };

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_acc(typename Acc<T>::type v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
    return __float2bfloat16(v);
}

template <typename A> __device__ __forceinline__ A neg_inf();
template <> __device__ __forceinline__ float neg_inf<float>() { return -__int_as_float(0x7f800000); }
template <> __device__ __forceinline__ double neg_inf<double>() {
    return -__longlong_as_double(0x7ff0000000000000LL);
}

// q = a / b with r = a % b, for a >= 0, b > 0: in 32-bit arithmetic when both fit (the
// usual case; 64-bit division takes many times longer on a GPU).
__device__ __forceinline__ int64_t divmod(int64_t a, int64_t b, int64_t& r) {
    if ((uint64_t)a <= 0xffffffffULL && (uint64_t)b <= 0xffffffffULL) {
        uint32_t q = (uint32_t)a / (uint32_t)b;
        r = (int64_t)((uint32_t)a - q * (uint32_t)b);
        return q;
    }
    int64_t q = a / b;
    r = a - q * b;
    return q;
}

// q = a / d with r = a % d, for 0 <= a < 2^31, from the launch's (mul, shift) for d
// (src/fast_div.rs: a multiply-high, an add and a shift instead of a division, which a
// GPU runs on its slow special-function units); by divmod where mul is 0, the
// launcher's sign that the dividends may not fit.
__device__ __forceinline__ int64_t div_by(int64_t a, int64_t d, uint32_t mul, uint32_t shift,
                                          int64_t& r) {
    if (mul != 0) {
        uint32_t x = (uint32_t)a;
        uint32_t q = (__umulhi(x, mul) + x) >> shift;
        r = (int64_t)(x - q * (uint32_t)d);
        return q;
    }
    return divmod(a, d, r);
}

#ifdef NOFUSS_HOST_EMULATION
// (mul, shift) for d and dividends below max_a, as src/fast_div.rs computes them (the
// host harness fills the geometry structs with these).
inline void fast_div_params(int64_t d, int64_t max_a, uint32_t& mul, uint32_t& shift) {
    const uint64_t limit = 1ULL << 31;
    mul = shift = 0;
    if (d <= 0 || (uint64_t)d >= limit || (uint64_t)max_a > limit) return;
    while ((1ULL << shift) < (uint64_t)d) ++shift;
    mul = (uint32_t)(((1ULL << 32) * ((1ULL << shift) - (uint64_t)d)) / (uint64_t)d + 1);
}
#endif

// Sums `a` over the threads of a block (blockDim.x a power of two) through the shared
// array `s` (blockDim.x entries); the total ends in s[0], which every thread may read on
// return.
template <typename A>
__device__ __forceinline__ void block_sum(A* s, A a) {
    s[threadIdx.x] = a;
    __syncthreads();
    for (unsigned stride = blockDim.x / 2; stride > 0; stride >>= 1) {
        if (threadIdx.x < stride) s[threadIdx.x] += s[threadIdx.x + stride];
        __syncthreads();
    }
}

// Sums `a` and `b` over the threads of a block (blockDim.x a power of two) through the
// shared arrays `s0` and `s1` (blockDim.x entries each); the totals end in s0[0] and
// s1[0], which every thread may read on return.
template <typename A>
__device__ __forceinline__ void block_sum2(A* s0, A* s1, A a, A b) {
    s0[threadIdx.x] = a;
    s1[threadIdx.x] = b;
    __syncthreads();
    for (unsigned stride = blockDim.x / 2; stride > 0; stride >>= 1) {
        if (threadIdx.x < stride) {
            s0[threadIdx.x] += s0[threadIdx.x + stride];
            s1[threadIdx.x] += s1[threadIdx.x + stride];
        }
        __syncthreads();
    }
}

// Whether this block is the last of `count` blocks to arrive at `*counter` (zero before the
// first of them arrives; the last resets it for the next launch). What thread 0 wrote
// before the call is visible to the block that gets true, which should read it through
// a volatile pointer (past the SM's own cache). Every thread of the block must call it.
__device__ __forceinline__ bool last_block(unsigned* counter, unsigned count) {
    __shared__ int last;
    if (threadIdx.x == 0) {
        __threadfence();
        last = atomicAdd(counter, 1u) == count - 1;
        if (last) *counter = 0;
    }
    __syncthreads();
    return last != 0;
}

#define GRID_STRIDE(i, n) \
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < (n); \
         i += (int64_t)blockDim.x * gridDim.x)

// Instantiates `NAME_f32`, `NAME_f64` and `NAME_bf16` from a template kernel `NAME<T>`
// whose parameter list is `ARGS` (with `T` standing for the element type).
#define FOR_EACH_DTYPE(MACRO) \
    MACRO(float, f32)         \
    MACRO(double, f64)        \
    MACRO(__nv_bfloat16, bf16)
