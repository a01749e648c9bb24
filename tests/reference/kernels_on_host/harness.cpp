// Runs nofuss-tensor's CUDA kernels as plain C++ (kernels/host_emulation.h) on raw
// little-endian inputs and writes raw outputs; kernels_on_host.py drives it and compares
// with PyTorch. Usage: harness OP DTYPE DIR ARGS...   (files DIR/<name>.bin)
#ifndef NOFUSS_HOST_EMULATION
#define NOFUSS_HOST_EMULATION
#endif
#include "pool.cu"
#include "batch_norm.cu"
#include "optim.cu"
#include "nca.cu"
#include "normalize.cu"
#include "distance.cu"
#include "select.cu"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

static std::string dir;

template <typename T> std::vector<T> load(const char* name) {
    std::string p = dir + "/" + name + ".bin";
    FILE* f = std::fopen(p.c_str(), "rb");
    if (!f) { std::fprintf(stderr, "cannot read %s\n", p.c_str()); std::exit(2); }
    std::fseek(f, 0, SEEK_END);
    long n = std::ftell(f);
    std::fseek(f, 0, SEEK_SET);
    std::vector<T> v(n / sizeof(T));
    if (std::fread(v.data(), sizeof(T), v.size(), f) != v.size()) std::exit(2);
    std::fclose(f);
    return v;
}

template <typename T> void save(const char* name, const std::vector<T>& v) {
    std::string p = dir + "/" + name + ".bin";
    FILE* f = std::fopen(p.c_str(), "wb");
    std::fwrite(v.data(), sizeof(T), v.size(), f);
    std::fclose(f);
}

// Stops the harness when two runs that must agree to the bit do not.
template <typename T>
void same_bits(const std::vector<T>& a, const std::vector<T>& b, const char* what) {
    if (a.size() != b.size() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) != 0) {
        std::fprintf(stderr, "%s: dividing and multiply-high indexing disagree\n", what);
        std::exit(3);
    }
}

// Grid-stride kernels: 3 blocks of 64 threads.
#define EMU1(...) emu_launch(3, 1, 64, [&] { __VA_ARGS__; })

template <typename T>
void pool(char** a, const char* sfx) {
    // max|avg n c h w oh ow k s p include_pad
    bool avg = std::string(a[0]) == "avg";
    PoolGeom g{std::atoll(a[1]) * std::atoll(a[2]), std::atoi(a[3]), std::atoi(a[4]),
               std::atoi(a[5]), std::atoi(a[6]), std::atoi(a[7]), std::atoi(a[8]),
               std::atoi(a[9])};
    int inc = std::atoi(a[10]);
    auto x = load<T>("x");
    auto dy = load<T>("dy");
    // Once dividing (the geometry's multipliers 0), once by multiply-high (as the
    // launcher sets them): the two must agree to the bit.
    PoolGeom fast = g;
    int64_t fwd = g.planes * g.oh * g.ow, bwd = g.planes * g.h * g.w;
    fast_div_params(g.ow, fwd, fast.ow_mul, fast.ow_shift);
    fast_div_params(g.oh, fwd, fast.oh_mul, fast.oh_shift);
    fast_div_params(g.w, bwd, fast.w_mul, fast.w_shift);
    fast_div_params(g.h, bwd, fast.h_mul, fast.h_shift);
    fast_div_params(g.s, max(g.h, g.w) + g.p + 1, fast.s_mul, fast.s_shift);
    std::vector<T> y, dx;
    for (const PoolGeom& geom : {g, fast}) {
        std::vector<T> yy(g.planes * g.oh * g.ow), dxx(x.size());
        if (avg) {
            EMU1(avg_pool_fwd<T>(x.data(), yy.data(), geom, inc));
            EMU1(avg_pool_bwd<T>(dy.data(), dxx.data(), geom, inc));
        } else {
            std::vector<uint32_t> idx(yy.size());
            EMU1(max_pool_fwd<T>(x.data(), yy.data(), idx.data(), geom));
            EMU1(max_pool_bwd<T>(idx.data(), dy.data(), dxx.data(), geom));
        }
        if (!y.empty()) {
            same_bits(y, yy, "pool y");
            same_bits(dx, dxx, "pool dx");
        }
        y = yy;
        dx = dxx;
    }
    save("y", y);
    save("dx", dx);
}

