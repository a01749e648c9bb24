//! Proxy-Triplet (paper section 4): triplets of an anchor, its positive proxy and a
//! negative proxy.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::assignment::{proxy_distances, static_inputs, Assignment, Selection};
use crate::common::check_scale;
use crate::on_device::{dynamic_selection, DeviceSelection};
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
    Ok(proxy_triplet_counted(embeddings, labels, proxies, cfg)?.0)
}

/// [`proxy_triplet`] and, when the anchors were picked on the device, how many took part
/// (a scalar tensor there: 0 when none did and the loss is 0).
pub(crate) fn proxy_triplet_counted(
    embeddings: &Tensor,
    labels: &Tensor,
    proxies: &Tensor,
    cfg: &ProxyTripletConfig,
) -> Result<(Tensor, Option<Tensor>)> {
    cfg.check()?;
    let scales = (cfg.embedding_scale, cfg.proxy_scale);
    let what = "a triplet of proxies";
    if cfg.assignment == Assignment::Static && static_rows(cfg.hardest_negatives, embeddings) {
        // Every example an anchor, every other proxy (or the k nearest of them) a
        // negative: one fused pass over the distance rows (on the CPU one operation, no
        // `[N, P]` tensor in the graph; elsewhere the k nearest picked on the device).
        let (x, pr, labels) = static_inputs(
            embeddings,
            labels,
            proxies,
            (scales, cfg.check_finite),
            (2, what),
        )?;
        let rows = match cfg.hardest_negatives {
            None => nofuss_tensor::ops::triplet_rows_from_points(&x, &pr, &labels, cfg.margin)?,
            Some(k) => nofuss_tensor::ops::hardest_triplet_rows_from_points(
                &x, &pr, &labels, cfg.margin, k,
            )?,
        };
        return Ok((rows.mean(0)?, None));
    }
    if cfg.assignment == Assignment::Dynamic
        && crate::on_device::picks_on_device(embeddings, cfg.hardest_negatives)
    {
        let sel = dynamic_selection(
            embeddings,
            labels,
            proxies,
            (scales, cfg.check_finite, cfg.hardest_negatives),
            (2, what),
        )?;
        let loss = triplet_over_device_selection(&sel, cfg.margin)?;
        return Ok((loss, Some(sel.anchor_count()?)));
    }
    // On the CPU, or more hardest negatives than a device selection takes: distances to
    // the proxies the anchors use, picked on the host.
    let (dist, sel) = proxy_distances(
        embeddings,
        labels,
        proxies,
        (
            scales,
            cfg.check_finite,
            cfg.assignment,
            cfg.hardest_negatives,
        ),
        (2, what),
    )?;
    Ok((triplet_over_selection(&dist, &sel, cfg.margin)?, None))
}

/// Whether the device picks `k` hardest negatives ([`nofuss_tensor::select::smallest_k`]
/// takes that many); beyond that they are picked on the host.
pub(crate) fn hardest_on_device(k: usize) -> bool {
    k <= nofuss_tensor::select::MAX_K
}

/// Whether static assignment with `hardest` negatives runs as per-row objectives of
/// the points ([`nofuss_tensor::ops::hardest_triplet_rows_from_points`]): always on the
/// CPU and with all negatives, elsewhere when [`hardest_on_device`].
fn static_rows(hardest: Option<usize>, embeddings: &Tensor) -> bool {
    match hardest {
        Some(k) => embeddings.device().is_cpu() || hardest_on_device(k),
        None => true,
    }
}

/// The Proxy-Triplet objective over a selection: `dist` `[N, P]` holds the squared
/// distances from every example to the selection's `P` proxies; each anchor's hinges over
/// its negatives, averaged per anchor, then over the anchors.
pub(crate) fn triplet_over_selection(
    dist: &Tensor,
    sel: &Selection,
    margin: f64,
) -> Result<Tensor> {
    let p = sel.num_proxies;
    let device = dist.device();
    let a = sel.anchors.len();
    let dist = sel.anchor_rows(dist)?; // [A,P]
    let pos_idx = Tensor::from_slice(&sel.positive, (a, 1), device)?;
    let d_pos = dist.gather(&pos_idx, 1)?; // [A,1]
    let neg = Tensor::from_slice(&sel.negatives, (a, p), device)?.to_dtype(dist.dtype())?;
    let hinge = (d_pos + margin)?.broadcast_sub(&dist)?.relu()?;
    let per_anchor = (hinge * &neg)?.sum(1)?.div(&neg.sum(1)?)?;
    Ok(per_anchor.mean_all()?)
}

