//! The per-row objectives of the proxy losses: Proxy-NCA's from a distance matrix
//! ([`nca_rows`]) or straight from the points and the proxies
//! ([`nca_rows_from_points`]), and Proxy-Triplet's from the points and the proxies
//! ([`triplet_rows_from_points`], and over each row's k hardest negatives:
//! [`hardest_triplet_rows_from_points`]). From the points, the CPU runs one operation that
//! never puts an `[N, P]` tensor in candle's graph.

use candle_core::backend::BackendStorage;
#[cfg(feature = "cuda")]
use candle_core::CudaStorage;
use candle_core::{
    CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType,
};
use rayon::prelude::*;

use crate::cpu::{host_f64s, matmul, matmul_scaled, parallelism, slice, Mat, Real};

/// The NCA objective of each row of a distance matrix `dist` (`[N, P]`, f32 or f64)
/// against the column its label names (`labels`: `[N]`, u8, u32 or i64), in one pass:
///
/// - `exclude_positive` (Proxy-NCA's paper form): `d_iy + logsumexp_{j≠y}(-d_ij)`;
/// - otherwise (softmax cross-entropy over `-d`, label smoothing `ε`):
///   `(1-ε) d_iy + ε mean_{j≠y} d_ij + logsumexp_j(-d_ij)`.
///
/// Returns `[N]`, differentiable with respect to `dist`. A label outside `0..P` gives NaN
/// (no host synchronisation to check it; callers that want an error check first). On CUDA
/// one kernel per direction replaces the gather, masks, log-sum-exp and their gradients;
/// on the CPU the exponentials of f32 distances are computed in f32 (within 1 ulp) and
/// every sum in f64.
pub fn nca_rows(
    dist: &Tensor,
    labels: &Tensor,
    exclude_positive: bool,
    smoothing: f64,
) -> Result<Tensor> {
    let (n, _) = dist.dims2()?;
    let labels = check_labels("nca_rows", labels, n, dist)?;
    let op = NcaRows(NcaForm {
        paper: exclude_positive,
        smoothing,
    });
    dist.contiguous()?
        .apply_op2(&labels, op)?
        .narrow(1, 0, 1)?
        .squeeze(1)
}

/// [`nca_rows`] of the squared distances between the rows of `x` (`[N, D]`) and of
/// `proxies` (`[P, D]`): `nca_rows(&pairwise_squared_distances(x, proxies)?, ...)`, the
/// same formulas (on the CPU the squared norms are summed in f64), differentiable in `x`
/// and `proxies`.
///
/// On the CPU it is one operation: forward, a matrix product and one pass over each row
/// of distances; backward, one pass turning each row of those distances (kept by the
/// forward when an input is tracked, else computed again) into the gradient of its
/// distances, and two matrix products giving both gradients. No `[N, P]` tensor is in
/// candle's graph, so its autograd allocates, clears and adds none (with 11,318 proxies,
/// SOP's classes, those passes and buffers were most of the loss's time). On other
/// devices it is the composition, whose pieces there are one kernel each.
pub fn nca_rows_from_points(
    x: &Tensor,
    proxies: &Tensor,
    labels: &Tensor,
    exclude_positive: bool,
    smoothing: f64,
) -> Result<Tensor> {
    let form = NcaForm {
        paper: exclude_positive,
        smoothing,
    };
    let what = "nca_rows_from_points";
    if let Some(rows) = rows_on_cpu(what, x, proxies, labels, RowLoss::Nca(form))? {
        return Ok(rows);
    }
    let dist = crate::ops::pairwise_squared_distances(x, proxies)?;
    nca_rows(&dist, labels, exclude_positive, smoothing)
}

/// Proxy-Triplet's objective with static proxies, per row of `x` (`[N, D]`): the hinge
/// `max(d_iy + margin - d_ij, 0)` averaged over the `P - 1` proxies `j ≠ y_i`, where `d`
/// are the squared distances to the rows of `proxies` (`[P, D]`, at least 2) and `y`
/// the `labels` (`[N]`). Returns `[N]`, differentiable in `x` and `proxies` (no gradient
/// where a hinge is exactly 0). A label outside `0..P` gives NaN.
///
/// On the CPU one operation as [`nca_rows_from_points`]; elsewhere the composition of
/// [`crate::ops::pairwise_squared_distances`] and candle's operations.
pub fn triplet_rows_from_points(
    x: &Tensor,
    proxies: &Tensor,
    labels: &Tensor,
    margin: f64,
) -> Result<Tensor> {
    let what = "triplet_rows_from_points";
    if proxies.dims().first().is_some_and(|&p| p < 2) {
        candle_core::bail!("{what}: needs at least 2 proxies, got {:?}", proxies.dims());
    }
    if let Some(rows) = rows_on_cpu(what, x, proxies, labels, RowLoss::Triplet { margin })? {
        return Ok(rows);
    }
    triplet_rows_composed(x, proxies, labels, margin)
}

/// [`triplet_rows_from_points`] as a composition of candle operations (other devices).
fn triplet_rows_composed(
    x: &Tensor,
    proxies: &Tensor,
    labels: &Tensor,
    margin: f64,
) -> Result<Tensor> {
    let (n, p) = (x.dim(0)?, proxies.dim(0)?);
    let dist = crate::ops::pairwise_squared_distances(x, proxies)?;
    let labels = check_labels("triplet_rows_from_points", labels, n, &dist)?;
    let d_pos = dist.gather(&labels.unsqueeze(1)?, 1)?; // [N, 1]
    let hinge = (d_pos + margin)?.broadcast_sub(&dist)?.relu()?;
    // Every proxy but the own one (the mask made on the device: nothing uploaded).
    let negatives = (1.0 - crate::ops::one_hot(&labels, p, dist.dtype())?)?;
    (hinge * negatives)?.sum(1)? / (p - 1) as f64
}

