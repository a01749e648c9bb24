//! Proxy-NCA (paper section 3.2, equation 5) with static proxy assignment.

use candle_core::{DType, Tensor, D};
use candle_nn::{Init, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::{LossError, Result};

/// Which Proxy-NCA the loss computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProxyNcaForm {
    /// The paper's equation: `-log( exp(-d(x,p_y)) / Σ_{z≠y} exp(-d(x,p_z)) )`, i.e. the
    /// positive proxy is *excluded* from the denominator. Computed as
    /// `d(x,p_y) + logsumexp_{z≠y}(-d(x,p_z))`, which is stable for any distance.
    /// It is bounded below by `-ln(P-1)`, not by 0, and needs at least two proxies.
    #[default]
    Paper,
    /// Softmax cross-entropy over `-d(x,p_z)` for all proxies, the positive included, as
    /// most public reimplementations compute it. Supports label smoothing.
    Softmax,
}

/// How proxies are initialised.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProxyInit {
    /// `N(0, 1/8²)`, i.e. `randn / 8` as in the public Proxy-NCA reproductions.
    #[default]
    Normal,
    /// Xavier (Glorot) uniform: `U(-b, b)`, `b = sqrt(6 / (P + D))`.
    Xavier,
}

/// Settings of [`proxy_nca`].
///
/// Embeddings and proxies are L2-normalised and then multiplied by
/// `embedding_scale` (`s_x`) and `proxy_scale` (`s_p`), so the squared distance is
/// `d = s_x² + s_p² - 2 s_x s_p cos(x, p)`: the logits `-d` are the cosine similarity
/// times `2 s_x s_p`, plus a constant that the softmax ignores. With `s_x = s_p = s`
/// that is `2 s² cos + const`; the scales act as an inverse temperature. The paper
/// normalises without scaling (`s = 1`); public reproductions use `s = 3`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProxyNcaConfig {
    /// Paper (positive excluded) or softmax form.
    pub form: ProxyNcaForm,
    /// `s_x`, multiplies the normalised embeddings.
    pub embedding_scale: f64,
    /// `s_p`, multiplies the normalised proxies.
    pub proxy_scale: f64,
    /// Label smoothing ε (softmax form only): the positive's target is `1-ε`, every
    /// other proxy's `ε/(P-1)`.
    pub label_smoothing: f64,
    /// Check inputs for NaN/inf and return [`LossError::NonFinite`] (one host sync).
    pub check_finite: bool,
}

impl Default for ProxyNcaConfig {
    fn default() -> Self {
        Self {
            form: ProxyNcaForm::Paper,
            embedding_scale: 3.0,
            proxy_scale: 3.0,
            label_smoothing: 0.0,
            check_finite: true,
        }
    }
}

impl ProxyNcaConfig {
    /// Validates the settings.
    pub fn check(&self) -> Result<()> {
        let bad = |m: String| Err(LossError::Config(m));
        if !(self.embedding_scale > 0.0 && self.embedding_scale.is_finite()) {
            return bad(format!(
                "embedding_scale must be > 0, got {}",
                self.embedding_scale
            ));
        }
        if !(self.proxy_scale > 0.0 && self.proxy_scale.is_finite()) {
            return bad(format!("proxy_scale must be > 0, got {}", self.proxy_scale));
        }
        if !(0.0..1.0).contains(&self.label_smoothing) {
            return bad(format!(
                "label_smoothing must be in [0, 1), got {}",
                self.label_smoothing
            ));
        }
        if self.form == ProxyNcaForm::Paper && self.label_smoothing != 0.0 {
            return bad("label smoothing applies to the softmax form only".into());
        }
        Ok(())
    }
}

/// Squared Euclidean distances between the rows of `a` `[N,D]` and `b` `[P,D]`, `[N,P]`,
/// as `|a|² + |b|² - 2 a·b`, clamped at 0 against rounding.
pub fn pairwise_squared_distances(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let aa = a.sqr()?.sum_keepdim(1)?; // [N,1]
    let bb = b.sqr()?.sum_keepdim(1)?.t()?; // [1,P]
    let ab = a.matmul(&b.t()?)?; // [N,P]
    Ok(aa.broadcast_add(&bb)?.broadcast_sub(&(ab * 2.0)?)?.relu()?)
}

fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    Ok(nofuss_tensor::ops::l2_normalize_rows(x)?)
}

/// Reads labels to the host and checks them against the number of proxies.
fn host_labels(labels: &Tensor, n: usize, num_proxies: usize) -> Result<Vec<i64>> {
    if labels.dims() != [n] {
        return Err(LossError::Shape(format!(
            "labels have shape {:?}, expected [{n}]",
            labels.dims()
        )));
    }
    let v: Vec<i64> = match labels.dtype() {
        DType::U8 | DType::U32 | DType::I64 => labels.to_dtype(DType::I64)?.to_vec1()?,
        other => return Err(LossError::LabelDtype(other)),
    };
    for (index, &label) in v.iter().enumerate() {
        if label < 0 || label as usize >= num_proxies {
            return Err(LossError::LabelOutOfRange {
                label,
                index,
                num_proxies,
            });
        }
    }
    Ok(v)
}

fn check_finite(t: &Tensor, what: &'static str) -> Result<()> {
    let s = t
        .to_dtype(DType::F32)?
        .abs()?
        .sum_all()?
        .to_scalar::<f32>()?;
    if s.is_finite() {
        Ok(())
    } else {
        Err(LossError::NonFinite(what))
    }
}

/// Row-wise `log Σ exp(x)` over the last dimension, stable (the row max is taken out).
/// Entries equal to `-inf` contribute nothing.
fn log_sum_exp_rows(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    let s = x.broadcast_sub(&m)?.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok((s + m)?.squeeze(D::Minus1)?)
}

/// Proxy-NCA loss with static assignment, averaged over the batch.
///
/// `embeddings` `[N,D]` (any float dtype, computed in f32), `labels` `[N]` (u8, u32
/// or i64, each in `0..P`), `proxies` `[P,D]`. Returns a scalar f32 tensor that
/// differentiates with respect to embeddings and proxies.
pub fn proxy_nca(
    embeddings: &Tensor,
    labels: &Tensor,
    proxies: &Tensor,
    cfg: &ProxyNcaConfig,
) -> Result<Tensor> {
    cfg.check()?;
    let (n, d) = embeddings.dims2().map_err(|_| {
        LossError::Shape(format!("embeddings {:?} are not [N,D]", embeddings.dims()))
    })?;
    let (p, pd) = proxies
        .dims2()
        .map_err(|_| LossError::Shape(format!("proxies {:?} are not [P,D]", proxies.dims())))?;
    if n == 0 {
        return Err(LossError::EmptyBatch);
    }
    if d != pd {
        return Err(LossError::Shape(format!(
            "embedding dimension {d} differs from proxy dimension {pd}"
        )));
    }
    if cfg.form == ProxyNcaForm::Paper && p < 2 {
        return Err(LossError::Config(format!(
            "the paper form excludes the positive proxy and needs at least 2 proxies, got {p}"
        )));
    }
    host_labels(labels, n, p)?;
    let x = embeddings.to_dtype(DType::F32)?;
    let pr = proxies.to_dtype(DType::F32)?;
    if cfg.check_finite {
        check_finite(&x, "embeddings")?;
        check_finite(&pr, "proxies")?;
    }
    let x = (l2_normalize(&x)? * cfg.embedding_scale)?;
    let pr = (l2_normalize(&pr)? * cfg.proxy_scale)?;
    let dist = pairwise_squared_distances(&x, &pr)?; // [N,P]
    let device = x.device();
    let ids = Tensor::arange(0u32, p as u32, device)?.unsqueeze(0)?;
    let mask = labels
        .to_dtype(DType::U32)?
        .unsqueeze(1)?
        .broadcast_eq(&ids)?; // [N,P] u8
    let mask_f = mask.to_dtype(DType::F32)?;
    let logits = dist.neg()?;
    let per_example = match cfg.form {
        ProxyNcaForm::Paper => {
            let d_pos = (&dist * &mask_f)?.sum(1)?;
            let neg_inf = Tensor::full(f32::NEG_INFINITY, (n, p), device)?;
            let negatives = mask.where_cond(&neg_inf, &logits)?;
            (d_pos + log_sum_exp_rows(&negatives)?)?
        }
        ProxyNcaForm::Softmax => {
            let log_probs = logits.broadcast_sub(&log_sum_exp_rows(&logits)?.unsqueeze(1)?)?;
            let eps = cfg.label_smoothing;
            let target = if eps > 0.0 && p > 1 {
                ((&mask_f * (1.0 - eps - eps / (p - 1) as f64))? + eps / (p - 1) as f64)?
            } else {
                mask_f
            };
            (target * log_probs)?.sum(1)?.neg()?
        }
    };
    Ok(per_example.mean_all()?)
}

