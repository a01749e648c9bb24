//! Proxy-NCA (paper section 3.2, equation 5) with static proxy assignment.

use candle_core::Tensor;
use candle_nn::{Init, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::assignment::{proxy_distances, static_inputs, Assignment, Selection};
use crate::common::{check_scale, keep_or_neg_inf, log_sum_exp_rows};
use crate::on_device::{dynamic_selection, DeviceSelection};
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
    /// The means of the classes' embeddings at the start of training, see
    /// [`class_mean_proxies`]; the proxies are created `Normal` and the caller (the
    /// trainer) overwrites them once it has embedded the training data. Dynamic
    /// assignment needs a start like this: with random proxies an untrained network puts
    /// every example on one proxy, and nothing can be learned.
    ClassMeans,
}

/// Proxies at class means: `num_proxies` rows from `embeddings` `[N,D]` with `classes`
/// `[N]`. Classes are taken in increasing id order; proxy `j` is the mean of the classes
/// `j, j + P, j + 2P, ...` of that order (one class per proxy when `P >= C`); proxies
/// beyond the number of classes take single examples, in batch order. Returns `[P,D]`.
pub fn class_mean_proxies(
    embeddings: &Tensor,
    classes: &[i64],
    num_proxies: usize,
) -> Result<Tensor> {
    let (n, d) = crate::common::embedding_dims(embeddings)?;
    if classes.len() != n || num_proxies == 0 {
        return Err(LossError::Shape(format!(
            "{} classes for {n} embeddings, {num_proxies} proxies",
            classes.len()
        )));
    }
    let x: Vec<Vec<f64>> = embeddings.to_dtype(candle_core::DType::F64)?.to_vec2()?;
    let mut ids: Vec<i64> = classes.to_vec();
    ids.sort_unstable();
    ids.dedup();
    let mut sums = vec![vec![0f64; d]; num_proxies];
    let mut counts = vec![0usize; num_proxies];
    for (row, c) in x.iter().zip(classes) {
        let rank = ids.binary_search(c).unwrap_or(0);
        let j = rank % num_proxies;
        counts[j] += 1;
        for (s, v) in sums[j].iter_mut().zip(row) {
            *s += v;
        }
    }
    let mut spare = x.iter();
    let mut out = Vec::with_capacity(num_proxies * d);
    for (s, &c) in sums.iter().zip(&counts) {
        if c > 0 {
            out.extend(s.iter().map(|v| v / c as f64));
        } else {
            let row = spare.next().unwrap_or(&x[0]);
            out.extend(row.iter().copied());
        }
    }
    Ok(
        Tensor::from_vec(out, (num_proxies, d), embeddings.device())?
            .to_dtype(embeddings.dtype())?,
    )
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
    /// Label smoothing ε (softmax form only): the positive's target is `1-ε`, each
    /// negative proxy's `ε/(number of negatives)` (`ε/(P-1)` with static assignment).
    pub label_smoothing: f64,
    /// Check inputs for NaN/inf and return [`LossError::NonFinite`] (one host sync).
    pub check_finite: bool,
    /// Static (one proxy per class) or dynamic (nearest proxy) assignment.
    pub assignment: Assignment,
}

impl Default for ProxyNcaConfig {
    fn default() -> Self {
        Self {
            form: ProxyNcaForm::Paper,
            embedding_scale: 3.0,
            proxy_scale: 3.0,
            label_smoothing: 0.0,
            check_finite: true,
            assignment: Assignment::Static,
        }
    }
}