/// [`triplet_rows_from_points`] over the `k` hardest negatives of each row only: the
/// hinge `max(d_iy + margin - d_ij, 0)` averaged over the `min(k, P - 1)` proxies
/// `j ≠ y_i` nearest to `x_i` (Proxy-Triplet with static proxies and the `k` hardest
/// negatives). The hardest are picked by distance, ties to the lower proxy index; which
/// they are does not depend on the parameters' gradient (a piecewise-constant choice).
/// Returns `[N]`, differentiable in `x` and `proxies`.
///
/// On the CPU one operation as [`triplet_rows_from_points`], the negatives picked by
/// `f64::total_cmp` with a heap per row during its one pass over the row (no `[N, P]`
/// mask, nothing read back to pick them). Elsewhere the composition, with the picking by
/// [`crate::select::smallest_k`] on the device (in f32, the positive's column set to
/// `+inf`): nothing is read back either, so a CUDA graph can capture it; `min(k, P - 1)`
/// must then be at most [`crate::select::MAX_K`].
pub fn hardest_triplet_rows_from_points(
    x: &Tensor,
    proxies: &Tensor,
    labels: &Tensor,
    margin: f64,
    k: usize,
) -> Result<Tensor> {
    let what = "hardest_triplet_rows_from_points";
    if proxies.dims().first().is_some_and(|&p| p < 2) {
        candle_core::bail!("{what}: needs at least 2 proxies, got {:?}", proxies.dims());
    }
    if k == 0 {
        candle_core::bail!("{what}: needs k >= 1 hardest negatives");
    }
    let loss = RowLoss::HardestTriplet { margin, k };
    if let Some(rows) = rows_on_cpu(what, x, proxies, labels, loss)? {
        return Ok(rows);
    }
    hardest_triplet_rows_composed(x, proxies, labels, margin, k)
}

/// [`hardest_triplet_rows_from_points`] as a composition of candle operations and
/// [`crate::select::smallest_k`] (other devices).
fn hardest_triplet_rows_composed(
    x: &Tensor,
    proxies: &Tensor,
    labels: &Tensor,
    margin: f64,
    k: usize,
) -> Result<Tensor> {
    let what = "hardest_triplet_rows_from_points";
    let (n, p) = (x.dim(0)?, proxies.dim(0)?);
    let kk = k.min(p - 1);
    if kk > crate::select::MAX_K {
        candle_core::bail!(
            "{what}: {kk} hardest negatives, more than the {} a device selection takes",
            crate::select::MAX_K
        );
    }
    let dist = crate::ops::pairwise_squared_distances(x, proxies)?;
    let labels = check_labels(what, labels, n, &dist)?;
    let own = crate::ops::one_hot(&labels, p, DType::U8)?;
    let inf = Tensor::full(f32::INFINITY, (n, p), dist.device())?;
    let masked = own.where_cond(&inf, &dist.detach().to_dtype(DType::F32)?)?;
    let (_, picked) = crate::select::smallest_k(&masked, kk, None)?;
    let d_neg = dist.gather(&picked.contiguous()?, 1)?; // [N, kk]
    let d_pos = dist.gather(&labels.unsqueeze(1)?, 1)?; // [N, 1]
    (d_pos + margin)?.broadcast_sub(&d_neg)?.relu()?.sum(1)? / kk as f64
}

/// The CPU half of the `*_rows_from_points` functions: shape checks, then one
/// [`ProxyRows`] operation; `None` on other devices.
fn rows_on_cpu(
    what: &str,
    x: &Tensor,
    proxies: &Tensor,
    labels: &Tensor,
    loss: RowLoss,
) -> Result<Option<Tensor>> {
    let (n, d) = x.dims2()?;
    let (p, d2) = proxies.dims2()?;
    if d != d2 || x.dtype() != proxies.dtype() {
        candle_core::bail!(
            "{what}: points [{n}, {d}] {:?} against proxies [{p}, {d2}] {:?}",
            x.dtype(),
            proxies.dtype()
        );
    }
    if p == 0 {
        candle_core::bail!("{what}: no proxies");
    }
    if !x.device().is_cpu() {
        return Ok(None);
    }
    let labels = check_labels(what, labels, n, x)?;
    let op = ProxyRows {
        loss,
        saved: Saved::default(),
    };
    let out = x
        .contiguous()?
        .apply_op3(&proxies.contiguous()?, &labels, op)?;
    Ok(Some(out.narrow(1, 0, 1)?.squeeze(1)?))
}

/// Checks `labels` (`[n]`, an integer dtype) and the values' dtype (f32 or f64); returns
/// the labels as contiguous u32 on the values' device.
fn check_labels(what: &str, labels: &Tensor, n: usize, values: &Tensor) -> Result<Tensor> {
    if labels.dims() != [n] {
        candle_core::bail!("{what}: {:?} labels for {n} rows", labels.dims());
    }
    if !matches!(values.dtype(), DType::F32 | DType::F64) {
        candle_core::bail!(
            "{what}: f32 or f64 values expected, not {:?}",
            values.dtype()
        );
    }
    labels
        .to_device(values.device())?
        .to_dtype(DType::U32)?
        .contiguous()
}

/// Which NCA objective: the paper form (positive left out) or the softmax form with
/// label smoothing.
#[derive(Debug, Clone, Copy)]
struct NcaForm {
    paper: bool,
    smoothing: f64,
}

/// The candidates of a row's log-sum-exp: all columns, or all but the label's in the
/// paper form (all of them when the label is outside the row).
fn candidates<T>(d: &[T], y: usize, paper: bool) -> (&[T], &[T]) {
    if paper && y < d.len() {
        (&d[..y], &d[y + 1..])
    } else {
        (d, &[])
    }
}

/// The smallest of `start` and the values of `d`, NaNs skipped (eight running minima,
/// so that f32 rows vectorise).
fn min_of<T: Real>(d: &[T], start: T) -> T {
    let smaller = |m: T, v: T| if v < m { v } else { m };
    let mut acc = [start; 8];
    let lanes = d.chunks_exact(8);
    let rest = lanes.remainder().iter().fold(start, |m, &v| smaller(m, v));
    for l in lanes {
        for (a, &v) in acc.iter_mut().zip(l) {
            *a = smaller(*a, v);
        }
    }
    acc.iter().fold(rest, |m, &v| smaller(m, v))
}

