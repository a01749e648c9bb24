//! The baselines the paper compares with: the triplet loss over in-batch triplets (all,
//! or FaceNet's semi-hard negatives) and in-batch NCA.

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::common::{
    check_finite, check_scale, compute_dtype, embedding_dims, host_classes, keep_or_neg_inf,
    l2_normalize, log_sum_exp_rows, pairwise_squared_distances,
};
use crate::{LossError, Result};

/// Which in-batch triplets the triplet loss uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TripletMining {
    /// Every `(a, p, n)` with `a != p` of one class and `n` of another; the loss is the
    /// mean over the triplets that violate the margin (loss > 0), as in the "batch all"
    /// strategy and pytorch-metric-learning's default reducer; 0 when none does.
    #[default]
    All,
    /// FaceNet's semi-hard negatives (Schroff et al. 2015; TensorFlow's
    /// `triplet_semihard_loss`): for every positive pair `(a, p)`, the negative `n` with
    /// the smallest `d(a,n)` among those farther than `d(a,p)`; if there is none, the
    /// farthest negative. The loss is the mean over all positive pairs.
    SemiHard,
}

/// Settings of [`triplet_loss`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TripletConfig {
    /// Margin `M` of `[d(a,p) - d(a,n) + M]_+`.
    pub margin: f64,
    /// Triplet selection.
    pub mining: TripletMining,
    /// L2-normalise the embeddings first (the paper's setting).
    pub normalize: bool,
    /// Squared Euclidean distance (the paper's `d`) instead of Euclidean.
    pub squared: bool,
    /// Check inputs for NaN/inf (one host sync).
    pub check_finite: bool,
}

impl Default for TripletConfig {
    fn default() -> Self {
        Self {
            margin: 0.2,
            mining: TripletMining::All,
            normalize: true,
            squared: true,
            check_finite: true,
        }
    }
}

/// Settings of [`nca_loss`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NcaConfig {
    /// Multiplies the squared distances in the softmax (inverse temperature).
    pub scale: f64,
    /// L2-normalise the embeddings first.
    pub normalize: bool,
    /// Check inputs for NaN/inf (one host sync).
    pub check_finite: bool,
}

impl Default for NcaConfig {
    fn default() -> Self {
        Self {
            scale: 1.0,
            normalize: true,
            check_finite: true,
        }
    }
}

/// Embeddings in the compute dtype, checked and optionally normalised, with their
/// squared distance matrix `[N,N]` and the host classes.
fn batch_distances(
    embeddings: &Tensor,
    labels: &Tensor,
    normalize: bool,
    check: bool,
) -> Result<(Tensor, Vec<i64>)> {
    let (n, _) = embedding_dims(embeddings)?;
    let classes = host_classes(labels, n)?;
    let x = embeddings.to_dtype(compute_dtype(embeddings))?;
    if check {
        check_finite(&x, "embeddings")?;
    }
    let x = if normalize { l2_normalize(&x)? } else { x };
    Ok((pairwise_squared_distances(&x, &x)?, classes))
}