template <typename T>
void bn(char** a) {
    // n c hw slices relu batch_stats eps [rows] ; files x dy gamma beta [mean var for fixed]
    // The reductions run on (slices, rows, planes) grids: the channels `rows` to a grid.z
    // plane (all in one plane without `rows`), as the launcher folds them past 65,535.
    typedef typename Acc<T>::type A;
    // The launcher's geometry (multiply-high indexing) and the same dividing, run again
    // at the end: the two must agree to the bit.
    BnGeom slow{std::atoll(a[0]), std::atoll(a[1]), std::atoll(a[2]), std::atoll(a[3])};
    BnGeom g = slow;
    fast_div_params(g.hw, g.n * g.c * g.hw, g.hw_mul, g.hw_shift);
    fast_div_params(g.c, g.n * g.c * g.hw, g.c_mul, g.c_shift);
    int relu = std::atoi(a[4]), batch = std::atoi(a[5]);
    double eps = std::atof(a[6]);
    unsigned rows = a[7] ? (unsigned)std::atoi(a[7]) : (unsigned)g.c;
    unsigned planes = (unsigned)((g.c + rows - 1) / rows);
    auto reduce = [&](auto kernel) { emu_launch3(g.slices, rows, planes, THREADS, kernel); };
    auto x = load<T>("x");
    auto dy = load<T>("dy");
    auto gamma = load<A>("gamma");
    auto beta = load<A>("beta");
    std::vector<A> stats(3 * g.c), partial(3 * g.c * g.slices);
    // The one-launch reductions' per-channel counters (zero again after every launch).
    std::vector<unsigned> done(g.c, 0);
    if (batch) {
        // Two launches (partials, then a thread per channel), kept as "stats_two_pass".
        reduce([&] { bn_stats_partial<T>(x.data(), partial.data(), g); });
        std::vector<A> two(3 * g.c);
        for (int64_t c = 0; c < g.c; ++c) {
            blockIdx = {0, 0, 0};
            threadIdx = {(unsigned)c, 0, 0};
            blockDim = {1, 1, 1};
            bn_stats_final<A>(partial.data(), two.data(), g, eps);
        }
        save("stats_two_pass", two);
        // One launch: each channel's last block merges.
        reduce([&] { bn_stats<T>(x.data(), partial.data(), stats.data(), done.data(), g, eps); });
    } else {
        auto mean = load<A>("mean");
        auto var = load<A>("var");
        for (int64_t c = 0; c < g.c; ++c) {
            stats[c] = mean[c];
            stats[g.c + c] = var[c];
            stats[2 * g.c + c] = (A)1 / std::sqrt(var[c] + (A)eps);
        }
    }
    const A* mean = stats.data();
    const A* invstd = stats.data() + 2 * g.c;
    std::vector<T> y(x.size()), dx(x.size());
    EMU1(bn_apply<T>(x.data(), gamma.data(), beta.data(), mean, invstd, y.data(), g, relu));
    std::vector<A> bpartial(2 * g.c * g.slices), sums(2 * g.c), sums_two(2 * g.c);
    reduce([&] {
        bn_bwd_partial<T>(x.data(), dy.data(), y.data(), mean, invstd, bpartial.data(), g, relu);
    });
    for (int64_t c = 0; c < g.c; ++c) {
        blockIdx = {0, 0, 0};
        threadIdx = {(unsigned)c, 0, 0};
        blockDim = {1, 1, 1};
        bn_bwd_final<A>(bpartial.data(), sums_two.data(), g);
    }
    save("sums_two_pass", sums_two);
    reduce([&] {
        bn_bwd_sums<T>(x.data(), dy.data(), y.data(), mean, invstd, bpartial.data(), sums.data(),
                       done.data(), g, relu);
    });
    for (unsigned d : done)
        if (d != 0) throw std::runtime_error("a reduction counter was left nonzero");
    EMU1(bn_bwd_data<T>(x.data(), dy.data(), y.data(), gamma.data(), mean, invstd, sums.data(),
                        dx.data(), g, relu, batch));
    {
        std::vector<T> y2(x.size()), dx2(x.size());
        std::vector<A> p2(partial.size()), bp2(bpartial.size());
        if (batch) {
            reduce([&] { bn_stats_partial<T>(x.data(), p2.data(), slow); });
            same_bits(partial, p2, "bn statistics partials");
        }
        EMU1(bn_apply<T>(x.data(), gamma.data(), beta.data(), mean, invstd, y2.data(), slow, relu));
        same_bits(y, y2, "bn apply");
        reduce([&] {
            bn_bwd_partial<T>(x.data(), dy.data(), y.data(), mean, invstd, bp2.data(), slow, relu);
        });
        same_bits(bpartial, bp2, "bn backward partials");
        EMU1(bn_bwd_data<T>(x.data(), dy.data(), y.data(), gamma.data(), mean, invstd,
                            sums.data(), dx2.data(), slow, relu, batch));
        same_bits(dx, dx2, "bn input gradient");
    }
    // Running statistics: momentum 0.1, unbiased variance.
    auto rm = load<A>("running_mean");
    auto rv = load<A>("running_var");
    double m = (double)(g.n * g.hw);
    if (batch) {
        // The mean moved by a shift (a folded convolution bias; gamma stands in for one).
        auto shifted = load<A>("running_mean");
        EMU1(bn_update_running<A>(shifted.data(), stats.data(), gamma.data(), g.c, 0.1, 1.0, 1));
        save("running_mean_shifted", shifted);
        EMU1(bn_update_running<A>(rm.data(), stats.data(), stats.data(), g.c, 0.1, 1.0, 0));
        EMU1(bn_update_running<A>(rv.data(), stats.data() + g.c, stats.data(), g.c, 0.1,
                                  m / (m - 1), 0));
    }
    save("y", y);
    save("dx", dx);
    save("stats", stats);
    save("sums", sums);
    save("running_mean", rm);
    save("running_var", rv);
}

