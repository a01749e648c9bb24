//! Small tensor operations shared by the crates above.

use candle_core::backend::BackendStorage;
#[cfg(feature = "cuda")]
use candle_core::CudaStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::{from_f64s, slice, to_f64s};

/// Divides each row of `x` (`[N, D]`) by its L2 norm; rows with a norm below `1e-12`
/// are divided by `1e-12` instead, so a zero row stays zero rather than becoming NaN.
/// Differentiable.
pub fn l2_normalize_rows(x: &Tensor) -> Result<Tensor> {
    let norm = x
        .sqr()?
        .sum_keepdim(1)?
        .sqrt()?
        .clamp(1e-12, f64::INFINITY)?;
    x.broadcast_div(&norm)
}

/// The NCA objective of each row of a distance matrix `dist` (`[N, P]`, f32 or f64)
/// against the column its label names (`labels`: `[N]`, u8, u32 or i64), in one pass:
///
/// - `exclude_positive` (Proxy-NCA's paper form): `d_iy + logsumexp_{j≠y}(-d_ij)`;
/// - otherwise (softmax cross-entropy over `-d`, label smoothing `ε`):
///   `(1-ε) d_iy + ε mean_{j≠y} d_ij + logsumexp_j(-d_ij)`.
///
/// Returns `[N]`, differentiable with respect to `dist`. A label outside `0..P` gives NaN
/// (no host synchronisation to check it; callers that want an error check first). On CUDA
/// one kernel per direction replaces the gather, masks, log-sum-exp and their gradients.
pub fn nca_rows(
    dist: &Tensor,
    labels: &Tensor,
    exclude_positive: bool,
    smoothing: f64,
) -> Result<Tensor> {
    let (n, _) = dist.dims2()?;
    if labels.dims() != [n] {
        candle_core::bail!("nca_rows: {:?} labels for {n} rows", labels.dims());
    }
    if !matches!(dist.dtype(), DType::F32 | DType::F64) {
        candle_core::bail!(
            "nca_rows: distances must be f32 or f64, not {:?}",
            dist.dtype()
        );
    }
    let labels = labels.to_dtype(DType::U32)?.contiguous()?;
    let op = NcaRows(NcaForm {
        paper: exclude_positive,
        smoothing,
    });
    dist.contiguous()?
        .apply_op2(&labels, op)?
        .narrow(1, 0, 1)?
        .squeeze(1)
}

/// Which NCA objective: the paper form (positive left out) or the softmax form with
/// label smoothing.
#[derive(Debug, Clone, Copy)]
struct NcaForm {
    paper: bool,
    smoothing: f64,
}

/// `(dist, labels) -> [N, 2]`: loss and log-sum-exp per row.
struct NcaRows(NcaForm);

impl NcaForm {
    /// One row's (loss, log-sum-exp).
    fn row(&self, r: &[f64], y: usize) -> (f64, f64) {
        let p = r.len();
        let cand = |j: usize| !(self.paper && j == y);
        let m = (0..p)
            .filter(|&j| cand(j))
            .map(|j| -r[j])
            .fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = (0..p).filter(|&j| cand(j)).map(|j| (-r[j] - m).exp()).sum();
        let lse = m + sum.ln();
        if y >= p {
            return (f64::NAN, lse);
        }
        let loss = if self.paper {
            r[y] + lse
        } else {
            let neg: f64 = (0..p).filter(|&j| j != y).map(|j| r[j]).sum();
            let mean_neg = if p > 1 { neg / (p - 1) as f64 } else { 0.0 };
            (1.0 - self.smoothing) * r[y] + self.smoothing * mean_neg + lse
        };
        (loss, lse)
    }

    /// `∂loss/∂d_ij` times the row's output gradient.
    fn grad(&self, d: f64, j: usize, y: usize, p: usize, lse: f64, g: f64) -> f64 {
        if y >= p {
            return f64::NAN;
        }
        let soft = (-d - lse).exp();
        if self.paper {
            if j == y {
                g
            } else {
                -g * soft
            }
        } else {
            let target = if j == y {
                1.0 - self.smoothing
            } else if p > 1 {
                self.smoothing / (p - 1) as f64
            } else {
                0.0
            };
            g * (target - soft)
        }
    }
}

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
        let (n, p) = l1.shape().dims2()?;
        let d = to_f64s(s1, l1)?;
        let labels = slice::<u32>(s2, l2)?;
        let out: Vec<f64> = d
            .par_chunks(p.max(1))
            .zip(labels.par_iter())
            .flat_map_iter(|(r, &y)| {
                let (loss, lse) = self.0.row(r, y as usize);
                [loss, lse]
            })
            .collect();
        Ok((from_f64s(s1.dtype(), out), Shape::from((n, 2))))
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
        let (_, p) = l1.shape().dims2()?;
        let d = to_f64s(s1, l1)?;
        let res = to_f64s(s2, l2)?;
        let g = to_f64s(s3, l3)?;
        let labels = self.labels.to_vec1::<u32>()?;
        let mut out = vec![0f64; d.len()];
        out.par_chunks_mut(p.max(1))
            .zip(d.par_chunks(p.max(1)))
            .enumerate()
            .for_each(|(i, (o, r))| {
                let (y, lse, gi) = (labels[i] as usize, res[2 * i + 1], g[2 * i]);
                for (j, (o, &v)) in o.iter_mut().zip(r).enumerate() {
                    *o = self.form.grad(v, j, y, p, lse, gi);
                }
            });
        Ok((from_f64s(s1.dtype(), out), l1.shape().clone()))
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

    #[test]
    fn unit_rows_and_zero_rows() {
        let x = Tensor::new(&[[3f32, 4.0], [0.0, 0.0]], &Device::Cpu).unwrap();
        let y = l2_normalize_rows(&x).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(y, vec![vec![0.6, 0.8], vec![0.0, 0.0]]);
    }
}
