//! Helpers of the CPU halves of the crate's custom operations.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Layout, Result, WithDType};
use gemm::Parallelism;

/// The contiguous part of a storage a layout describes.
pub(crate) fn slice<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<T>()?[a..b]),
        None => candle_core::bail!("nofuss custom operations need contiguous inputs"),
    }
}

/// A small tensor's values as a flat f64 vector, on the host (statistics, per-row
/// results and output gradients the CPU halves read).
pub(crate) fn host_f64s(t: &candle_core::Tensor) -> Result<Vec<f64>> {
    t.to_dtype(DType::F64)?.flatten_all()?.to_vec1()
}

/// A tensor's values as a flat f64 vector (tests compare through it).
#[cfg(test)]
pub(crate) fn values(t: &candle_core::Tensor) -> Vec<f64> {
    host_f64s(t).expect("a tensor readable as f64")
}

/// An f32 or f64 storage's values as f64 (parameters, statistics, distances).
pub(crate) fn to_f64s(s: &CpuStorage, l: &Layout) -> Result<Vec<f64>> {
    Ok(match s {
        CpuStorage::F32(_) => slice::<f32>(s, l)?.iter().map(|&v| v as f64).collect(),
        CpuStorage::F64(_) => slice::<f64>(s, l)?.to_vec(),
        _ => candle_core::bail!("f32 or f64 values expected, got {:?}", s.dtype()),
    })
}

/// f64 results as a storage of `dtype`: f64 stays f64, anything else becomes f32 (the
/// accumulator dtype of the crate's operations).
pub(crate) fn from_f64s(dtype: DType, v: Vec<f64>) -> CpuStorage {
    match dtype {
        DType::F64 => CpuStorage::F64(v),
        _ => CpuStorage::F32(v.into_iter().map(|x| x as f32).collect()),
    }
}

/// A matrix inside a slice: element `(i, j)` at `i rs + j cs`, checked to fit.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a, T> {
    data: &'a [T],
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a, T> Mat<'a, T> {
    pub(crate) fn new(data: &'a [T], rows: usize, cols: usize, rs: usize, cs: usize) -> Self {
        let last = (rows.max(1) - 1) * rs + (cols.max(1) - 1) * cs;
        assert!(
            rows == 0 || cols == 0 || last < data.len(),
            "matrix {rows}x{cols} (strides {rs}, {cs}) outside {} values",
            data.len()
        );
        Self {
            data,
            rows,
            cols,
            rs,
            cs,
        }
    }

    /// Row-major `rows x cols` at the start of `data`.
    pub(crate) fn dense(data: &'a [T], rows: usize, cols: usize) -> Self {
        Self::new(data, rows, cols, cols, 1)
    }

    /// The transpose, a view of the same values.
    pub(crate) fn t(self) -> Self {
        Self::new(self.data, self.cols, self.rows, self.cs, self.rs)
    }
}

/// `dst = a b`, or `dst += a b` with `accumulate`; `dst` is row-major
/// `a.rows x b.cols` at its start.
pub(crate) fn matmul<T: WithDType>(
    dst: &mut [T],
    accumulate: bool,
    a: Mat<T>,
    b: Mat<T>,
    par: Parallelism,
) {
    matmul_scaled(dst, accumulate, T::one(), a, b, par)
}

/// `dst = scale a b`, or `dst += scale a b` with `accumulate` (see [`matmul`]).
pub(crate) fn matmul_scaled<T: WithDType>(
    dst: &mut [T],
    accumulate: bool,
    scale: T,
    a: Mat<T>,
    b: Mat<T>,
    par: Parallelism,
) {
    let (m, n, k) = (a.rows, b.cols, a.cols);
    assert!(b.rows == k && dst.len() >= m * n, "matmul shapes");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst[..m * n].fill(T::zero());
        }
        return;
    }
    let alpha = if accumulate { T::one() } else { T::zero() };
    // SAFETY: `Mat::new` checked that both inputs lie inside their slices, `dst` holds
    // m x n values, and as a `&mut` borrow it overlaps neither input. gemm computes
    // dst = alpha dst + scale (a b), reading dst only when `accumulate`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            alpha,
            scale,
            false,
            false,
            false,
            par,
        )
    }
}

/// Matrix products on all of rayon's threads, or on this one.
pub(crate) fn parallelism(multi: bool) -> Parallelism {
    match rayon::current_num_threads() {
        t if multi && t > 1 => Parallelism::Rayon(t),
        _ => Parallelism::None,
    }
}