template <typename T>
void optim(char** a) {
    // kind first nesterov centered tf scale wd_l2 wd_dec lr momentum dampening alpha eps
    // beta1 beta2 bc1 bc2 [lens] [live] [clip] ; files p grad state [lens: u32 lengths]
    // [live: lr bc1 bc2 as f64] [clip: the gradients' summed squares and max_norm as f64]
    // -> p state
    StepArgs s{};
    s.kind = std::atoi(a[0]);
    s.first = std::atoi(a[1]);
    s.nesterov = std::atoi(a[2]);
    s.centered = std::atoi(a[3]);
    s.tf_style = std::atoi(a[4]);
    double* d = &s.scale;
    for (int i = 0; i < 12; ++i) d[i] = std::atof(a[5 + i]);
    auto p = load<T>("p");
    auto grad = load<T>("grad");
    auto st = load<T>("state");
    std::vector<double> live, clip;
    // Tensors laid end to end (file lens, u32; without it one tensor of all of p), each
    // with its [3, len] state, in tables of TABLE_TENSORS as src/tables.rs plans them.
    std::vector<uint32_t> lens{(uint32_t)p.size()};
    for (int i = 17; a[i]; ++i) {
        if (std::string(a[i]) == "lens") lens = load<uint32_t>("lens");
        else if (std::string(a[i]) == "live") {
            live = load<double>("live");
            s.live = (uint64_t)live.data();
        } else if (std::string(a[i]) == "clip") {
            clip = load<double>("clip");
            s.sumsq_at = (uint64_t)clip.data();
            s.max_norm = clip[1];
        }
    }
    std::vector<OptimTable> tables;
    size_t off = 0;
    for (size_t i = 0; i < lens.size(); off += lens[i], ++i) {
        if (lens[i] == 0) continue;
        if (tables.empty() || tables.back().count == TABLE_TENSORS) tables.push_back(OptimTable{});
        OptimTable& t = tables.back();
        t.param[t.count] = (uint64_t)(p.data() + off);
        t.grad[t.count] = (uint64_t)(grad.data() + off);
        t.state[t.count] = (uint64_t)(st.data() + 3 * off);
        t.len[t.count] = lens[i];
        t.first_block[t.count] = t.blocks;
        t.blocks += (lens[i] + TABLE_CHUNK - 1) / TABLE_CHUNK;
        t.count++;
    }
    for (auto& t : tables) emu_launch(t.blocks, 1, THREADS, [&] { optim_step<T>(t, s); });
    save("p", p);
    save("state", st);
}