impl ProxyNcaConfig {
    /// Validates the settings.
    pub fn check(&self) -> Result<()> {
        let bad = |m: String| Err(LossError::Config(m));
        check_scale("embedding_scale", self.embedding_scale)?;
        check_scale("proxy_scale", self.proxy_scale)?;
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

/// Proxy-NCA loss, averaged over the anchors that take part.
///
/// `embeddings` `[N,D]` (f64 is computed in f64, every other float dtype in f32),
/// `labels` `[N]` (u8, u32 or i64: proxy rows for static assignment, any class ids for
/// dynamic), `proxies` `[P,D]`. Returns a scalar tensor that differentiates with respect
/// to embeddings and proxies. Only the `N x P` distances are materialised.
pub fn proxy_nca(
    embeddings: &Tensor,
    labels: &Tensor,
    proxies: &Tensor,
    cfg: &ProxyNcaConfig,
) -> Result<Tensor> {
    Ok(proxy_nca_counted(embeddings, labels, proxies, cfg)?.0)
}

/// [`proxy_nca`] and, when the anchors were picked on the device, how many took part
/// (a scalar tensor there: 0 when none did and the loss is 0).
pub(crate) fn proxy_nca_counted(
    embeddings: &Tensor,
    labels: &Tensor,
    proxies: &Tensor,
    cfg: &ProxyNcaConfig,
) -> Result<(Tensor, Option<Tensor>)> {
    cfg.check()?;
    // The paper form leaves the positive out of the denominator: it needs a second proxy.
    let min = if cfg.form == ProxyNcaForm::Paper {
        2
    } else {
        1
    };
    if cfg.assignment == Assignment::Static {
        return Ok((
            static_proxy_nca(embeddings, labels, proxies, cfg, min)?,
            None,
        ));
    }
    let scales = (cfg.embedding_scale, cfg.proxy_scale);
    let what = (min, "Proxy-NCA in the paper form");
    if crate::on_device::picks_on_device(embeddings, None) {
        let sel = dynamic_selection(
            embeddings,
            labels,
            proxies,
            (scales, cfg.check_finite, None),
            what,
        )?;
        let loss = nca_over_device_selection(&sel, cfg.form, cfg.label_smoothing)?;
        return Ok((loss, Some(sel.anchor_count()?)));
    }
    let (dist, sel) = proxy_distances(
        embeddings,
        labels,
        proxies,
        (scales, cfg.check_finite, cfg.assignment, None),
        what,
    )?;
    Ok((
        nca_over_selection(&dist, &sel, cfg.form, cfg.label_smoothing)?,
        None,
    ))
}

/// Static assignment: every example is an anchor whose positive is its label's proxy, so
/// the objective is one fused pass over the distance rows
/// ([`nofuss_tensor::ops::nca_rows_from_points`]: on the CPU one operation from the
/// normalised points and proxies, no `[N, P]` tensor in the graph). Labels are checked as
/// `static_inputs` says.
fn static_proxy_nca(
    embeddings: &Tensor,
    labels: &Tensor,
    proxies: &Tensor,
    cfg: &ProxyNcaConfig,
    min_proxies: usize,
) -> Result<Tensor> {
    let (x, pr, labels) = static_inputs(
        embeddings,
        labels,
        proxies,
        ((cfg.embedding_scale, cfg.proxy_scale), cfg.check_finite),
        (min_proxies, "Proxy-NCA in the paper form"),
    )?;
    let paper = cfg.form == ProxyNcaForm::Paper;
    let rows =
        nofuss_tensor::ops::nca_rows_from_points(&x, &pr, &labels, paper, cfg.label_smoothing)?;
    Ok(rows.mean(0)?)
}

/// The NCA objective of each selected anchor against its positive and negative proxies,
/// averaged: paper form `d_pos + logsumexp_neg(-d)`, softmax form
/// `Σ_c t_c d_c + logsumexp_{pos ∪ neg}(-d)` with targets `t` (label smoothing spreads `ε`
/// over the negatives).
pub(crate) fn nca_over_selection(
    dist: &Tensor,
    sel: &Selection,
    form: ProxyNcaForm,
    smoothing: f64,
) -> Result<Tensor> {
    let device = dist.device();
    let a = sel.anchors.len();
    let p = sel.num_proxies;
    let dist = sel.anchor_rows(dist)?; // [A,P]
    let pos_idx = Tensor::from_slice(&sel.positive, (a, 1), device)?;
    let d_pos = dist.gather(&pos_idx, 1)?.squeeze(1)?; // [A]
    let neg = Tensor::from_slice(&sel.negatives, (a, p), device)?;
    let per_anchor = match form {
        ProxyNcaForm::Paper => (d_pos + log_sum_exp_rows(&keep_or_neg_inf(&neg, &dist.neg()?)?)?)?,
        ProxyNcaForm::Softmax => {
            let mut cand = sel.negatives.clone();
            for (r, &j) in sel.positive.iter().enumerate() {
                cand[r * p + j as usize] = 1;
            }
            let cand = Tensor::from_vec(cand, (a, p), device)?;
            let lse = log_sum_exp_rows(&keep_or_neg_inf(&cand, &dist.neg()?)?)?;
            if smoothing > 0.0 {
                // Per anchor: (1-ε) d_pos + ε mean_neg(d).
                let negf = neg.to_dtype(dist.dtype())?;
                let count = negf.sum(1)?;
                let mean_neg = (&dist * &negf)?.sum(1)?.div(&count)?;
                ((d_pos * (1.0 - smoothing))? + (mean_neg * smoothing)? + lse)?
            } else {
                (d_pos + lse)?
            }
        }
    };
    Ok(per_anchor.mean_all()?)
}

/// [`nca_over_selection`] over a selection made on the device
/// ([`crate::on_device::dynamic_selection`]): the same objective per anchor, from masks.
pub(crate) fn nca_over_device_selection(
    sel: &DeviceSelection,
    form: ProxyNcaForm,
    smoothing: f64,
) -> Result<Tensor> {
    let dist = &sel.dist;
    let d_pos = dist.gather(&sel.positive, 1)?.squeeze(1)?; // [N]
    let mask = |m: &Tensor| -> Result<Tensor> { Ok(m.ne(&m.zeros_like()?)?) };
    let per_anchor = match form {
        ProxyNcaForm::Paper => {
            let lse = log_sum_exp_rows(&keep_or_neg_inf(&mask(&sel.negatives)?, &dist.neg()?)?)?;
            (d_pos + lse)?
        }
        ProxyNcaForm::Softmax => {
            let cand = mask(&(&sel.negatives + &sel.positive_mask)?)?;
            let lse = log_sum_exp_rows(&keep_or_neg_inf(&cand, &dist.neg()?)?)?;
            if smoothing > 0.0 {
                let neg = &sel.negatives;
                let mean_neg = (dist * neg)?.sum(1)?.div(&neg.sum(1)?)?;
                ((d_pos * (1.0 - smoothing))? + (mean_neg * smoothing)? + lse)?
            } else {
                (d_pos + lse)?
            }
        }
    };
    sel.mean_over_anchors(&per_anchor)
}

/// Creates `num_proxies` learned proxies of dimension `dim`, named `proxies` in `vb`
/// (so they live in the caller's `VarMap` and can get their own optimiser).
pub fn create_proxies(
    num_proxies: usize,
    dim: usize,
    init: ProxyInit,
    vb: VarBuilder,
) -> Result<Tensor> {
    if num_proxies == 0 || dim == 0 {
        return Err(LossError::Config(format!(
            "need at least one proxy and one dimension, got {num_proxies} x {dim}"
        )));
    }
    let hint = match init {
        ProxyInit::Normal | ProxyInit::ClassMeans => Init::Randn {
            mean: 0.0,
            stdev: 0.125,
        },
        ProxyInit::Xavier => {
            let b = (6.0 / (num_proxies + dim) as f64).sqrt();
            Init::Uniform { lo: -b, up: b }
        }
    };
    Ok(vb.get_with_hints((num_proxies, dim), "proxies", hint)?)
}

/// Proxy-NCA owning its learned proxies (one per class for static assignment, any
/// number for dynamic).
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
        let proxies = create_proxies(num_classes, dim, init, vb)?;
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
    use crate::common::{l2_normalize, pairwise_squared_distances};
    use candle_core::{DType, Device};

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
    fn class_means_round_robin_and_spares() {
        let dev = Device::Cpu;
        let x = Tensor::new(
            &[[1f32, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, 4.0], [5.0, 5.0]],
            &dev,
        )
        .unwrap();
        let c = [7, 7, 2, 2, 9];
        // 3 classes sorted 2, 7, 9 -> proxies 0, 1, 2.
        let p = class_mean_proxies(&x, &c, 3)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(p, vec![vec![0.0, 3.0], vec![2.0, 0.0], vec![5.0, 5.0]]);
        // 2 proxies: classes 2 and 9 share proxy 0.
        let p = class_mean_proxies(&x, &c, 2)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(p[0], vec![5.0 / 3.0, 11.0 / 3.0]);
        // 4 proxies: the spare takes the first example.
        let p = class_mean_proxies(&x, &c, 4)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(p[3], vec![1.0, 0.0]);
        assert!(class_mean_proxies(&x, &c[..2], 2).is_err());
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