/// The floats the CPU loss kernels compute in: f64 (the reference precision, `f64::exp`)
/// and f32, whose exponential is [`exp_f32`], written so that loops over slices vectorise.
pub(crate) trait Real: WithDType {
    /// `e^self`.
    fn exp_fast(self) -> Self;
}

impl Real for f64 {
    fn exp_fast(self) -> f64 {
        self.exp()
    }
}

impl Real for f32 {
    fn exp_fast(self) -> f32 {
        exp_f32(self)
    }
}

/// `e^x` in f32 without a library call, so that loops over slices vectorise: `x = n ln 2 +
/// r` with `|r| <= ln 2 / 2`, a degree-7 polynomial for `e^r` (Cephes' `expf`
/// coefficients) and `2^n` built in the exponent bits; under 1 ulp from the true value
/// (tested). Below -87 it gives 0 (true values there are under 1.7e-38), above 88
/// infinity (f32's own limit is 88.72); NaN stays NaN.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    // Adding 1.5 * 2^23 rounds to an integer held in the low mantissa bits.
    const SHIFT: f32 = 12_582_912.0;
    // ln 2 in two parts: `n * LN2_HI` is exact for |n| < 2^9.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const LO: f32 = -87.0;
    const HI: f32 = 88.0;
    // A NaN goes through the clamp and the arithmetic unchanged.
    let xc = x.clamp(LO, HI);
    let t = xc * std::f32::consts::LOG2_E + SHIFT;
    let n = t - SHIFT;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut q = 1.987_569_1e-4f32;
    q = q * r + 1.398_199_9e-3;
    q = q * r + 8.333_452e-3;
    q = q * r + 4.166_579_6e-2;
    q = q * r + 1.666_666_5e-1;
    q = q * r + 0.5;
    let er = q * r * r + r + 1.0;
    // n (in -126..=127) is the low bits of t; 2^n is (n + 127) in the exponent field.
    let n_bits = t.to_bits().wrapping_sub(SHIFT.to_bits());
    let two_n = f32::from_bits(n_bits.wrapping_add(127) << 23);
    if x < LO {
        0.0
    } else if x > HI {
        f32::INFINITY
    } else {
        er * two_n
    }
}

/// Dispatches on a CPU storage's dtype with `$T` bound to its element type (f32, f64,
/// bf16, f16).
macro_rules! with_cpu_dtype {
    ($dt:expr, $T:ident, $body:block) => {
        match $dt {
            candle_core::DType::F32 => {
                type $T = f32;
                $body
            }
            candle_core::DType::F64 => {
                type $T = f64;
                $body
            }
            candle_core::DType::BF16 => {
                type $T = half::bf16;
                $body
            }
            candle_core::DType::F16 => {
                type $T = half::f16;
                $body
            }
            dt => candle_core::bail!("floating-point input expected, got {dt:?}"),
        }
    };
}
pub(crate) use with_cpu_dtype;

#[cfg(test)]
mod tests {
    use super::*;

    /// Distance in units in the last place of the true value (rounded to f32).
    fn ulps(got: f32, want: f64) -> f64 {
        let w = want as f32;
        let ulp = (f32::from_bits(w.to_bits() + 1) - w) as f64;
        (got as f64 - want).abs() / ulp
    }

    #[test]
    fn f32_exponential_is_within_one_ulp_and_keeps_special_values() {
        let mut worst = 0f64;
        // Every 1/4096 from -87 to 88, and the reduction's edges.
        let grid = (-87 * 4096..=88 * 4096).map(|i| i as f32 / 4096.0);
        let edges = (-130..=130).flat_map(|n| {
            let x = n as f32 * std::f32::consts::LN_2 * 0.5;
            [x, x.next_up(), x.next_down()]
        });
        for x in grid.chain(edges.filter(|x| (-87.0..=88.0).contains(x))) {
            let got = exp_f32(x);
            let want = (x as f64).exp();
            if want >= f32::MIN_POSITIVE as f64 {
                worst = worst.max(ulps(got, want));
            } else {
                assert!((got as f64 - want).abs() < 1e-38, "{x}: {got} vs {want}");
            }
        }
        assert!(worst < 1.0, "worst error {worst} ulp");
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(-87.5), 0.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(88.5), f32::INFINITY);
        assert_eq!(exp_f32(f32::INFINITY), f32::INFINITY);
        assert!(exp_f32(f32::NAN).is_nan());
        assert_eq!(Real::exp_fast(1.5f64), 1.5f64.exp());
    }
}