/// `Σ f(d_j)`, each term in `T`, the sum in f64. Blocks of 64 terms: the terms in one
/// loop, their sum in eight partial sums in another (two simple loops vectorise for f32;
/// one loop doing both did not).
fn sum_of<T: Real>(d: &[T], f: impl Fn(T) -> T) -> f64 {
    let mut terms = [T::from_f64(0.0); 64];
    let mut acc = [0f64; 8];
    let mut rest = 0f64;
    for c in d.chunks(64) {
        let t = &mut terms[..c.len()];
        for (o, &v) in t.iter_mut().zip(c) {
            *o = f(v);
        }
        let lanes = t.chunks_exact(8);
        rest += lanes.remainder().iter().map(|v| v.to_f64()).sum::<f64>();
        for l in lanes {
            for (a, &v) in acc.iter_mut().zip(l) {
                *a += v.to_f64();
            }
        }
    }
    acc.iter().sum::<f64>() + rest
}

/// `Σ e^(m - d_j)`.
fn sum_exp<T: Real>(d: &[T], m: T) -> f64 {
    sum_of(d, |v| (m - v).exp_fast())
}

impl NcaForm {
    /// One row's (loss, log-sum-exp) from its distances `d` and label `y`.
    fn row<T: Real>(&self, d: &[T], y: usize) -> (f64, f64) {
        let p = d.len();
        let (a, b) = candidates(d, y, self.paper);
        let inf = T::from_f64(f64::INFINITY);
        let m = min_of(b, min_of(a, inf));
        let lse = -m.to_f64() + (sum_exp(a, m) + sum_exp(b, m)).ln();
        if y >= p {
            return (f64::NAN, lse);
        }
        let dy = d[y].to_f64();
        let loss = if self.paper {
            dy + lse
        } else {
            let neg: f64 = d[..y].iter().chain(&d[y + 1..]).map(|v| v.to_f64()).sum();
            let mean_neg = if p > 1 { neg / (p - 1) as f64 } else { 0.0 };
            (1.0 - self.smoothing) * dy + self.smoothing * mean_neg + lse
        };
        (loss, lse)
    }

    /// Replaces a row of distances `d` by `g ∂loss/∂d_j` (the row's log-sum-exp `lse`,
    /// output gradient `g`); with `clamped`, by 0 where `d_j <= 0` (the distances'
    /// clamp at 0 passes no gradient there).
    fn grad_row<T: Real>(&self, d: &mut [T], y: usize, lse: f64, g: f64, clamped: bool) {
        let p = d.len();
        if y >= p {
            d.fill(T::from_f64(f64::NAN));
            return;
        }
        let zero = T::from_f64(0.0);
        let keep = |v: T| !clamped || v > zero;
        let dy = d[y];
        // Every column as a negative first: g (t - softmax_j), t the negatives' target.
        let target = if self.paper || p < 2 {
            0.0
        } else {
            self.smoothing / (p - 1) as f64
        };
        let (neg_lse, gt, t) = (T::from_f64(-lse), T::from_f64(g), T::from_f64(target));
        for v in d.iter_mut() {
            let e = gt * (t - (neg_lse - *v).exp_fast());
            *v = if keep(*v) { e } else { zero };
        }
        // The label's column.
        let ey = if self.paper {
            g
        } else {
            g * (1.0 - self.smoothing - (-dy.to_f64() - lse).exp())
        };
        d[y] = if keep(dy) { T::from_f64(ey) } else { zero };
    }
}

/// The objective a [`ProxyRows`] operation computes per row of distances.
#[derive(Debug, Clone, Copy)]
enum RowLoss {
    /// [`nca_rows`].
    Nca(NcaForm),
    /// [`triplet_rows_from_points`].
    Triplet { margin: f64 },
    /// [`hardest_triplet_rows_from_points`].
    HardestTriplet { margin: f64, k: usize },
}

impl RowLoss {
    /// One row's loss, and what its gradient needs (the NCA's log-sum-exp).
    fn row<T: Real>(&self, d: &[T], y: usize) -> (f64, f64) {
        match self {
            Self::Nca(form) => form.row(d, y),
            Self::Triplet { margin } => {
                let p = d.len();
                if y >= p || p < 2 {
                    return (f64::NAN, 0.0);
                }
                let (zero, top) = (T::from_f64(0.0), d[y] + T::from_f64(*margin));
                // `<=` is false for NaN: a NaN distance makes the loss NaN.
                let hinge = |v: T| {
                    let h = top - v;
                    if h <= zero {
                        zero
                    } else {
                        h
                    }
                };
                let (a, b) = candidates(d, y, true);
                let hinges = sum_of(a, hinge) + sum_of(b, hinge);
                (hinges / (p - 1) as f64, 0.0)
            }
            Self::HardestTriplet { margin, k } => {
                let p = d.len();
                if y >= p || p < 2 {
                    return (f64::NAN, 0.0);
                }
                let (zero, top) = (T::from_f64(0.0), d[y] + T::from_f64(*margin));
                let picked = hardest(d, y, *k);
                let hinges: f64 = picked
                    .iter()
                    .map(|&j| {
                        let h = top - d[j];
                        // NaN stays NaN, as in the all-negatives form.
                        if h <= zero {
                            0.0
                        } else {
                            h.to_f64()
                        }
                    })
                    .sum();
                (hinges / picked.len() as f64, 0.0)
            }
        }
    }

    /// Replaces a row of distances by `g ∂loss/∂d_j`, 0 where `d_j <= 0` (see
    /// [`NcaForm::grad_row`]); `aux` is what [`Self::row`] returned beside the loss.
    fn grad_row<T: Real>(&self, d: &mut [T], y: usize, aux: f64, g: f64) {
        match *self {
            Self::Nca(form) => form.grad_row(d, y, aux, g, true),
            Self::Triplet { margin } => triplet_grad_row(d, y, margin, g),
            Self::HardestTriplet { margin, k } => hardest_triplet_grad_row(d, y, margin, k, g),
        }
    }
}