/// The triplet loss over in-batch triplets, see [`TripletMining`] for the selection
/// and averaging. `embeddings` `[N,D]`, `labels` `[N]` (class ids). An error when the
/// batch holds no positive pair or no negative.
pub fn triplet_loss(embeddings: &Tensor, labels: &Tensor, cfg: &TripletConfig) -> Result<Tensor> {
    if !(cfg.margin >= 0.0 && cfg.margin.is_finite()) {
        return Err(LossError::Config(format!(
            "margin must be >= 0, got {}",
            cfg.margin
        )));
    }
    let (sq, classes) = batch_distances(embeddings, labels, cfg.normalize, cfg.check_finite)?;
    let n = classes.len();
    let dist = if cfg.squared {
        sq
    } else {
        // d = sqrt(max(d², tiny)) keeps the gradient finite on the zero diagonal.
        sq.clamp(1e-12, f64::INFINITY)?.sqrt()?
    };
    let host: Vec<f64> = dist
        .detach()
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1()?;
    let mut ap = Vec::new();
    let mut an = Vec::new();
    for a in 0..n {
        let negs: Vec<usize> = (0..n).filter(|&j| classes[j] != classes[a]).collect();
        if negs.is_empty() {
            continue;
        }
        for p in (0..n).filter(|&j| j != a && classes[j] == classes[a]) {
            let d_ap = host[a * n + p];
            match cfg.mining {
                TripletMining::All => {
                    for &ng in &negs {
                        if d_ap - host[a * n + ng] + cfg.margin > 0.0 {
                            ap.push((a * n + p) as u32);
                            an.push((a * n + ng) as u32);
                        }
                    }
                }
                TripletMining::SemiHard => {
                    let d = |j: usize| host[a * n + j];
                    let outside = negs
                        .iter()
                        .copied()
                        .filter(|&j| d(j) > d_ap)
                        .min_by(|&x, &y| d(x).total_cmp(&d(y)).then(x.cmp(&y)));
                    let chosen = outside.unwrap_or_else(|| {
                        negs.iter()
                            .copied()
                            .max_by(|&x, &y| d(x).total_cmp(&d(y)).then(y.cmp(&x)))
                            .unwrap_or(negs[0])
                    });
                    ap.push((a * n + p) as u32);
                    an.push((a * n + chosen) as u32);
                }
            }
        }
    }
    let has_pairs = (0..n).any(|a| (0..n).any(|j| j != a && classes[j] == classes[a]));
    let has_negs = classes.iter().any(|&c| c != classes[0]);
    if !has_pairs || !has_negs {
        return Err(LossError::NoPairs(
            "the triplet loss needs a class with two examples and a second class in the batch"
                .into(),
        ));
    }
    let flat = dist.flatten_all()?;
    if ap.is_empty() {
        // Batch-all with every triplet satisfied: zero loss, still tied to the graph.
        return Ok((flat.sum_all()? * 0.0)?);
    }
    let device = dist.device();
    let count = ap.len();
    let d_ap = flat.index_select(&Tensor::from_vec(ap, count, device)?, 0)?;
    let d_an = flat.index_select(&Tensor::from_vec(an, count, device)?, 0)?;
    Ok(((d_ap - d_an)? + cfg.margin)?.relu()?.mean_all()?)
}

/// In-batch NCA (Goldberger et al. 2005, the paper's equation 4 over the batch): for
/// each anchor `i` with at least one other example of its class,
/// `-log( Σ_{j same class, j≠i} exp(-s d_ij) / Σ_{k≠i} exp(-s d_ik) )`, averaged over
/// those anchors; `d` is the squared Euclidean distance. An error when no anchor has a
/// positive.
pub fn nca_loss(embeddings: &Tensor, labels: &Tensor, cfg: &NcaConfig) -> Result<Tensor> {
    check_scale("scale", cfg.scale)?;
    let (sq, classes) = batch_distances(embeddings, labels, cfg.normalize, cfg.check_finite)?;
    let n = classes.len();
    let anchors: Vec<u32> = (0..n)
        .filter(|&a| (0..n).any(|j| j != a && classes[j] == classes[a]))
        .map(|a| a as u32)
        .collect();
    if anchors.is_empty() || classes.iter().all(|&c| c == classes[0]) {
        return Err(LossError::NoPairs(
            "NCA needs a class with two examples and a second class in the batch".into(),
        ));
    }
    let a = anchors.len();
    let mut pos = vec![0u8; a * n];
    let mut others = vec![0u8; a * n];
    for (r, &i) in anchors.iter().enumerate() {
        for j in 0..n {
            if j != i as usize {
                others[r * n + j] = 1;
                if classes[j] == classes[i as usize] {
                    pos[r * n + j] = 1;
                }
            }
        }
    }
    let device = sq.device();
    let idx = Tensor::from_vec(anchors, a, device)?;
    let logits = (sq.index_select(&idx, 0)? * (-cfg.scale))?;
    let pos = Tensor::from_vec(pos, (a, n), device)?;
    let others = Tensor::from_vec(others, (a, n), device)?;
    let num = log_sum_exp_rows(&keep_or_neg_inf(&pos, &logits)?)?;
    let den = log_sum_exp_rows(&keep_or_neg_inf(&others, &logits)?)?;
    Ok((den - num)?.mean_all()?)
}