/// [`triplet_over_selection`] over a selection made on the device
/// ([`crate::on_device::dynamic_selection`]).
pub(crate) fn triplet_over_device_selection(sel: &DeviceSelection, margin: f64) -> Result<Tensor> {
    let dist = &sel.dist;
    let d_pos = dist.gather(&sel.positive, 1)?; // [N, 1]
    let hinge = (d_pos + margin)?.broadcast_sub(dist)?.relu()?;
    let neg = &sel.negatives;
    let per_anchor = (hinge * neg)?.sum(1)?.div(&neg.sum(1)?)?;
    sel.mean_over_anchors(&per_anchor)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::prepare;
    use candle_core::{Device, Var};

    /// The loss over all `P` proxies with the anchors' full rows: the selection (nearest
    /// proxies, then the `k` hardest of each anchor's row) and the hinge, masked.
    fn over_all_proxies(
        x: &Tensor,
        labels: &[i64],
        p: &Tensor,
        cfg: &ProxyTripletConfig,
    ) -> Tensor {
        let (xs, ps) = prepare(x, p, (cfg.embedding_scale, cfg.proxy_scale), false).unwrap();
        let dist = crate::pairwise_squared_distances(&xs, &ps).unwrap();
        let np = ps.dim(0).unwrap();
        let mut sel = match cfg.assignment {
            Assignment::Static => Selection::fixed(labels, np),
            Assignment::Dynamic => Selection::dynamic(labels, &crate::nearest(&dist).unwrap(), np),
        };
        if let Some(k) = cfg.hardest_negatives {
            let rows = sel.anchor_rows(&dist).unwrap();
            let host = rows.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            sel.keep_hardest(&host, k);
        }
        triplet_over_selection(&dist, &sel, cfg.margin).unwrap()
    }

    #[test]
    fn hardest_negatives_over_the_used_proxies_equal_the_loss_over_all() {
        let dev = Device::Cpu;
        // Six proxies on the unit circle, 60 degrees apart, plus three off the plane.
        let mut pv: Vec<f64> = (0..6)
            .flat_map(|i| {
                let t = (i as f64).to_radians() * 60.0;
                [t.cos(), t.sin(), 0.0]
            })
            .collect();
        pv.extend([0.1, 0.2, 1.0, -0.3, 0.1, 1.0, 0.2, -0.2, -1.0]);
        // Dynamic: class 0 on proxies 0, 4, 2, 1 and class 1 (one example) on proxy 0,
        // so anchors 1-3 have no negative (left out) and anchor 4 has three (k = 2 keeps
        // 1 and 2; anchor 1's row would keep 4 and 2). Static: labels are proxies, 9 of
        // them, 4 in use.
        let at = |deg: f64, z: f64| {
            let t = deg.to_radians();
            [t.cos(), t.sin(), z]
        };
        let xv: Vec<f64> = [
            at(0.0, 0.1),
            at(239.0, 0.0),
            at(121.0, 0.2),
            at(58.0, -0.1),
            at(3.0, 0.0),
        ]
        .concat();
        for (assignment, labels) in [
            (Assignment::Dynamic, [0i64, 0, 0, 0, 1]),
            (Assignment::Static, [0, 8, 2, 0, 6]),
        ] {
            for k in [1, 2] {
                let cfg = ProxyTripletConfig {
                    margin: 6.0, // most hinges active (distances are in [0, 9])
                    embedding_scale: 1.5,
                    proxy_scale: 1.5,
                    hardest_negatives: Some(k),
                    assignment,
                    ..Default::default()
                };
                let run = |fast: bool| {
                    let x = Var::from_vec(xv.clone(), (5, 3), &dev).unwrap();
                    let p = Var::from_vec(pv.clone(), (9, 3), &dev).unwrap();
                    let y = Tensor::new(&labels, &dev).unwrap();
                    let loss = if fast {
                        proxy_triplet(x.as_tensor(), &y, p.as_tensor(), &cfg).unwrap()
                    } else {
                        over_all_proxies(x.as_tensor(), &labels, p.as_tensor(), &cfg)
                    };
                    let g = loss.backward().unwrap();
                    let flat = |v: &Var| g.get(v.as_tensor()).unwrap().flatten_all().unwrap();
                    let grads = [flat(&x), flat(&p)].map(|t| t.to_vec1::<f64>().unwrap());
                    (loss.to_scalar::<f64>().unwrap(), grads)
                };
                let ((l1, g1), (l2, g2)) = (run(false), run(true));
                let what = format!("{assignment:?} k {k}");
                assert!(l1 > 0.0 && (l1 - l2).abs() < 1e-12, "{what}: {l1} vs {l2}");
                for (a, b) in g1.iter().flatten().zip(g2.iter().flatten()) {
                    assert!((a - b).abs() < 1e-12, "{what}: gradient {a} vs {b}");
                }
            }
        }
    }
}