template <typename T>
void nca(char** a) {
    // n p paper smoothing ; files d labels g -> out dd
    int64_t n = std::atoll(a[0]), p = std::atoll(a[1]);
    int paper = std::atoi(a[2]);
    double eps = std::atof(a[3]);
    auto d = load<T>("d");
    auto labels = load<uint32_t>("labels");
    auto g = load<T>("g");
    std::vector<T> out(2 * n), dd(n * p);
    emu_launch(n, 1, THREADS, [&] { nca_fwd<T>(d.data(), labels.data(), out.data(), p, paper, eps); });
    EMU1(nca_bwd<T>(d.data(), labels.data(), out.data(), g.data(), dd.data(), n, p, paper, eps));
    save("out", out);
    save("dd", dd);
}

template <typename T>
void l2n(char** a) {
    // n d scale ; files x g -> y dx
    int64_t n = std::atoll(a[0]), d = std::atoll(a[1]);
    double scale = std::atof(a[2]);
    auto x = load<T>("x");
    auto g = load<T>("g");
    std::vector<T> y(n * d), dx(n * d);
    emu_launch(n, 1, THREADS, [&] { l2n_fwd<T>(x.data(), y.data(), d, scale, 1e-12); });
    emu_launch(n, 1, THREADS, [&] { l2n_bwd<T>(x.data(), g.data(), dx.data(), d, scale, 1e-12); });
    save("y", y);
    save("dx", dx);
}

template <typename T>
void sqdist(char** a) {
    // n p ; files ab aa bb g -> out dab
    int64_t n = std::atoll(a[0]), p = std::atoll(a[1]);
    auto ab = load<T>("ab");
    auto aa = load<T>("aa");
    auto bb = load<T>("bb");
    auto g = load<T>("g");
    std::vector<T> out(n * p), dab(n * p);
    EMU1(sqdist_fwd<T>(ab.data(), aa.data(), bb.data(), out.data(), n, p));
    EMU1(sqdist_bwd<T>(g.data(), out.data(), dab.data(), n * p));
    save("out", out);
    save("dab", dab);
}

// Appends the launch tables of tensors of lengths `lens`, laid end to end in `x`, to
// `tables`, as src/tables.rs plans them: empty tensors left out, TABLE_TENSORS a table,
// ceil(len / TABLE_CHUNK) blocks a tensor, partial sums numbered on from `next`.
template <typename T>
void sumsq_tables(const std::vector<uint32_t>& lens, const std::vector<T>& x,
                  std::vector<std::pair<bool, SumsqTable>>& tables, uint32_t& next) {
    const bool is_f32 = sizeof(T) == 4;
    bool open = false;
    size_t off = 0;
    for (size_t i = 0; i < lens.size(); off += lens[i], ++i) {
        if (lens[i] == 0) continue;
        if (!open || tables.back().second.count == TABLE_TENSORS) {
            SumsqTable t{};
            t.base = next;
            tables.push_back({is_f32, t});
            open = true;
        }
        SumsqTable& t = tables.back().second;
        uint32_t blocks = (lens[i] + TABLE_CHUNK - 1) / TABLE_CHUNK;
        t.data[t.count] = (uint64_t)(x.data() + off);
        t.len[t.count] = lens[i];
        t.first_block[t.count] = t.blocks;
        t.blocks += blocks;
        next += blocks;
        t.count++;
    }
}