/// The columns of the `k` smallest values of row `d` other than column `y` (all other
/// columns when there are at most `k`), unordered: the `k` hardest negatives, ranked by
/// value in `f64::total_cmp`'s order, then by column. One pass with the best so far in a
/// max-heap: a value no better than the worst of them costs one comparison.
fn hardest<T: Real>(d: &[T], y: usize, k: usize) -> Vec<usize> {
    // f64::total_cmp's order as an integer (its own transform of the bits).
    let key = |v: T| {
        let b = v.to_f64().to_bits() as i64;
        b ^ (((b >> 63) as u64) >> 1) as i64
    };
    let mut best = std::collections::BinaryHeap::with_capacity(k.min(d.len()) + 1);
    for (j, &v) in d.iter().enumerate() {
        if j == y {
            continue;
        }
        let c = (key(v), j);
        if best.len() < k {
            best.push(c);
        } else if best.peek().is_some_and(|worst| c < *worst) {
            if let Some(mut top) = best.peek_mut() {
                *top = c;
            }
        }
    }
    best.into_iter().map(|(_, j)| j).collect()
}

/// [`RowLoss::grad_row`] of the hardest-negatives triplet objective: as
/// [`triplet_grad_row`] over the row's `k` hardest negatives (the same pick as the
/// forward's, from the same distances), 0 on the other columns.
fn hardest_triplet_grad_row<T: Real>(d: &mut [T], y: usize, margin: f64, k: usize, g: f64) {
    let p = d.len();
    if y >= p || p < 2 {
        d.fill(T::from_f64(f64::NAN));
        return;
    }
    let zero = T::from_f64(0.0);
    let picked: Vec<(usize, T)> = hardest(d, y, k).into_iter().map(|j| (j, d[j])).collect();
    let (dy, top) = (d[y], d[y] + T::from_f64(margin));
    let step = T::from_f64(g / picked.len() as f64);
    let minus = zero - step;
    d.fill(zero);
    let mut active = 0usize;
    for &(j, v) in &picked {
        let on = top - v > zero;
        active += on as usize;
        d[j] = if on && v > zero { minus } else { zero };
    }
    d[y] = if dy > zero {
        T::from_f64(g * active as f64 / picked.len() as f64)
    } else {
        zero
    };
}

/// [`RowLoss::grad_row`] of the triplet objective: the row of a point with hinges over
/// every proxy but its own, the margin `margin`, output gradient `g`.
fn triplet_grad_row<T: Real>(d: &mut [T], y: usize, margin: f64, g: f64) {
    let p = d.len();
    if y >= p || p < 2 {
        d.fill(T::from_f64(f64::NAN));
        return;
    }
    let zero = T::from_f64(0.0);
    let (dy, top) = (d[y], d[y] + T::from_f64(margin));
    // Each active hinge: -g/(P-1) on its negative, +g/(P-1) on the positive.
    let step = T::from_f64(g / (p - 1) as f64);
    let (mut active, minus) = (0usize, zero - step);
    for v in d.iter_mut() {
        let on = top - *v > zero;
        active += on as usize;
        *v = if on && *v > zero { minus } else { zero };
    }
    // The loop counted the positive's own hinge, `margin` (or 0 when rounding ate it).
    active -= (top - dy > zero) as usize;
    d[y] = if dy > zero {
        T::from_f64(g * active as f64 / (p - 1) as f64)
    } else {
        zero
    };
}

/// Runs `$body` with `$T` bound to f32 or f64, the storage's dtype.
macro_rules! with_real {
    ($dt:expr, $T:ident, $body:block) => {
        match $dt {
            DType::F32 => {
                type $T = f32;
                $body
            }
            DType::F64 => {
                type $T = f64;
                $body
            }
            dt => candle_core::bail!("f32 or f64 values expected, got {dt:?}"),
        }
    };
}

/// `(dist, labels) -> [N, 2]`: loss and log-sum-exp per row.
struct NcaRows(NcaForm);

