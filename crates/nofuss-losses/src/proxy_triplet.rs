//! Proxy-Triplet (paper section 4): triplets of an anchor, its positive proxy and a
//! negative proxy.

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::assignment::{proxy_distances, static_inputs, Assignment};
use crate::common::check_scale;
use crate::{LossError, Result};

/// Settings of [`proxy_triplet`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProxyTripletConfig {
    /// The margin `M` of `[d(x,p(y)) + M - d(x,p(z))]_+`, in squared distance units
    /// of the scaled vectors (with scale 1, distances lie in `[0, 4]`).
    pub margin: f64,
    /// `s_x`, multiplies the normalised embeddings.
    pub embedding_scale: f64,
    /// `s_p`, multiplies the normalised proxies.
    pub proxy_scale: f64,
    /// Use only the `k` hardest (nearest) negative proxies of each anchor; `None`: all.
    pub hardest_negatives: Option<usize>,
    /// Check inputs for NaN/inf and return [`LossError::NonFinite`] (one host sync).
    pub check_finite: bool,
    /// Static (one proxy per class) or dynamic (nearest proxy) assignment.
    pub assignment: Assignment,
}

impl Default for ProxyTripletConfig {
    fn default() -> Self {
        Self {
            margin: 0.1,
            embedding_scale: 1.0,
            proxy_scale: 1.0,
            hardest_negatives: None,
            check_finite: true,
            assignment: Assignment::Static,
        }
    }
}

impl ProxyTripletConfig {
    /// Validates the settings.
    pub fn check(&self) -> Result<()> {
        check_scale("embedding_scale", self.embedding_scale)?;
        check_scale("proxy_scale", self.proxy_scale)?;
        if !(self.margin >= 0.0 && self.margin.is_finite()) {
            return Err(LossError::Config(format!(
                "margin must be >= 0, got {}",
                self.margin
            )));
        }
        if self.hardest_negatives == Some(0) {
            return Err(LossError::Config(
                "hardest_negatives must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

/// Proxy-Triplet loss: for each anchor `x` with positive proxy `p(y)` and negative
/// proxies `p(z)` (all of them, or the `k` nearest), the hinge
/// `[d(x,p(y)) + M - d(x,p(z))]_+`, averaged over the anchor's negatives and then over
/// the anchors (so every anchor weighs the same whatever its number of negatives).
/// `d` is the squared Euclidean distance between the normalised, scaled vectors.
/// Shapes, dtypes and assignment as in [`crate::proxy_nca`].
pub fn proxy_triplet(
    embeddings: &Tensor,
    labels: &Tensor,
    proxies: &Tensor,
    cfg: &ProxyTripletConfig,
) -> Result<Tensor> {
    cfg.check()?;
    let scales = (cfg.embedding_scale, cfg.proxy_scale);
    let what = "a triplet of proxies";
    if cfg.assignment == Assignment::Static && cfg.hardest_negatives.is_none() {
        // Every example an anchor, every other proxy a negative: one fused pass over the
        // distance rows (on the CPU one operation, no `[N, P]` tensor in the graph).
        let (x, pr, labels) = static_inputs(
            embeddings,
            labels,
            proxies,
            (scales, cfg.check_finite),
            (2, what),
        )?;
        let rows = nofuss_tensor::ops::triplet_rows_from_points(&x, &pr, &labels, cfg.margin)?;
        return Ok(rows.mean(0)?);
    }
    let (dist, mut sel) = proxy_distances(
        embeddings,
        labels,
        proxies,
        (scales, cfg.check_finite, cfg.assignment),
        (2, what),
    )?;
    let p = sel.num_proxies;
    let device = dist.device();
    let a = sel.anchors.len();
    let dist = sel.anchor_rows(&dist)?; // [A,P]
    if let Some(k) = cfg.hardest_negatives {
        let host: Vec<f64> = dist
            .detach()
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1()?;
        sel.keep_hardest(&host, k);
    }
    let pos_idx = Tensor::from_slice(&sel.positive, (a, 1), device)?;
    let d_pos = dist.gather(&pos_idx, 1)?; // [A,1]
    let neg = Tensor::from_slice(&sel.negatives, (a, p), device)?.to_dtype(dist.dtype())?;
    let hinge = (d_pos + cfg.margin)?.broadcast_sub(&dist)?.relu()?;
    let per_anchor = (hinge * &neg)?.sum(1)?.div(&neg.sum(1)?)?;
    Ok(per_anchor.mean_all()?)
}

/// Proxy-Triplet owning its learned proxies.
#[derive(Debug, Clone)]
pub struct ProxyTriplet {
    proxies: Tensor,
    cfg: ProxyTripletConfig,
}

impl ProxyTriplet {
    /// Creates `num_proxies` proxies of dimension `dim` named `proxies` in `vb`.
    pub fn new(
        num_proxies: usize,
        dim: usize,
        init: crate::ProxyInit,
        cfg: ProxyTripletConfig,
        vb: candle_nn::VarBuilder,
    ) -> Result<Self> {
        cfg.check()?;
        let proxies = crate::create_proxies(num_proxies, dim, init, vb)?;
        Ok(Self { proxies, cfg })
    }

    /// The proxies, `[P,D]`.
    pub fn proxies(&self) -> &Tensor {
        &self.proxies
    }

    /// The loss of a batch, see [`proxy_triplet`].
    pub fn loss(&self, embeddings: &Tensor, labels: &Tensor) -> Result<Tensor> {
        proxy_triplet(embeddings, labels, &self.proxies, &self.cfg)
    }
}
