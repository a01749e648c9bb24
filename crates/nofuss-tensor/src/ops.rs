//! Small tensor operations shared by the crates above.

use candle_core::backend::BackendStorage;
#[cfg(feature = "cuda")]
use candle_core::CudaStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, WithDType,
};
use rayon::prelude::*;

use crate::cpu::{slice, with_cpu_dtype};
pub use crate::proxy_rows::{
    hardest_triplet_rows_from_points, nca_rows, nca_rows_from_points, triplet_rows_from_points,
};

/// Norms at or below this divide by it instead (a zero row stays zero, not NaN).
const NORM_EPS: f64 = 1e-12;

/// Divides each row of `x` (`[N, D]`) by its L2 norm; rows with a norm at or below
/// `1e-12` are divided by `1e-12` instead, so a zero row stays zero rather than becoming
/// NaN. Differentiable; see [`scaled_l2_normalize_rows`].
pub fn l2_normalize_rows(x: &Tensor) -> Result<Tensor> {
    scaled_l2_normalize_rows(x, 1.0)
}

/// `scale * x / |x|` for every row of `x` (`[N, D]`, f32, f64 or bf16; sums in f32/f64),
/// the norm clamped below at `1e-12` as in [`l2_normalize_rows`]. One pass each way (on
/// CUDA one kernel, a block per row) instead of the half-dozen element-wise passes and
/// buffers of the composite: the proxy losses normalise all `P` proxies every step.
pub fn scaled_l2_normalize_rows(x: &Tensor, scale: f64) -> Result<Tensor> {
    let (n, d) = x.dims2()?;
    if n == 0 || d == 0 {
        return x.affine(scale, 0.0);
    }
    x.contiguous()?.apply_op1(L2Normalize { scale })
}

/// `x -> scale * x / max(|x|, eps)` per row.
struct L2Normalize {
    scale: f64,
}

impl L2Normalize {
    /// The factor a row with squared norm `xx` is multiplied by, and whether the norm is
    /// above the clamp (only then does the gradient have its projection term).
    fn factor(&self, xx: f64) -> (f64, bool) {
        let norm = xx.sqrt();
        if norm > NORM_EPS {
            (self.scale / norm, true)
        } else {
            (self.scale / NORM_EPS, false)
        }
    }
}

