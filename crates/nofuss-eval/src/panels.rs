//! The inner loop of a greedy k-means++ step: every point's squared distance to each of a
//! few candidates, and per candidate the sum over the points of `min(d2, distance)`, in one
//! pass over the points kept in transposed panels.
//!
//! A general matrix product is a poor fit for this shape (tens of thousands of points
//! times about eleven candidates, 64 deep): `gemm`'s micro-kernel ran at a fraction of the
//! multiply-add rate on it (narrow tiles, outputs eleven apart), and the distances were
//! written out and read back for the sums. Here the points are transposed once, in panels
//! of [`W`] (one AVX-512 register of `f32`), so each dimension of a panel is one vector
//! load multiplied by each candidate's value of that dimension into an accumulator
//! register per candidate, and the sums are made while the distances are in registers.
//! The AVX-512 and AVX2 builds are chosen at run time; elsewhere a portable loop.

/// Points per panel.
pub(crate) const W: usize = 16;

/// The rows of a `[N, dim]` matrix in panels of [`W`] points, dimension-major: panel `p`'s
/// value of dimension `d` for its lane `l` at `p * W * dim + d * W + l`. The last panel is
/// padded with zero points.
pub(crate) struct Panels {
    vals: Vec<f32>,
    /// Squared norms of the points (0 for the padding), [`Panels::len`] of them.
    norms: Vec<f32>,
    dim: usize,
    /// The widest build of the loop this processor runs.
    kernel: Kernel,
}

impl Panels {
    /// `data`'s rows in panels, with `norms` their squared norms.
    pub(crate) fn new(data: &[f32], norms: &[f32], dim: usize) -> Self {
        let n = norms.len();
        let len = n.div_ceil(W) * W;
        let mut vals = vec![0f32; len * dim];
        for (i, row) in data.chunks_exact(dim).enumerate() {
            let (p, l) = (i / W, i % W);
            for (d, &v) in row.iter().enumerate() {
                vals[p * W * dim + d * W + l] = v;
            }
        }
        let mut norms = norms.to_vec();
        norms.resize(len, 0.0);
        let kernel = *Kernel::available().last().unwrap_or(&Kernel::Portable);
        Self {
            vals,
            norms,
            dim,
            kernel,
        }
    }

    /// Points including the padding: a multiple of [`W`].
    pub(crate) fn len(&self) -> usize {
        self.norms.len()
    }

    /// One block of points starting at point `start` (a multiple of [`W`]), `d2.len()` of
    /// them: writes the squared distance `max(|x|² + |c|² - 2 x·c, 0)` of point `start + i`
    /// to candidate `t` (`cands`: `[trials, dim]`, squared norms `cand_norms`) at
    /// `dists[t * d2.len() + i]`, and returns per candidate the sum over the block of
    /// `min(d2[i], distance)` (`d2` is 0 for the padding, which then adds nothing).
    pub(crate) fn block(
        &self,
        start: usize,
        d2: &[f32],
        cands: &[f32],
        cand_norms: &[f32],
        dists: &mut [f32],
    ) -> Vec<f64> {
        let job = Job {
            vals: &self.vals[start * self.dim..(start + d2.len()) * self.dim],
            norms: &self.norms[start..start + d2.len()],
            d2,
            dim: self.dim,
            cands,
            cand_norms,
        };
        let mut pot = vec![0f64; cand_norms.len()];
        self.kernel.run(&job, dists, &mut pot);
        pot
    }
}

/// The builds of the block's loop, by instruction set: the same operations in the same
/// order, except that the SIMD builds fuse each multiply-add (so the last bits may
/// differ between processors, as with any matrix product).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kernel {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Kernel {
    /// The builds this processor can run, the widest last.
    fn available() -> Vec<Kernel> {
        #[allow(unused_mut)]
        let mut k = vec![Kernel::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx2") && has!("fma") {
                k.push(Kernel::Avx2);
            }
            if has!("avx512f") && has!("fma") {
                k.push(Kernel::Avx512);
            }
        }
        k
    }

    fn run(self, job: &Job, dists: &mut [f32], pot: &mut [f64]) {
        match self {
            Kernel::Portable => block_portable(job, dists, pot),
            // SAFETY: `available` lists these only where the processor has the features.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { block_avx2(job, dists, pot) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => unsafe { block_avx512(job, dists, pot) },
        }
    }
}

/// What [`Panels::block`] works on.
struct Job<'a> {
    vals: &'a [f32],
    norms: &'a [f32],
    d2: &'a [f32],
    dim: usize,
    cands: &'a [f32],
    cand_norms: &'a [f32],
}

/// Panels between flushes of the `f32` lane sums into the `f64` totals (64 points).
const FLUSH: usize = 4;

