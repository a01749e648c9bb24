// Lets the kernels compile as plain C++ on a machine without CUDA, to check their
// arithmetic and indexing against PyTorch (tests/reference/kernels_on_host). A "launch"
// runs the blocks one after another; the threads of a block run as real threads that meet
// at `__syncthreads` (a barrier), so shared-memory reductions run as they would on a GPU.
#pragma once
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static

struct EmuDim3 {
    unsigned x = 0, y = 0, z = 0;
};
inline EmuDim3 blockIdx, blockDim, gridDim;
inline thread_local EmuDim3 threadIdx;
inline std::barrier<>* emu_barrier = nullptr;
inline void __syncthreads() {
    if (emu_barrier) emu_barrier->arrive_and_wait();
}

using std::exp;
using std::isnan;
using std::log;
using std::sqrt;
template <typename A, typename B> inline auto min(A a, B b) { return a < b ? a : b; }
template <typename A, typename B> inline auto max(A a, B b) { return a > b ? a : b; }

inline float __int_as_float(int v) {
    float f;
    std::memcpy(&f, &v, 4);
    return f;
}
inline unsigned __float_as_uint(float v) {
    unsigned u;
    std::memcpy(&u, &v, 4);
    return u;
}
// The high 32 bits of a 32-bit product.
inline unsigned __umulhi(unsigned a, unsigned b) {
    return (unsigned)(((unsigned long long)a * b) >> 32);
}
// Shared-memory atomics: the block's threads are real threads here.
inline unsigned atomicAdd(unsigned* p, unsigned v) {
    return std::atomic_ref<unsigned>(*p).fetch_add(v);
}
// Blocks run one after another here, so a fence only has to order this thread's accesses.
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
// A barrier that also counts the threads whose predicate is nonzero.
inline std::atomic<int> emu_count{0};
inline int __syncthreads_count(int pred) {
    if (pred) emu_count.fetch_add(1);
    __syncthreads();
    int c = emu_count.load();
    __syncthreads();
    if (threadIdx.x == 0) emu_count.store(0);
    __syncthreads();
    return c;
}
inline double __longlong_as_double(long long v) {
    double d;
    std::memcpy(&d, &v, 8);
    return d;
}

// bfloat16 as the top 16 bits of a float, rounded to nearest even.
struct __nv_bfloat16 {
    uint16_t bits;
};
inline float __bfloat162float(__nv_bfloat16 v) {
    uint32_t u = (uint32_t)v.bits << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline __nv_bfloat16 __float2bfloat16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if (std::isnan(f)) return {0x7fc0};
    u += 0x7fff + ((u >> 16) & 1);
    return {(uint16_t)(u >> 16)};
}

// Runs a kernel over a (gx, gy, gz) grid of `threads`-thread blocks: blocks one after
// another, the threads of a block concurrently.
template <typename F>
inline void emu_launch3(unsigned gx, unsigned gy, unsigned gz, unsigned threads, F kernel) {
    gridDim = {gx, gy, gz};
    blockDim = {threads, 1, 1};
    for (unsigned bz = 0; bz < gz; ++bz)
        for (unsigned by = 0; by < gy; ++by)
            for (unsigned bx = 0; bx < gx; ++bx) {
                blockIdx = {bx, by, bz};
                std::barrier<> bar(threads);
                emu_barrier = &bar;
                std::vector<std::thread> pool;
                for (unsigned t = 0; t < threads; ++t)
                    pool.emplace_back([&, t] {
                        threadIdx = {t, 0, 0};
                        kernel();
                    });
                for (auto& th : pool) th.join();
                emu_barrier = nullptr;
            }
}

// The same over a (gx, gy) grid.
template <typename F>
inline void emu_launch(unsigned gx, unsigned gy, unsigned threads, F kernel) {
    emu_launch3(gx, gy, 1, threads, kernel);
}