impl CustomOp1 for L2Normalize {
    fn name(&self) -> &'static str {
        "nofuss-l2-normalize-rows"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let _timer = crate::profile::HostTimer::start(self.name());
        let (_, d) = l.shape().dims2()?;
        with_cpu_dtype!(s.dtype(), T, {
            let x = slice::<T>(s, l)?;
            let mut y = vec![T::from_f64(0.0); x.len()];
            y.par_chunks_mut(d).zip(x.par_chunks(d)).for_each(|(o, r)| {
                let xx: f64 = r.iter().map(|v| v.to_f64() * v.to_f64()).sum();
                let (c, _) = self.factor(xx);
                for (o, v) in o.iter_mut().zip(r) {
                    *o = T::from_f64(v.to_f64() * c);
                }
            });
            Ok((T::to_cpu_storage_owned(y), l.shape().clone()))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let (n, d) = l.shape().dims2()?;
        let y = crate::cuda::l2n_fwd(s, l, n, d, self.scale, NORM_EPS)?;
        Ok((y, l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let op = L2NormalizeBwd { scale: self.scale };
        Ok(Some(arg.apply_op2_no_bwd(&grad.contiguous()?, &op)?))
    }
}

/// `(x, dy) -> dx` of [`L2Normalize`]: `c (g - x (g·x) / |x|²)`, or `c g` where the norm
/// is clamped.
struct L2NormalizeBwd {
    scale: f64,
}

impl CustomOp2 for L2NormalizeBwd {
    fn name(&self) -> &'static str {
        "nofuss-l2-normalize-rows-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _timer = crate::profile::HostTimer::start(self.name());
        let (_, d) = l1.shape().dims2()?;
        let fwd = L2Normalize { scale: self.scale };
        with_cpu_dtype!(s1.dtype(), T, {
            let x = slice::<T>(s1, l1)?;
            let g = slice::<T>(s2, l2)?;
            let mut dx = vec![T::from_f64(0.0); x.len()];
            dx.par_chunks_mut(d)
                .zip(x.par_chunks(d).zip(g.par_chunks(d)))
                .for_each(|(o, (r, gr))| {
                    let (mut xx, mut gx) = (0f64, 0f64);
                    for (v, w) in r.iter().zip(gr) {
                        xx += v.to_f64() * v.to_f64();
                        gx += w.to_f64() * v.to_f64();
                    }
                    let (c, unit) = fwd.factor(xx);
                    let k = if unit { gx / xx } else { 0.0 };
                    for ((o, v), w) in o.iter_mut().zip(r).zip(gr) {
                        *o = T::from_f64(c * (w.to_f64() - v.to_f64() * k));
                    }
                });
            Ok((T::to_cpu_storage_owned(dx), l1.shape().clone()))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (n, d) = l1.shape().dims2()?;
        let dx = crate::cuda::l2n_bwd((s1, l1), (s2, l2), n, d, self.scale, NORM_EPS)?;
        Ok((dx, l1.shape().clone()))
    }
}

/// Squared Euclidean distances between the rows of `a` (`[N, D]`) and `b` (`[P, D]`),
/// `max(|a_i|² + |b_j|² - 2 a_i·b_j, 0)` as `[N, P]` (clamped against rounding; a NaN
/// stays NaN), differentiable in both. The matrix product and the squared norms go
/// through candle (cuBLAS / gemm); the combination and its backward are one pass each (on
/// CUDA one kernel each), instead of four element-wise passes forward and about seven
/// backward over `[N, P]`. Same arithmetic, in the same order, as those passes.
pub fn pairwise_squared_distances(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (n, d) = a.dims2()?;
    let (p, d2) = b.dims2()?;
    if d != d2 {
        candle_core::bail!("pairwise_squared_distances: [{n}, {d}] against [{p}, {d2}]");
    }
    let aa = a.sqr()?.sum(1)?; // [N]
    let bb = b.sqr()?.sum(1)?; // [P]
    let ab = a.matmul(&b.t()?)?; // [N, P]
    squared_distances_from_parts(&ab, &aa, &bb)
}

/// The last step of [`pairwise_squared_distances`] on its own, for callers that keep the
/// squared norms or the matrix product (the evaluation's kNN reuses the points' norms for
/// every block of queries): `max((aa_i + bb_j) - 2 ab_ij, 0)` from `ab` (`[N, P]`), `aa`
/// (`[N]`) and `bb` (`[P]`), in one pass (on CUDA one kernel), differentiable in all three.
/// A NaN stays NaN.
pub fn squared_distances_from_parts(ab: &Tensor, aa: &Tensor, bb: &Tensor) -> Result<Tensor> {
    let (n, p) = ab.dims2()?;
    if aa.dims() != [n] || bb.dims() != [p] {
        candle_core::bail!(
            "squared_distances_from_parts: products {:?} with norms {:?} and {:?}",
            ab.dims(),
            aa.dims(),
            bb.dims()
        );
    }
    if n == 0 || p == 0 {
        return Ok(ab.clone());
    }
    ab.contiguous()?
        .apply_op3(&aa.contiguous()?, &bb.contiguous()?, SqDist)
}

/// `(ab [N, P], |a|² [N], |b|² [P]) -> max((|a|² + |b|²) - 2 ab, 0)`.
struct SqDist;

impl CustomOp3 for SqDist {
    fn name(&self) -> &'static str {
        "nofuss-squared-distances"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _timer = crate::profile::HostTimer::start(self.name());
        let (_, p) = l1.shape().dims2()?;
        with_cpu_dtype!(s1.dtype(), T, {
            let ab = slice::<T>(s1, l1)?;
            let aa = slice::<T>(s2, l2)?;
            let bb = slice::<T>(s3, l3)?;
            let (zero, two) = (T::from_f64(0.0), T::from_f64(2.0));
            let mut out = vec![zero; ab.len()];
            out.par_chunks_mut(p)
                .zip(ab.par_chunks(p))
                .zip(aa.par_iter())
                .for_each(|((o, r), &ai)| {
                    for ((o, &v), &bj) in o.iter_mut().zip(r).zip(bb) {
                        let x = (ai + bj) - v * two;
                        // `<=` is false for NaN: a NaN stays NaN.
                        *o = if x <= zero { zero } else { x };
                    }
                });
            Ok((T::to_cpu_storage_owned(out), l1.shape().clone()))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (n, p) = l1.shape().dims2()?;
        let out = crate::cuda::sqdist_fwd([(s1, l1), (s2, l2), (s3, l3)], n, p)?;
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        _ab: &Tensor,
        _aa: &Tensor,
        _bb: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // d(ab) = -2 g where d > 0; the norms' gradients are its sums over the other
        // index (times -1/2, exact).
        let dab = grad.contiguous()?.apply_op2_no_bwd(res, &SqDistBwd)?;
        let daa = (dab.sum(1)? * -0.5)?;
        let dbb = (dab.sum(0)? * -0.5)?;
        Ok((Some(dab), Some(daa), Some(dbb)))
    }
}

/// `(g, d) -> -2 g where d > 0, else 0`.
struct SqDistBwd;

impl CustomOp2 for SqDistBwd {
    fn name(&self) -> &'static str {
        "nofuss-squared-distances-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _timer = crate::profile::HostTimer::start(self.name());
        with_cpu_dtype!(s1.dtype(), T, {
            let g = slice::<T>(s1, l1)?;
            let d = slice::<T>(s2, l2)?;
            let (zero, m2) = (T::from_f64(0.0), T::from_f64(-2.0));
            let mut out = vec![zero; g.len()];
            // Chunks of plain loops, which vectorise (a per-element parallel zip does not).
            const CHUNK: usize = 8192;
            out.par_chunks_mut(CHUNK)
                .zip(g.par_chunks(CHUNK).zip(d.par_chunks(CHUNK)))
                .for_each(|(o, (g, d))| {
                    for ((o, &g), &d) in o.iter_mut().zip(g).zip(d) {
                        *o = if d > zero { m2 * g } else { zero };
                    }
                });
            Ok((T::to_cpu_storage_owned(out), l1.shape().clone()))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let total = l1.shape().elem_count();
        let out = crate::cuda::sqdist_bwd((s1, l1), (s2, l2), total)?;
        Ok((out, l1.shape().clone()))
    }
}

/// `[N, cols]` rows of zeros with a 1 at each row's index in `indices` (`[N]`, u8, u32 or
/// i64, each below `cols`), in `dtype`. Made on `indices`' device by one scatter into a
/// zero-filled buffer: nothing is uploaded (an `arange` of the columns to compare with
/// would be, `cols` values every call, and a CUDA graph capture refuses uploads of more
/// than candle's 4 KiB cache takes: SOP's 11,318 proxies as u32 are 45 KB). An index out of
/// range is an error on the CPU and undefined on other devices, as candle's scatter.
/// (u8 indices are widened first: candle's scatter skips an index equal to its type's
/// largest value, which for u8 is the valid index 255.)
pub fn one_hot(indices: &Tensor, cols: usize, dtype: candle_core::DType) -> Result<Tensor> {
    let n = indices.dims1()?;
    k_hot(&indices.reshape((n, 1))?, cols, dtype)
}

/// [`one_hot`] with `k` indices a row: `indices` `[N, k]`, and a 1 at each of a row's
/// indices (an index given twice gives one 1).
pub fn k_hot(indices: &Tensor, cols: usize, dtype: candle_core::DType) -> Result<Tensor> {
    let (n, k) = indices.dims2()?;
    let dev = indices.device();
    let indices = match indices.dtype() {
        candle_core::DType::U8 => indices.to_dtype(candle_core::DType::U32)?,
        _ => indices.contiguous()?,
    };
    let ones = Tensor::ones((n, k), dtype, dev)?;
    Tensor::zeros((n, cols), dtype, dev)?.scatter(&indices, &ones, 1)
}

/// Whether every value of `t` is finite (no NaN, no infinity; integer tensors always
/// are). On the CPU one parallel pass over the values in their own dtype, without a copy
/// when `t` is contiguous; on other devices `t - t` summed, which is 0 exactly when all
/// values are finite (and cannot overflow), read back in one synchronisation. (The
/// losses' input checks: converting to f64 and summing absolute values took three
/// passes and two buffers of twice the input's size.)
// `x - x` is the point: 0 exactly when x is finite.
#[allow(clippy::eq_op)]
pub fn all_finite(t: &Tensor) -> Result<bool> {
    if !t.dtype().is_float() || t.elem_count() == 0 {
        return Ok(true);
    }
    if !t.device().is_cpu() {
        let zero = (t - t)?.sum_all()?.to_dtype(candle_core::DType::F32)?;
        return Ok(zero.to_scalar::<f32>()? == 0.0);
    }
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(s) = &*storage else {
        candle_core::bail!("all_finite: a CPU tensor without CPU storage");
    };
    with_cpu_dtype!(s.dtype(), T, {
        let v = slice::<T>(s, layout)?;
        // `x - x` is 0 for a finite x and NaN otherwise; a chunk's sums say which (eight
        // of them, so that f32 and f64 chunks vectorise).
        Ok(v.par_chunks(1 << 14).all(|c| {
            let zero = T::from_f64(0.0);
            let mut acc = [zero; 8];
            let lanes = c.chunks_exact(8);
            let rest = lanes.remainder().iter().fold(zero, |a, &x| a + (x - x));
            for l in lanes {
                for (a, &x) in acc.iter_mut().zip(l) {
                    *a += x - x;
                }
            }
            acc.iter().fold(rest, |a, &b| a + b) == zero
        }))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    #[test]
    fn one_hot_rows_in_each_index_and_value_dtype() {
        let cpu = &Device::Cpu;
        for idx in [
            Tensor::new(&[2u32, 0, 2, 4], cpu).unwrap(),
            Tensor::new(&[2i64, 0, 2, 4], cpu).unwrap(),
            Tensor::new(&[2u8, 0, 2, 4], cpu).unwrap(),
        ] {
            for dt in [DType::U8, DType::F32, DType::F64] {
                let h = one_hot(&idx, 5, dt).unwrap();
                assert_eq!((h.dims(), h.dtype()), (&[4usize, 5][..], dt));
                let h: Vec<Vec<f64>> = h.to_dtype(DType::F64).unwrap().to_vec2().unwrap();
                let want = [2usize, 0, 2, 4].map(|j| {
                    let mut r = vec![0.0; 5];
                    r[j] = 1.0;
                    r
                });
                assert_eq!(h, want, "{:?} {dt:?}", idx.dtype());
            }
        }
        // The largest u8 is an index like any other.
        let h = one_hot(&Tensor::new(&[255u8, 1], cpu).unwrap(), 256, DType::F32).unwrap();
        let h = h.sum(1).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(h, [1.0, 1.0]);
        // Several a row, one of them twice.
        let h = k_hot(
            &Tensor::new(&[[0u32, 3], [2, 2]], cpu).unwrap(),
            4,
            DType::F32,
        )
        .unwrap();
        assert_eq!(
            h.to_vec2::<f32>().unwrap(),
            [[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 1.0, 0.0]]
        );
        // Out of range, and not a vector.
        assert!(one_hot(&Tensor::new(&[5u32], cpu).unwrap(), 5, DType::F32).is_err());
        assert!(one_hot(&Tensor::new(&[[1u32]], cpu).unwrap(), 5, DType::F32).is_err());
    }

    #[test]
    fn unit_rows_and_zero_rows() {
        let x = Tensor::new(&[[3f32, 4.0], [0.0, 0.0]], &Device::Cpu).unwrap();
        let y = l2_normalize_rows(&x).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(y, vec![vec![0.6, 0.8], vec![0.0, 0.0]]);
        let empty = Tensor::zeros((0, 3), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(l2_normalize_rows(&empty).unwrap().dims(), [0, 3]);
    }

    #[test]
    fn fused_distances_match_the_element_wise_ops() {
        // Rows with shared points (exact zero distances), f32 and f64.
        let (n, p, d) = (7usize, 5usize, 4usize);
        let av: Vec<f64> = (0..n * d)
            .map(|i| ((i * 13 % 17) as f64 - 8.0) / 3.0)
            .collect();
        let mut bv: Vec<f64> = (0..p * d)
            .map(|i| ((i * 5 % 11) as f64 - 5.0) / 2.0)
            .collect();
        bv[..d].copy_from_slice(&av[..d]);
        let w: Vec<f64> = (0..n * p)
            .map(|i| ((i * 7 % 9) as f64 - 4.0) / 4.0)
            .collect();
        for dt in [DType::F64, DType::F32] {
            let t = |v: &[f64], r: usize, c: usize| {
                Var::from_tensor(
                    &Tensor::from_vec(v.to_vec(), (r, c), &Device::Cpu)
                        .unwrap()
                        .to_dtype(dt)
                        .unwrap(),
                )
                .unwrap()
            };
            let (a1, b1, a2, b2) = (t(&av, n, d), t(&bv, p, d), t(&av, n, d), t(&bv, p, d));
            let wt = Tensor::from_vec(w.clone(), (n, p), &Device::Cpu)
                .unwrap()
                .to_dtype(dt)
                .unwrap();
            let fused = pairwise_squared_distances(a1.as_tensor(), b1.as_tensor()).unwrap();
            let (a, b) = (a2.as_tensor(), b2.as_tensor());
            let aa = a.sqr().unwrap().sum_keepdim(1).unwrap();
            let bb = b.sqr().unwrap().sum_keepdim(1).unwrap().t().unwrap();
            let ab = a.matmul(&b.t().unwrap()).unwrap();
            let composite = aa
                .broadcast_add(&bb)
                .unwrap()
                .broadcast_sub(&(ab * 2.0).unwrap())
                .unwrap()
                .relu()
                .unwrap();
            let flat = crate::cpu::values;
            assert_eq!(flat(&fused), flat(&composite), "{dt:?} values");
            let g1 = (&fused * &wt)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let g2 = (&composite * &wt)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for (x, y) in [(&a1, &a2), (&b1, &b2)] {
                let (gx, gy) = (
                    flat(g1.get(x.as_tensor()).unwrap()),
                    flat(g2.get(y.as_tensor()).unwrap()),
                );
                for (u, v) in gx.iter().zip(&gy) {
                    assert!(
                        (u - v).abs() <= 1e-5 * v.abs().max(1.0),
                        "{dt:?}: {u} vs {v}"
                    );
                }
            }
        }
        // A NaN stays NaN (the element-wise ReLU turned it into 0); empty sides are fine.
        let a = Tensor::new(&[[f32::NAN, 0.0], [1.0, 0.0]], &Device::Cpu).unwrap();
        let b = Tensor::new(&[[0.0f32, 1.0]], &Device::Cpu).unwrap();
        let d = pairwise_squared_distances(&a, &b)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert!(d[0][0].is_nan() && d[1][0] == 2.0);
        let none = Tensor::zeros((0, 2), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(
            pairwise_squared_distances(&none, &b).unwrap().dims(),
            [0, 1]
        );
        assert!(pairwise_squared_distances(
            &a,
            &Tensor::zeros((1, 3), DType::F32, &Device::Cpu).unwrap()
        )
        .is_err());
    }

    #[test]
    fn distances_from_parts_take_views_and_check_shapes() {
        // The evaluation's use: one block of query rows, its norms a narrowed view.
        let x = Tensor::new(
            &[[0.0f32, 1.0], [2.0, 0.0], [1.0, 1.0], [-1.0, 3.0]],
            &Device::Cpu,
        )
        .unwrap();
        let norms = x.sqr().unwrap().sum(1).unwrap();
        let q = x.narrow(0, 1, 2).unwrap();
        let dots = q.matmul(&x.t().unwrap()).unwrap();
        let parts = squared_distances_from_parts(&dots, &norms.narrow(0, 1, 2).unwrap(), &norms)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let whole = pairwise_squared_distances(&q, &x)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(parts, whole);
        assert_eq!(parts[0], [5.0, 0.0, 2.0, 18.0]);
        assert!(squared_distances_from_parts(&dots, &norms, &norms).is_err());
        assert!(squared_distances_from_parts(&dots, &norms.narrow(0, 0, 2).unwrap(), &q).is_err());
    }

    /// The composite the fused op replaces: candle's element-wise ops, differentiated by
    /// candle.
    fn composite(x: &Tensor, scale: f64) -> Tensor {
        let norm = x
            .sqr()
            .unwrap()
            .sum_keepdim(1)
            .unwrap()
            .sqrt()
            .unwrap()
            .clamp(NORM_EPS, f64::INFINITY)
            .unwrap();
        (x.broadcast_div(&norm).unwrap() * scale).unwrap()
    }

    #[test]
    fn fused_normalisation_matches_the_composite_and_its_gradient() {
        let (n, d) = (6, 9);
        let mut v: Vec<f64> = (0..n * d)
            .map(|i| ((i * 37 % 23) as f64 - 11.0) / 7.0)
            .collect();
        v[d..2 * d].iter_mut().for_each(|x| *x = 0.0); // a zero row
        v[2 * d..3 * d].iter_mut().for_each(|x| *x *= 1e-14); // a row under the clamp
        let w: Vec<f64> = (0..n * d)
            .map(|i| ((i * 11 % 13) as f64 - 6.0) / 5.0)
            .collect();
        let w = Tensor::from_vec(w, (n, d), &Device::Cpu).unwrap();
        for scale in [1.0, 3.0] {
            let a = Var::from_vec(v.clone(), (n, d), &Device::Cpu).unwrap();
            let b = Var::from_vec(v.clone(), (n, d), &Device::Cpu).unwrap();
            let ya = scaled_l2_normalize_rows(a.as_tensor(), scale).unwrap();
            let yb = composite(b.as_tensor(), scale);
            let ga = (&ya * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let gb = (&yb * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            for (x, y) in flat(&ya).iter().zip(flat(&yb)) {
                assert!((x - y).abs() < 1e-12, "{scale}: {x} vs {y}");
            }
            let (da, db) = (
                flat(ga.get(a.as_tensor()).unwrap()),
                flat(gb.get(b.as_tensor()).unwrap()),
            );
            let wv = flat(&w);
            for (i, (x, y)) in da.iter().zip(&db).enumerate() {
                if i / d == 1 {
                    // A zero row: the composite's square-root backward gives NaN; the
                    // fused op gives PyTorch's F.normalize gradient, g * scale / eps.
                    assert!(y.is_nan());
                    assert!((x - wv[i] * scale / NORM_EPS).abs() <= 1e-12 * x.abs());
                    continue;
                }
                assert!(
                    (x - y).abs() <= 1e-9 * y.abs().max(1.0),
                    "{scale} [{i}]: {x} vs {y}"
                );
            }
        }
        // f32 and bf16 inputs keep their dtype.
        let x32 = Tensor::from_vec(v.clone(), (n, d), &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        assert_eq!(l2_normalize_rows(&x32).unwrap().dtype(), DType::F32);
        let x16 = x32.to_dtype(DType::BF16).unwrap();
        assert_eq!(l2_normalize_rows(&x16).unwrap().dtype(), DType::BF16);
    }

    #[test]
    fn all_finite_finds_nan_and_infinity_in_every_dtype() {
        let cpu = &Device::Cpu;
        let mut v = vec![0.5f64; 50_000];
        v[7] = -1e300;
        for dt in [DType::F64, DType::F32, DType::BF16, DType::F16] {
            let t = Tensor::from_vec(v.clone(), 50_000, cpu).unwrap();
            // f32 and the half types turn -1e300 into -inf: finite only in f64.
            let want = dt == DType::F64;
            assert_eq!(
                all_finite(&t.to_dtype(dt).unwrap()).unwrap(),
                want,
                "{dt:?}"
            );
        }
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            for at in [0, 16_383, 16_384, 49_999] {
                let mut w = vec![1.25f64; 50_000];
                w[at] = bad;
                let t = Tensor::from_vec(w, (250, 200), cpu).unwrap();
                assert!(!all_finite(&t).unwrap(), "{bad} at {at}");
                assert!(!all_finite(&t.to_dtype(DType::F32).unwrap()).unwrap());
                // A transposed view is read through a contiguous copy.
                assert!(!all_finite(&t.t().unwrap()).unwrap());
            }
        }
        let fine = Tensor::new(&[[1.0f32, -3e38], [0.0, 1e-45]], cpu).unwrap();
        assert!(all_finite(&fine).unwrap() && all_finite(&fine.t().unwrap()).unwrap());
        assert!(all_finite(&Tensor::new(&[1u32, 2], cpu).unwrap()).unwrap());
        assert!(all_finite(&Tensor::zeros((0, 3), DType::F32, cpu).unwrap()).unwrap());
    }
}