/// Proxy-NCA with one learned proxy per class (static assignment), owning its proxies.
///
/// The proxies are created through the given `VarBuilder` under the name `proxies`,
/// so they live in the caller's `VarMap` and can get their own optimizer and learning rate.
#[derive(Debug, Clone)]
pub struct ProxyNca {
    proxies: Tensor,
    cfg: ProxyNcaConfig,
}

impl ProxyNca {
    /// Creates `num_classes` proxies of dimension `dim`.
    pub fn new(
        num_classes: usize,
        dim: usize,
        init: ProxyInit,
        cfg: ProxyNcaConfig,
        vb: VarBuilder,
    ) -> Result<Self> {
        cfg.check()?;
        if num_classes == 0 || dim == 0 {
            return Err(LossError::Config(format!(
                "need at least one class and one dimension, got {num_classes} x {dim}"
            )));
        }
        let hint = match init {
            ProxyInit::Normal => Init::Randn {
                mean: 0.0,
                stdev: 0.125,
            },
            ProxyInit::Xavier => {
                let b = (6.0 / (num_classes + dim) as f64).sqrt();
                Init::Uniform { lo: -b, up: b }
            }
        };
        let proxies = vb.get_with_hints((num_classes, dim), "proxies", hint)?;
        Ok(Self { proxies, cfg })
    }

    /// The proxies, `[P,D]`.
    pub fn proxies(&self) -> &Tensor {
        &self.proxies
    }

    /// The settings.
    pub fn config(&self) -> &ProxyNcaConfig {
        &self.cfg
    }