/// Runs `$f::<g>(job, g0, dists, pot)` over the candidates in groups of `g <= $max` (at
/// most 16) starting at `g0`.
#[cfg(target_arch = "x86_64")]
macro_rules! in_groups {
    ($max:expr, $f:ident, $job:expr, $dists:expr, $pot:expr) => {{
        let trials = $job.cand_norms.len();
        let mut g0 = 0;
        while g0 < trials {
            let g = ($max).min(trials - g0);
            in_groups!(@arm g, $f, $job, g0, $dists, $pot; 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15);
            g0 += g;
        }
    }};
    (@arm $g:ident, $f:ident, $job:expr, $g0:ident, $dists:expr, $pot:expr; $($n:literal)*) => {
        match $g {
            $($n => $f::<$n>($job, $g0, $dists, $pot),)*
            _ => $f::<16>($job, $g0, $dists, $pot),
        }
    };
}

/// Adds lane sums into a total, in f64.
fn add_lanes(lanes: &[f32], total: &mut f64) {
    *total += lanes.iter().map(|&v| v as f64).sum::<f64>();
}

/// The portable build: plain loops, one candidate at a time.
fn block_portable(job: &Job, dists: &mut [f32], pot: &mut [f64]) {
    let (dim, len) = (job.dim, job.d2.len());
    for (t, total) in pot.iter_mut().enumerate() {
        let c = &job.cands[t * dim..(t + 1) * dim];
        let mut part = [0f32; W];
        for (p, pan) in job.vals.chunks_exact(W * dim).enumerate() {
            let mut acc = [0f32; W];
            for (r, &cv) in pan.chunks_exact(W).zip(c) {
                for l in 0..W {
                    acc[l] += cv * r[l];
                }
            }
            let base = p * W;
            let out = &mut dists[t * len + base..][..W];
            for l in 0..W {
                let v = (job.norms[base + l] + job.cand_norms[t] - 2.0 * acc[l]).max(0.0);
                out[l] = v;
                part[l] += v.min(job.d2[base + l]);
            }
            if p % FLUSH == FLUSH - 1 {
                add_lanes(&part, total);
                part = [0.0; W];
            }
        }
        add_lanes(&part, total);
    }
}

/// Candidates `g0..g0 + G` dimension by dimension: `[dim]` arrays of their G values.
#[cfg(target_arch = "x86_64")]
fn transposed<const G: usize>(job: &Job, g0: usize) -> Vec<[f32; G]> {
    let dim = job.dim;
    (0..dim)
        .map(|d| std::array::from_fn(|g| job.cands[(g0 + g) * dim + d]))
        .collect()
}

/// AVX-512: up to sixteen candidates a pass, one panel at a time: a panel's dimension one
/// register, an accumulator register per candidate. The points are read once per pass, and
/// a step's candidates (`2 + ln k`: 11 for SOP) fit one pass (passes of 8 and 3 took 12.6 s
/// of seeding at SOP scale, one of 11 took 11.8 s).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn block_avx512(job: &Job, dists: &mut [f32], pot: &mut [f64]) {
    in_groups!(16, group_avx512, job, dists, pot)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn group_avx512<const G: usize>(job: &Job, g0: usize, dists: &mut [f32], pot: &mut [f64]) {
    use std::arch::x86_64::*;
    let len = job.d2.len();
    let ct = transposed::<G>(job, g0);
    let zero = _mm512_setzero_ps();
    let mut part = [zero; G];
    let mut lanes = [0f32; W];
    for (p, pan) in job.vals.chunks_exact(W * job.dim).enumerate() {
        let mut acc = [zero; G];
        for (r, cd) in pan.chunks_exact(W).zip(&ct) {
            // SAFETY: `r` holds W values.
            let r = unsafe { _mm512_loadu_ps(r.as_ptr()) };
            for g in 0..G {
                acc[g] = _mm512_fmadd_ps(_mm512_set1_ps(cd[g]), r, acc[g]);
            }
        }
        let base = p * W;
        let (xn, d2) = (&job.norms[base..base + W], &job.d2[base..base + W]);
        // SAFETY: both slices hold W values.
        let (xn, d2) = unsafe { (_mm512_loadu_ps(xn.as_ptr()), _mm512_loadu_ps(d2.as_ptr())) };
        for g in 0..G {
            let cn = _mm512_set1_ps(job.cand_norms[g0 + g]);
            let near = _mm512_fnmadd_ps(_mm512_set1_ps(2.0), acc[g], _mm512_add_ps(xn, cn));
            let v = _mm512_max_ps(near, zero);
            let out = &mut dists[(g0 + g) * len + base..][..W];
            // SAFETY: `out` holds W values.
            unsafe { _mm512_storeu_ps(out.as_mut_ptr(), v) };
            part[g] = _mm512_add_ps(part[g], _mm512_min_ps(v, d2));
        }
        if p % FLUSH == FLUSH - 1 || base + W == len {
            for (g, s) in part.iter_mut().enumerate() {
                // SAFETY: `lanes` holds W values.
                unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), *s) };
                add_lanes(&lanes, &mut pot[g0 + g]);
                *s = zero;
            }
        }
    }
}