// The summed squares of f32 tensors and f64 tensors together, as the clipping of a step
// sums them on a GPU: files lens32 x32 lens64 x64 -> sumsq (f64) and partial (f64).
void sumsq(char**) {
    auto lens32 = load<uint32_t>("lens32");
    auto x32 = load<float>("x32");
    auto lens64 = load<uint32_t>("lens64");
    auto x64 = load<double>("x64");
    std::vector<std::pair<bool, SumsqTable>> tables;
    uint32_t next = 0;
    sumsq_tables(lens32, x32, tables, next);
    sumsq_tables(lens64, x64, tables, next);
    std::vector<double> partial(next, std::nan("")), out(1, std::nan(""));
    for (auto& [is_f32, t] : tables) {
        if (is_f32) emu_launch(t.blocks, 1, THREADS, [&] { sumsq_partial<float>(t, partial.data()); });
        else emu_launch(t.blocks, 1, THREADS, [&] { sumsq_partial<double>(t, partial.data()); });
    }
    emu_launch(1, 1, THREADS, [&] { sumsq_total<double>(partial.data(), next, out.data()); });
    save("sumsq", out);
    save("partial", partial);
}

void select_k(char** a) {
    // rows cols k skip_offset skip ; file x (f32) -> vals (f32) idx (u32)
    int64_t rows = std::atoll(a[0]), cols = std::atoll(a[1]), off = std::atoll(a[3]);
    int k = std::atoi(a[2]), skip = std::atoi(a[4]);
    auto x = load<float>("x");
    std::vector<float> vals(rows * k);
    std::vector<uint32_t> idx(rows * k);
    emu_launch(rows, 1, SELECT_THREADS, [&] {
        smallest_k_f32(x.data(), vals.data(), idx.data(), cols, k, off, skip);
    });
    save("vals", vals);
    save("idx", idx);
}

// `last_block` over a (5, 2) grid of 4-thread blocks, twice on the same counters: which
// blocks were told they came last (1 per block, in launch order), and the counters after.
void last(char**) {
    std::vector<unsigned> done(2, 0), winners;
    for (int launch = 0; launch < 2; ++launch) {
        std::vector<unsigned> w(10, 0);
        emu_launch(5, 2, 4, [&] {
            bool l = last_block(&done[blockIdx.y], 5);
            if (threadIdx.x == 3) w[blockIdx.y * 5 + blockIdx.x] = l;
        });
        winners.insert(winners.end(), w.begin(), w.end());
    }
    save("winners", winners);
    save("done", done);
}

int main(int argc, char** argv) {
    if (argc < 4) return 2;
    std::string op = argv[1], dt = argv[2];
    dir = argv[3];
    char** a = argv + 4;
    if (op == "pool") {
        if (dt == "f32") pool<float>(a, "f32");
        else if (dt == "f64") pool<double>(a, "f64");
        else pool<__nv_bfloat16>(a, "bf16");
    } else if (op == "bn") {
        if (dt == "f32") bn<float>(a);
        else if (dt == "f64") bn<double>(a);
        else bn<__nv_bfloat16>(a);
    } else if (op == "nca") {
        if (dt == "f32") nca<float>(a);
        else nca<double>(a);
    } else if (op == "l2n") {
        if (dt == "f32") l2n<float>(a);
        else if (dt == "f64") l2n<double>(a);
        else l2n<__nv_bfloat16>(a);
    } else if (op == "sqdist") {
        if (dt == "f32") sqdist<float>(a);
        else if (dt == "f64") sqdist<double>(a);
        else sqdist<__nv_bfloat16>(a);
    } else if (op == "last") {
        last(a);
    } else if (op == "sumsq") {
        sumsq(a);
    } else if (op == "select") {
        select_k(a);
    } else if (op == "optim") {
        if (dt == "f32") optim<float>(a);
        else optim<double>(a);
    } else {
        return 2;
    }
    return 0;
}