    /// The loss of a batch, see [`proxy_nca`].
    pub fn loss(&self, embeddings: &Tensor, labels: &Tensor) -> Result<Tensor> {
        proxy_nca(embeddings, labels, &self.proxies, &self.cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Reference by direct scalar arithmetic in f64, independent of the tensor code.
    fn scalar_reference(x: &[Vec<f64>], y: &[usize], p: &[Vec<f64>], cfg: &ProxyNcaConfig) -> f64 {
        let norm = |v: &Vec<f64>, s: f64| {
            let n = v.iter().map(|a| a * a).sum::<f64>().sqrt();
            v.iter().map(|a| a / n * s).collect::<Vec<_>>()
        };
        let mut total = 0.0;
        for (xi, &yi) in x.iter().zip(y) {
            let xn = norm(xi, cfg.embedding_scale);
            let d: Vec<f64> = p
                .iter()
                .map(|pj| {
                    let pn = norm(pj, cfg.proxy_scale);
                    xn.iter().zip(&pn).map(|(a, b)| (a - b).powi(2)).sum()
                })
                .collect();
            total += match cfg.form {
                ProxyNcaForm::Paper => {
                    let denom: f64 = (0..p.len())
                        .filter(|&j| j != yi)
                        .map(|j| (-d[j]).exp())
                        .sum();
                    -((-d[yi]).exp() / denom).ln()
                }
                ProxyNcaForm::Softmax => {
                    let denom: f64 = d.iter().map(|dj| (-dj).exp()).sum();
                    let eps = cfg.label_smoothing;
                    (0..p.len())
                        .map(|j| {
                            let t = if j == yi {
                                1.0 - eps
                            } else {
                                eps / (p.len() - 1) as f64
                            };
                            -t * ((-d[j]).exp() / denom).ln()
                        })
                        .sum()
                }
            };
        }
        total / x.len() as f64
    }

    fn t2(v: &[Vec<f64>]) -> Tensor {
        let flat: Vec<f32> = v.iter().flatten().map(|&a| a as f32).collect();
        Tensor::from_vec(flat, (v.len(), v[0].len()), &Device::Cpu).unwrap()
    }

    fn case() -> (Vec<Vec<f64>>, Vec<usize>, Vec<Vec<f64>>) {
        let x = vec![
            vec![1.0, 0.2, -0.3],
            vec![-0.5, 1.0, 0.1],
            vec![0.3, -0.2, 2.0],
            vec![0.9, 0.8, 0.7],
        ];
        let y = vec![0, 1, 3, 0];
        let p = vec![
            vec![0.8, 0.1, 0.0],
            vec![0.0, 1.0, 0.3],
            vec![-1.0, -0.5, 0.2],
            vec![0.1, 0.1, 1.5],
        ];
        (x, y, p)
    }

    #[test]
    fn matches_scalar_reference_in_every_form() {
        let (x, y, p) = case();
        let labels = Tensor::new(
            y.iter().map(|&v| v as u32).collect::<Vec<_>>().as_slice(),
            &Device::Cpu,
        )
        .unwrap();
        let cfgs = [
            ProxyNcaConfig {
                embedding_scale: 1.0,
                proxy_scale: 1.0,
                ..Default::default()
            },
            ProxyNcaConfig::default(),
            ProxyNcaConfig {
                form: ProxyNcaForm::Softmax,
                ..Default::default()
            },
            ProxyNcaConfig {
                form: ProxyNcaForm::Softmax,
                label_smoothing: 0.1,
                embedding_scale: 2.0,
                proxy_scale: 4.0,
                ..Default::default()
            },
        ];
        for cfg in cfgs {
            let got = proxy_nca(&t2(&x), &labels, &t2(&p), &cfg)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let want = scalar_reference(&x, &y, &p, &cfg);
            assert!((got as f64 - want).abs() < 1e-4, "{cfg:?}: {got} vs {want}");
        }
    }

    #[test]
    fn softmax_form_equals_candle_cross_entropy() {
        let (x, y, p) = case();
        let labels = Tensor::new(
            y.iter().map(|&v| v as u32).collect::<Vec<_>>().as_slice(),
            &Device::Cpu,
        )
        .unwrap();
        let cfg = ProxyNcaConfig {
            form: ProxyNcaForm::Softmax,
            ..Default::default()
        };
        let ours = proxy_nca(&t2(&x), &labels, &t2(&p), &cfg)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let xn = (l2_normalize(&t2(&x)).unwrap() * 3.0).unwrap();
        let pn = (l2_normalize(&t2(&p)).unwrap() * 3.0).unwrap();
        let logits = pairwise_squared_distances(&xn, &pn).unwrap().neg().unwrap();
        let ce = candle_nn::loss::cross_entropy(&logits, &labels)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((ours - ce).abs() < 1e-5, "{ours} vs {ce}");
    }

    #[test]
    fn stable_at_large_scales() {
        let (x, y, p) = case();
        let labels = Tensor::new(
            y.iter().map(|&v| v as u32).collect::<Vec<_>>().as_slice(),
            &Device::Cpu,
        )
        .unwrap();
        let cfg = ProxyNcaConfig {
            embedding_scale: 40.0,
            proxy_scale: 40.0,
            ..Default::default()
        };
        let v = proxy_nca(&t2(&x), &labels, &t2(&p), &cfg)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(v.is_finite(), "{v}");
    }

    #[test]
    fn gradients_reach_embeddings_and_proxies() {
        let (x, y, p) = case();
        let labels = Tensor::new(
            y.iter().map(|&v| v as i64).collect::<Vec<_>>().as_slice(),
            &Device::Cpu,
        )
        .unwrap();
        let xv = candle_core::Var::from_tensor(&t2(&x)).unwrap();
        let pv = candle_core::Var::from_tensor(&t2(&p)).unwrap();
        let loss = proxy_nca(
            xv.as_tensor(),
            &labels,
            pv.as_tensor(),
            &ProxyNcaConfig::default(),
        )
        .unwrap();
        let grads = loss.backward().unwrap();
        for v in [&xv, &pv] {
            let g = grads.get(v).expect("gradient");
            let s = g
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(s > 0.0 && s.is_finite());
        }
    }

    #[test]
    fn bad_input_is_a_typed_error() {
        let dev = Device::Cpu;
        let cfg = ProxyNcaConfig::default();
        let x = Tensor::zeros((2, 3), DType::F32, &dev).unwrap();
        let p = Tensor::ones((4, 3), DType::F32, &dev).unwrap();
        let ok_labels = Tensor::new(&[0u32, 1], &dev).unwrap();
        let e = proxy_nca(&x, &Tensor::new(&[0u32, 4], &dev).unwrap(), &p, &cfg).unwrap_err();
        assert!(
            matches!(
                e,
                LossError::LabelOutOfRange {
                    label: 4,
                    index: 1,
                    num_proxies: 4
                }
            ),
            "{e}"
        );
        let e = proxy_nca(&x, &Tensor::new(&[0i64, -1], &dev).unwrap(), &p, &cfg).unwrap_err();
        assert!(matches!(e, LossError::LabelOutOfRange { label: -1, .. }));
        let e = proxy_nca(&x, &Tensor::new(&[0f32, 1.0], &dev).unwrap(), &p, &cfg).unwrap_err();
        assert!(matches!(e, LossError::LabelDtype(DType::F32)));
        let e = proxy_nca(&x, &Tensor::new(&[0u32], &dev).unwrap(), &p, &cfg).unwrap_err();
        assert!(matches!(e, LossError::Shape(_)));
        let e = proxy_nca(
            &Tensor::zeros((0, 3), DType::F32, &dev).unwrap(),
            &Tensor::zeros(0, DType::U32, &dev).unwrap(),
            &p,
            &cfg,
        )
        .unwrap_err();
        assert!(matches!(e, LossError::EmptyBatch));
        let e = proxy_nca(
            &Tensor::zeros((2, 5), DType::F32, &dev).unwrap(),
            &ok_labels,
            &p,
            &cfg,
        )
        .unwrap_err();
        assert!(matches!(e, LossError::Shape(_)));
        let nan = Tensor::new(&[[f32::NAN, 0.0, 0.0], [1.0, 0.0, 0.0]], &dev).unwrap();
        let e = proxy_nca(&nan, &ok_labels, &p, &cfg).unwrap_err();
        assert!(matches!(e, LossError::NonFinite("embeddings")));
        let e = proxy_nca(&x, &ok_labels, &p.narrow(0, 0, 1).unwrap(), &cfg).unwrap_err();
        assert!(matches!(
            e,
            LossError::LabelOutOfRange { .. } | LossError::Config(_)
        ));
        let bad = ProxyNcaConfig {
            label_smoothing: 0.1,
            ..Default::default()
        };
        assert!(matches!(
            proxy_nca(&x, &ok_labels, &p, &bad).unwrap_err(),
            LossError::Config(_)
        ));
        let bad = ProxyNcaConfig {
            embedding_scale: 0.0,
            ..Default::default()
        };
        assert!(matches!(bad.check().unwrap_err(), LossError::Config(_)));
    }

    #[test]
    fn zero_embedding_does_not_produce_nan() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((2, 3), DType::F32, &dev).unwrap();
        let p = Tensor::new(&[[1f32, 0.0, 0.0], [0.0, 1.0, 0.0]], &dev).unwrap();
        let l = proxy_nca(
            &x,
            &Tensor::new(&[0u32, 1], &dev).unwrap(),
            &p,
            &ProxyNcaConfig::default(),
        )
        .unwrap();
        assert!(l.to_scalar::<f32>().unwrap().is_finite());
    }
}