/// AVX2: up to twelve candidates a pass, one half of a panel (eight lanes, one register)
/// after the other: the second half reads the panel from the first level of cache, so
/// the points still come from memory once per pass.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn block_avx2(job: &Job, dists: &mut [f32], pot: &mut [f64]) {
    in_groups!(12, group_avx2, job, dists, pot)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn group_avx2<const G: usize>(job: &Job, g0: usize, dists: &mut [f32], pot: &mut [f64]) {
    use std::arch::x86_64::*;
    const H: usize = W / 2;
    let len = job.d2.len();
    let ct = transposed::<G>(job, g0);
    let zero = _mm256_setzero_ps();
    // Lane sums per half of the panels, per candidate.
    let mut part = [[zero; G]; 2];
    let mut lanes = [0f32; H];
    for (p, pan) in job.vals.chunks_exact(W * job.dim).enumerate() {
        for (h, part) in part.iter_mut().enumerate() {
            let mut acc = [zero; G];
            for (r, cd) in pan.chunks_exact(W).zip(&ct) {
                // SAFETY: `r` holds W values, this half the H from `h * H`.
                let r = unsafe { _mm256_loadu_ps(r.as_ptr().add(h * H)) };
                for g in 0..G {
                    acc[g] = _mm256_fmadd_ps(_mm256_set1_ps(cd[g]), r, acc[g]);
                }
            }
            let base = p * W + h * H;
            let (xn, d2) = (&job.norms[base..base + H], &job.d2[base..base + H]);
            // SAFETY: both slices hold H values.
            let (xn, d2) = unsafe { (_mm256_loadu_ps(xn.as_ptr()), _mm256_loadu_ps(d2.as_ptr())) };
            for g in 0..G {
                let cn = _mm256_set1_ps(job.cand_norms[g0 + g]);
                let near = _mm256_fnmadd_ps(_mm256_set1_ps(2.0), acc[g], _mm256_add_ps(xn, cn));
                let v = _mm256_max_ps(near, zero);
                let out = &mut dists[(g0 + g) * len + base..][..H];
                // SAFETY: `out` holds H values.
                unsafe { _mm256_storeu_ps(out.as_mut_ptr(), v) };
                part[g] = _mm256_add_ps(part[g], _mm256_min_ps(v, d2));
            }
        }
        if p % FLUSH == FLUSH - 1 || (p + 1) * W == len {
            for g in 0..G {
                for half in &mut part {
                    // SAFETY: `lanes` holds H values.
                    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), half[g]) };
                    add_lanes(&lanes, &mut pot[g0 + g]);
                    half[g] = zero;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Every point's distances and the sums against a direct computation in f64, for
    /// dimensions below, at and above a panel's width, every group size, and point counts
    /// that end mid-panel.
    #[test]
    fn block_matches_direct_distances_and_sums() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for &(n, dim, trials) in &[
            (37, 3, 1),
            (100, 17, 5),
            (250, 64, 11),
            (16, 64, 8),
            (5, 1, 9),
            (90, 8, 29),
        ] {
            let data: Vec<f32> = (0..n * dim).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let norms = crate::tiles::sq_norms(&data, dim);
            let panels = Panels::new(&data, &norms, dim);
            let picks: Vec<usize> = (0..trials).map(|_| rng.gen_range(0..n)).collect();
            let cands: Vec<f32> = picks
                .iter()
                .flat_map(|&p| data[p * dim..(p + 1) * dim].to_vec())
                .collect();
            let cand_norms: Vec<f32> = picks.iter().map(|&p| norms[p]).collect();
            let mut d2: Vec<f32> = (0..n).map(|_| rng.gen_range(0.0..2.0)).collect();
            d2.resize(panels.len(), 0.0);
            // From the second panel on, when there is one.
            let start = if panels.len() > W { W } else { 0 };
            let len = panels.len() - start;
            for kernel in Kernel::available() {
                let mut dists = vec![f32::NAN; trials * len];
                let job = Job {
                    vals: &panels.vals[start * dim..],
                    norms: &panels.norms[start..],
                    d2: &d2[start..],
                    dim,
                    cands: &cands,
                    cand_norms: &cand_norms,
                };
                let mut pot = vec![0f64; trials];
                kernel.run(&job, &mut dists, &mut pot);
                for t in 0..trials {
                    let mut want = 0f64;
                    for i in start..n {
                        let d: f64 = (0..dim)
                            .map(|j| (data[i * dim + j] as f64 - cands[t * dim + j] as f64).powi(2))
                            .sum();
                        let got = dists[t * len + i - start] as f64;
                        assert!(
                            (got - d).abs() < 1e-5 * (1.0 + d),
                            "{kernel:?} n {n} dim {dim} t {t} i {i}: {got} vs {d}"
                        );
                        want += d.min(d2[i] as f64);
                    }
                    assert!(
                        (pot[t] - want).abs() < 1e-5 * (1.0 + want),
                        "{kernel:?}: {} vs {want}",
                        pot[t]
                    );
                }
            }
        }
    }
}