impl CustomOp2 for NcaRows {
    fn name(&self) -> &'static str {
        "nofuss-nca-rows"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _timer = crate::profile::HostTimer::start(self.name());
        let (n, p) = l1.shape().dims2()?;
        let labels = slice::<u32>(s2, l2)?;
        with_real!(s1.dtype(), T, {
            let d = slice::<T>(s1, l1)?;
            let mut out = vec![T::from_f64(0.0); 2 * n];
            out.par_chunks_mut(2)
                .zip(d.par_chunks(p.max(1)))
                .zip(labels.par_iter())
                .for_each(|((o, r), &y)| {
                    let (loss, lse) = self.0.row(r, y as usize);
                    o.copy_from_slice(&[T::from_f64(loss), T::from_f64(lse)]);
                });
            Ok((T::to_cpu_storage_owned(out), Shape::from((n, 2))))
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
        let (n, p) = l1.shape().dims2()?;
        let f = self.0;
        let out = crate::cuda::nca_fwd((s1, l1), (s2, l2), n, p, f.paper, f.smoothing)?;
        Ok((out, Shape::from((n, 2))))
    }

    fn bwd(
        &self,
        dist: &Tensor,
        labels: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let op = NcaRowsBwd {
            form: self.0,
            labels: labels.clone(),
        };
        let dd = dist.apply_op3_no_bwd(res, &grad.contiguous()?, &op)?;
        Ok((Some(dd), None))
    }
}

/// `(dist, [loss, lse], grad) -> d dist`.
struct NcaRowsBwd {
    form: NcaForm,
    labels: Tensor,
}

impl CustomOp3 for NcaRowsBwd {
    fn name(&self) -> &'static str {
        "nofuss-nca-rows-bwd"
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
        let labels = self.labels.to_vec1::<u32>()?;
        with_real!(s1.dtype(), T, {
            let res = slice::<T>(s2, l2)?;
            let g = slice::<T>(s3, l3)?;
            let mut out = slice::<T>(s1, l1)?.to_vec();
            out.par_chunks_mut(p.max(1)).enumerate().for_each(|(i, o)| {
                let (lse, gi) = (res[2 * i + 1].to_f64(), g[2 * i].to_f64());
                self.form.grad_row(o, labels[i] as usize, lse, gi, false);
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
        let out = crate::cuda::nca_bwd(
            [(s1, l1), (s2, l2), (s3, l3)],
            &self.labels,
            n,
            p,
            self.form.paper,
            self.form.smoothing,
        )?;
        Ok((out, l1.shape().clone()))
    }
}

/// The squared distances of point `x` (squared norm `xx`) to every proxy, written over
/// the row of their dot products: `max((xx + pp_j) - 2 x·p_j, 0)`, as
/// [`crate::ops::pairwise_squared_distances`] computes them (a NaN stays NaN).
fn distances_in_place<T: Real>(dots: &mut [T], xx: T, pp: &[T]) {
    let (zero, two) = (T::from_f64(0.0), T::from_f64(2.0));
    for (v, &pj) in dots.iter_mut().zip(pp) {
        let s = (xx + pj) - *v * two;
        *v = if s <= zero { zero } else { s };
    }
}

/// Every row's squared norm, summed in f64 (the composition sums in `T`).
fn squared_norms<T: Real>(m: &[T], dim: usize) -> Vec<T> {
    m.par_chunks(dim.max(1))
        .map(|r| T::from_f64(r.iter().map(|v| v.to_f64() * v.to_f64()).sum()))
        .collect()
}

/// Points `[N, D]` and proxies `[P, D]` of one [`ProxyRows`] call.
struct Points<'a, T> {
    x: &'a [T],
    p: &'a [T],
    n: usize,
    np: usize,
    dim: usize,
}

impl<'a, T: Real> Points<'a, T> {
    fn new(s1: &'a CpuStorage, l1: &Layout, s2: &'a CpuStorage, l2: &Layout) -> Result<Self> {
        let (n, dim) = l1.shape().dims2()?;
        let (np, _) = l2.shape().dims2()?;
        let (x, p) = (slice::<T>(s1, l1)?, slice::<T>(s2, l2)?);
        Ok(Self { x, p, n, np, dim })
    }

    /// The `[N, P]` squared distances, through the dot products.
    fn distances(&self) -> Vec<T> {
        let (xx, pp) = (
            squared_norms(self.x, self.dim),
            squared_norms(self.p, self.dim),
        );
        let mut d = vec![T::from_f64(0.0); self.n * self.np];
        let x = Mat::dense(self.x, self.n, self.dim);
        let p = Mat::dense(self.p, self.np, self.dim);
        matmul(&mut d, false, x, p.t(), parallelism(true));
        d.par_chunks_mut(self.np)
            .zip(xx.par_iter())
            .for_each(|(r, &xx)| distances_in_place(r, xx, &pp));
        d
    }
}

/// `f(row index, row)` on every row of a row-major matrix `cols` wide, in parallel.
fn map_rows<T: Real, R: Send>(
    m: &mut [T],
    cols: usize,
    f: impl Fn(usize, &mut [T]) -> R + Sync,
) -> Vec<R> {
    m.par_chunks_mut(cols)
        .enumerate()
        .map(|(i, r)| f(i, r))
        .collect()
}

/// The distances a [`ProxyRows`] forward computed, kept for its backward (taken once;
/// a second backward over the same graph computes them again).
type Saved = std::sync::Mutex<Option<CpuStorage>>;

/// Takes the saved distances if they are there, of dtype `T` and `len` values.
fn take_saved<T: Real>(saved: &Saved, len: usize) -> Option<Vec<T>> {
    let storage = saved.lock().ok()?.take()?;
    T::cpu_storage_data(storage).ok().filter(|d| d.len() == len)
}

/// `(x [N, D], proxies [P, D], labels [N]) -> [N, 2]`: a [`RowLoss`] of the points'
/// squared distances to the proxies, with what its gradient needs (CPU only; the
/// `*_rows_from_points` functions compose elsewhere). It keeps the `[N, P]` distances for
/// its backward, which then needs no matrix product to recompute them; when no input is
/// tracked, candle drops the op, and them, as soon as the forward returns.
struct ProxyRows {
    loss: RowLoss,
    saved: Saved,
}

impl CustomOp3 for ProxyRows {
    fn name(&self) -> &'static str {
        "nofuss-proxy-rows"
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
        let labels = slice::<u32>(s3, l3)?;
        with_real!(s1.dtype(), T, {
            let pts = Points::<T>::new(s1, l1, s2, l2)?;
            let mut d = pts.distances();
            let rows = map_rows(&mut d, pts.np, |i, r| self.loss.row(r, labels[i] as usize));
            if let Ok(mut s) = self.saved.lock() {
                *s = Some(T::to_cpu_storage_owned(d));
            }
            let out: Vec<T> = rows
                .into_iter()
                .flat_map(|(loss, lse)| [T::from_f64(loss), T::from_f64(lse)])
                .collect();
            Ok((T::to_cpu_storage_owned(out), Shape::from((pts.n, 2))))
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        proxies: &Tensor,
        labels: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let op = ProxyRowsBwd {
            loss: self.loss,
            saved: Saved::new(self.saved.lock().ok().and_then(|mut s| s.take())),
            labels: labels.to_vec1::<u32>()?,
            aux: host_f64s(&res.narrow(1, 1, 1)?)?,
            grad: host_f64s(&grad.narrow(1, 0, 1)?)?,
        };
        let both = x.apply_op2_no_bwd(proxies, &op)?;
        let n = x.dim(0)?;
        let np = proxies.dim(0)?;
        Ok((
            Some(both.narrow(0, 0, n)?),
            Some(both.narrow(0, n, np)?),
            None,
        ))
    }
}

/// `(x, proxies) -> [N + P, D]`: the gradients of [`ProxyRows`] with respect to the
/// points and the proxies, stacked. With `E` the gradient of the distances (zero where
/// clamped), `r_i` its row sums and `c_j` its column sums:
/// `dx_i = 2 r_i x_i - 2 (E P)_i` and `dp_j = 2 c_j p_j - 2 (Eᵀ X)_j`.
struct ProxyRowsBwd {
    loss: RowLoss,
    /// The forward's distances, if it kept them.
    saved: Saved,
    labels: Vec<u32>,
    aux: Vec<f64>,
    grad: Vec<f64>,
}

impl CustomOp2 for ProxyRowsBwd {
    fn name(&self) -> &'static str {
        "nofuss-proxy-rows-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let _timer = crate::profile::HostTimer::start(self.name());
        with_real!(s1.dtype(), T, {
            let pts = Points::<T>::new(s1, l1, s2, l2)?;
            let (n, np, dim) = (pts.n, pts.np, pts.dim);
            if self.labels.len() != n || self.aux.len() != n || self.grad.len() != n {
                candle_core::bail!("proxy rows backward: {n} rows, other inputs");
            }
            // E, and its row sums in the same pass.
            let mut e = take_saved(&self.saved, n * np).unwrap_or_else(|| pts.distances());
            let row_sums = map_rows(&mut e, np, |i, r| {
                let y = self.labels[i] as usize;
                self.loss.grad_row(r, y, self.aux[i], self.grad[i]);
                r.iter().map(|v| v.to_f64()).sum::<f64>()
            });
            let col_sums = column_sums(&e, n, np);
            let mut out = vec![T::from_f64(0.0); (n + np) * dim];
            let (dx, dp) = out.split_at_mut(n * dim);
            scale_rows(dx, pts.x, &row_sums, dim);
            scale_rows(dp, pts.p, &col_sums, dim);
            let em = Mat::dense(&e, n, np);
            let m2 = T::from_f64(-2.0);
            let par = parallelism(true);
            matmul_scaled(dx, true, m2, em, Mat::dense(pts.p, np, dim), par);
            matmul_scaled(dp, true, m2, em.t(), Mat::dense(pts.x, n, dim), par);
            Ok((T::to_cpu_storage_owned(out), Shape::from((n + np, dim))))
        })
    }
}

/// Column sums of a row-major `rows x cols` matrix, in f64, in blocks of columns.
fn column_sums<T: Real>(m: &[T], rows: usize, cols: usize) -> Vec<f64> {
    const BLOCK: usize = 1024;
    let mut sums = vec![0f64; cols];
    sums.par_chunks_mut(BLOCK).enumerate().for_each(|(b, s)| {
        let first = b * BLOCK;
        for i in 0..rows {
            let r = &m[i * cols + first..][..s.len()];
            for (a, &v) in s.iter_mut().zip(r) {
                *a += v.to_f64();
            }
        }
    });
    sums
}

/// `out_i = 2 k_i m_i` for every row `i` of `m` (`dim` wide).
fn scale_rows<T: Real>(out: &mut [T], m: &[T], k: &[f64], dim: usize) {
    out.par_chunks_mut(dim.max(1))
        .zip(m.par_chunks(dim.max(1)))
        .zip(k.par_iter())
        .for_each(|((o, r), &k)| {
            let k = T::from_f64(2.0 * k);
            for (o, &v) in o.iter_mut().zip(r) {
                *o = k * v;
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The composite reference: per row, `d_y` and the log-sum-exp over the candidates.
    fn nca_reference(d: &[Vec<f64>], y: &[usize], paper: bool, eps: f64) -> Vec<f64> {
        d.iter()
            .zip(y)
            .map(|(r, &y)| {
                let p = r.len();
                let cand: Vec<f64> = (0..p)
                    .filter(|&j| !(paper && j == y))
                    .map(|j| -r[j])
                    .collect();
                let m = cand.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let lse = m + cand.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
                let neg = (0..p).filter(|&j| j != y).map(|j| r[j]).sum::<f64>() / (p - 1) as f64;
                if paper {
                    r[y] + lse
                } else {
                    (1.0 - eps) * r[y] + eps * neg + lse
                }
            })
            .collect()
    }

    #[test]
    fn nca_rows_values_and_gradients() {
        let (n, p) = (5, 7);
        let d: Vec<Vec<f64>> = (0..n)
            .map(|i| {
                (0..p)
                    .map(|j| ((i * 7 + j * 3) % 11) as f64 * 0.7)
                    .collect()
            })
            .collect();
        let y = [0usize, 3, 6, 2, 3];
        let labels = Tensor::new(&[0u32, 3, 6, 2, 3], &Device::Cpu).unwrap();
        for (paper, eps) in [(true, 0.0), (false, 0.0), (false, 0.1)] {
            let want = nca_reference(&d, &y, paper, eps);
            let dt = Var::new(d.clone(), &Device::Cpu).unwrap();
            let rows = nca_rows(dt.as_tensor(), &labels, paper, eps).unwrap();
            let got = rows.to_vec1::<f64>().unwrap();
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() < 1e-12, "{paper} {eps}: {a} vs {b}");
            }
            // Gradient of sum(w_i * loss_i) against central differences.
            let w = Tensor::new(&[1.0f64, -0.5, 2.0, 0.25, 1.5], &Device::Cpu).unwrap();
            let g = (rows * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let g = g.get(dt.as_tensor()).unwrap().to_vec2::<f64>().unwrap();
            let wv = w.to_vec1::<f64>().unwrap();
            for i in 0..n {
                for j in 0..p {
                    let h = 1e-6;
                    let mut up = d.clone();
                    up[i][j] += h;
                    let mut dn = d.clone();
                    dn[i][j] -= h;
                    let f = |m: &Vec<Vec<f64>>| {
                        nca_reference(m, &y, paper, eps)
                            .iter()
                            .zip(&wv)
                            .map(|(l, w)| l * w)
                            .sum::<f64>()
                    };
                    let num = (f(&up) - f(&dn)) / (2.0 * h);
                    assert!(
                        (g[i][j] - num).abs() < 1e-6,
                        "grad {paper} {eps} [{i},{j}]: {} vs {num}",
                        g[i][j]
                    );
                }
            }
        }
        // A label outside 0..P: NaN, no panic.
        let bad = Tensor::new(&[0u32, 3, 9, 2, 3], &Device::Cpu).unwrap();
        let dt = Tensor::new(d.clone(), &Device::Cpu).unwrap();
        let rows = nca_rows(&dt, &bad, true, 0.0)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        assert!(rows[2].is_nan() && rows[0].is_finite());
        assert!(nca_rows(&dt, &Tensor::new(&[0u32], &Device::Cpu).unwrap(), true, 0.0).is_err());
    }

    /// 9 points against 21 proxies (two vector chunks and a remainder), the first point
    /// equal to proxy 2, its positive (a distance clamped at 0). No two distances of a row
    /// tie (candle's ReLU passes gradient at exactly 0, PyTorch's and the fused op's do
    /// not). Returns points, proxies (row-major f64), labels and per-row loss weights.
    fn points_case() -> (Vec<f64>, Vec<f64>, Tensor, Tensor) {
        let (n, p, d) = (9usize, 21usize, 5usize);
        let mut xv: Vec<f64> = (0..n * d)
            .map(|i| ((i * 13 % 17) as f64 - 8.0) / 6.0 + 1e-3 * (i as f64).sin())
            .collect();
        let pv: Vec<f64> = (0..p * d)
            .map(|i| ((i * 5 % 11) as f64 - 5.0) / 4.0 + 1e-3 * (i as f64).cos())
            .collect();
        xv[..d].copy_from_slice(&pv[2 * d..3 * d]);
        let labels = Tensor::new(&[2u32, 0, 20, 7, 7, 13, 1, 19, 4], &Device::Cpu).unwrap();
        let w = [1.0f64, -0.5, 2.0, 0.25, 1.5, -1.0, 0.75, 3.0, 0.5];
        (xv, pv, labels, Tensor::new(&w, &Device::Cpu).unwrap())
    }

    /// Runs `fused` and `composed` (rows from points and proxies) on fresh variables of
    /// the case in `dt`, checks rows and both gradients of `Σ w_i row_i` agree (relative
    /// 1e-10 in f64, 2e-5 in f32), and returns the fused op's gradients.
    fn compare_rows(
        dt: DType,
        what: &str,
        fused: impl Fn(&Tensor, &Tensor) -> Tensor,
        composed: impl Fn(&Tensor, &Tensor) -> Tensor,
    ) -> Vec<Vec<f64>> {
        let (xv, pv, _, w) = points_case();
        let tol = if dt == DType::F64 { 1e-10 } else { 2e-5 };
        let var = |v: &[f64]| {
            let t = Tensor::from_vec(v.to_vec(), (v.len() / 5, 5), &Device::Cpu).unwrap();
            Var::from_tensor(&t.to_dtype(dt).unwrap()).unwrap()
        };
        let w = w.to_dtype(dt).unwrap();
        let (x1, p1, x2, p2) = (var(&xv), var(&pv), var(&xv), var(&pv));
        let (r1, r2) = (
            fused(x1.as_tensor(), p1.as_tensor()),
            composed(x2.as_tensor(), p2.as_tensor()),
        );
        let flat = crate::cpu::values;
        let close = |a: &[f64], b: &[f64], part: &str| {
            assert_eq!(a.len(), b.len());
            for (i, (u, v)) in a.iter().zip(b).enumerate() {
                assert!(
                    (u - v).abs() <= tol * v.abs().max(1.0),
                    "{dt:?} {what} {part}[{i}]: {u} vs {v}"
                );
            }
        };
        close(&flat(&r1), &flat(&r2), "rows");
        let grads = |r: &Tensor| (r * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let (g1, g2) = (grads(&r1), grads(&r2));
        // The first backward uses the forward's distances, a second one over the same
        // graph computes them again.
        let again = grads(&r1);
        [(&x1, &x2, "dx"), (&p1, &p2, "dp")]
            .into_iter()
            .map(|(a, b, part)| {
                let ga = flat(g1.get(a.as_tensor()).unwrap());
                close(&ga, &flat(g2.get(b.as_tensor()).unwrap()), part);
                assert_eq!(ga, flat(again.get(a.as_tensor()).unwrap()), "{part} again");
                ga
            })
            .collect()
    }

    #[test]
    fn rows_from_points_match_the_composition_and_its_gradients() {
        let (xv, pv, labels, _) = points_case();
        let (n, p, d) = (9usize, 21usize, 5usize);
        for dt in [DType::F64, DType::F32] {
            for (paper, eps) in [(true, 0.0), (false, 0.0), (false, 0.1)] {
                compare_rows(
                    dt,
                    &format!("nca {paper} {eps}"),
                    |x, pr| nca_rows_from_points(x, pr, &labels, paper, eps).unwrap(),
                    |x, pr| {
                        let dist = crate::ops::pairwise_squared_distances(x, pr).unwrap();
                        nca_rows(&dist, &labels, paper, eps).unwrap()
                    },
                );
            }
        }
        // A label outside the proxies: that row's loss is NaN, the others are not.
        let x = Tensor::from_vec(xv.clone(), (n, d), &Device::Cpu).unwrap();
        let pr = Tensor::from_vec(pv.clone(), (p, d), &Device::Cpu).unwrap();
        let bad = Tensor::new(&[2u32, 0, 21, 7, 7, 13, 1, 19, 4], &Device::Cpu).unwrap();
        let rows = nca_rows_from_points(&x, &pr, &bad, true, 0.0)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        assert!(rows[2].is_nan() && rows.iter().filter(|v| v.is_finite()).count() == n - 1);
        // Shapes, dtypes and an empty proxy set are errors.
        let none = Tensor::zeros((0, d), DType::F64, &Device::Cpu).unwrap();
        assert!(nca_rows_from_points(&x, &none, &labels, true, 0.0).is_err());
        let narrow = pr.narrow(1, 0, 4).unwrap();
        assert!(nca_rows_from_points(&x, &narrow, &labels, true, 0.0).is_err());
        let single = pr.to_dtype(DType::F32).unwrap();
        assert!(nca_rows_from_points(&x, &single, &labels, true, 0.0).is_err());
        let short = labels.narrow(0, 0, 3).unwrap();
        assert!(nca_rows_from_points(&x, &pr, &short, true, 0.0).is_err());
    }

    #[test]
    fn hardest_triplet_rows_match_their_composition_and_the_full_form() {
        let (xv, pv, labels, _) = points_case();
        let (n, p, d) = (9usize, 21usize, 5usize);
        for dt in [DType::F64, DType::F32] {
            for margin in [0.0, 0.5, 3.0] {
                for k in [1usize, 3, 20, 50] {
                    let what = format!("hardest {k}, margin {margin}");
                    let grads = compare_rows(
                        dt,
                        &what,
                        |x, pr| {
                            hardest_triplet_rows_from_points(x, pr, &labels, margin, k).unwrap()
                        },
                        |x, pr| hardest_triplet_rows_composed(x, pr, &labels, margin, k).unwrap(),
                    );
                    if margin == 3.0 {
                        assert!(
                            grads.iter().flatten().any(|v| v.abs() > 1e-3),
                            "{what}: all zero"
                        );
                    }
                    // With every negative among the k, the full form.
                    if k >= p - 1 {
                        compare_rows(
                            dt,
                            &what,
                            |x, pr| {
                                hardest_triplet_rows_from_points(x, pr, &labels, margin, k).unwrap()
                            },
                            |x, pr| triplet_rows_from_points(x, pr, &labels, margin).unwrap(),
                        );
                    }
                }
            }
        }
        // Ties go to the lower proxy index on both paths: proxies 5 and 9 the same point,
        // so one of them is picked with k = 1 wherever they are the nearest negatives.
        let mut tied = pv.clone();
        tied.copy_within(5 * d..6 * d, 9 * d);
        let x = Tensor::from_vec(xv.clone(), (n, d), &Device::Cpu).unwrap();
        let proxy_grads = |composed: bool| {
            let pr = Var::from_vec(tied.clone(), (p, d), &Device::Cpu).unwrap();
            let rows = if composed {
                hardest_triplet_rows_composed(&x, pr.as_tensor(), &labels, 3.0, 1).unwrap()
            } else {
                hardest_triplet_rows_from_points(&x, pr.as_tensor(), &labels, 3.0, 1).unwrap()
            };
            let g = rows.sum_all().unwrap().backward().unwrap();
            crate::cpu::values(g.get(pr.as_tensor()).unwrap())
        };
        let (a, b) = (proxy_grads(false), proxy_grads(true));
        for (u, v) in a.iter().zip(&b) {
            assert!((u - v).abs() < 1e-12, "{a:?} vs {b:?}");
        }
        let norm = |g: &[f64], j: usize| g[j * d..(j + 1) * d].iter().map(|v| v.abs()).sum::<f64>();
        assert!(
            norm(&a, 5) > 0.0 && norm(&a, 9) == 0.0,
            "the lower index wins the tie"
        );
        assert_eq!(hardest(&[0.5f64, 0.2, 0.9, 0.2, 0.1], 4, 1), [1]);
        let mut two = hardest(&[0.5f64, 0.2, 0.9, 0.2, 0.1], 4, 2);
        two.sort();
        assert_eq!(two, [1, 3]);
        // A bad label gives NaN for its row; k = 0 or one proxy is an error.
        let pr = Tensor::from_vec(pv.clone(), (p, d), &Device::Cpu).unwrap();
        let bad = Tensor::new(&[2u32, 0, 21, 7, 7, 13, 1, 19, 4], &Device::Cpu).unwrap();
        let rows = hardest_triplet_rows_from_points(&x, &pr, &bad, 0.1, 3).unwrap();
        let rows = crate::cpu::values(&rows);
        assert!(rows[2].is_nan() && rows.iter().filter(|v| v.is_finite()).count() == n - 1);
        assert!(hardest_triplet_rows_from_points(&x, &pr, &labels, 0.1, 0).is_err());
        // Any k beyond the row is all negatives (and allocates for the row, not for k).
        let all = crate::cpu::values(&triplet_rows_from_points(&x, &pr, &labels, 0.5).unwrap());
        let huge = hardest_triplet_rows_from_points(&x, &pr, &labels, 0.5, usize::MAX).unwrap();
        for (u, v) in crate::cpu::values(&huge).iter().zip(&all) {
            assert!((u - v).abs() < 1e-12, "{u} vs {v}");
        }
        let one = pr.narrow(0, 0, 1).unwrap();
        let zeros = Tensor::zeros(n, DType::U32, &Device::Cpu).unwrap();
        assert!(hardest_triplet_rows_from_points(&x, &one, &zeros, 0.1, 1).is_err());
    }

    #[test]
    fn triplet_rows_from_points_match_their_composition() {
        // Margins that leave some hinges active and some not.
        let (xv, pv, labels, _) = points_case();
        let (n, p, d) = (9usize, 21usize, 5usize);
        for dt in [DType::F64, DType::F32] {
            for margin in [0.0, 0.5, 3.0, 100.0] {
                let grads = compare_rows(
                    dt,
                    &format!("triplet {margin}"),
                    |x, pr| triplet_rows_from_points(x, pr, &labels, margin).unwrap(),
                    |x, pr| triplet_rows_composed(x, pr, &labels, margin).unwrap(),
                );
                if margin == 0.5 {
                    assert!(grads.iter().flatten().any(|v| v.abs() > 1e-3), "all zero");
                }
            }
        }
        // A bad label gives NaN for its row; one proxy, or none, is an error.
        let x = Tensor::from_vec(xv.clone(), (n, d), &Device::Cpu).unwrap();
        let pr = Tensor::from_vec(pv.clone(), (p, d), &Device::Cpu).unwrap();
        let bad = Tensor::new(&[2u32, 0, 21, 7, 7, 13, 1, 19, 4], &Device::Cpu).unwrap();
        let rows = triplet_rows_from_points(&x, &pr, &bad, 0.1)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        assert!(rows[2].is_nan() && rows.iter().filter(|v| v.is_finite()).count() == n - 1);
        // A NaN point makes its row NaN in both objectives (the trainer skips such steps).
        let mut nan = xv.clone();
        nan[3 * d + 1] = f64::NAN;
        let xn = Tensor::from_vec(nan, (n, d), &Device::Cpu).unwrap();
        for rows in [
            triplet_rows_from_points(&xn, &pr, &labels, 0.1).unwrap(),
            nca_rows_from_points(&xn, &pr, &labels, true, 0.0).unwrap(),
        ] {
            let rows = rows.to_vec1::<f64>().unwrap();
            assert!(rows[3].is_nan() && rows[4].is_finite(), "{rows:?}");
        }
        let one = pr.narrow(0, 0, 1).unwrap();
        let zeros = Tensor::zeros(n, DType::U32, &Device::Cpu).unwrap();
        assert!(triplet_rows_from_points(&x, &one, &zeros, 0.1).is_err());
    }
}
