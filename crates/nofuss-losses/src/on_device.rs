//! Dynamic assignment picked on the device: the same anchors, positives and negatives as
//! [`Selection::dynamic`](crate::assignment::Selection::dynamic) (and
//! [`Selection::keep_hardest`](crate::assignment::Selection::keep_hardest)), made as
//! masks by tensor operations on the embeddings' device, so that nothing is read back or
//! uploaded per batch.
//!
//! The host selection reads the `N x P` distances and the labels back and uploads what it
//! picked: on a GPU each step then waits for the device before its loss can be queued,
//! and a CUDA graph cannot capture it. Here every pick is a tensor:
//!
//! - the nearest proxy of each example: the first column of its row equal to the row's
//!   minimum ([`nofuss_tensor::select::smallest_k`] over `0/1` keys: ties to the lower
//!   index, as on the host);
//! - the positive: the nearest proxy of the first *other* example of the same class
//!   (`smallest_k` over the `[N, N]` different-class keys with the diagonal left out:
//!   the first same-class column, if there is one), else the example's own;
//! - the negatives: the proxies some example of another class is assigned to (the
//!   different-class matrix times the one-hot assignments, `[N, N] x [N, P]`), minus the
//!   positive; with `k` hardest, the `k` nearest of them (`smallest_k` again, ties to the
//!   lower proxy index, as on the host; distances compared in f32, so f64 distances
//!   closer than f32 resolves may rank differently than on the host);
//! - the anchors: the examples with at least one negative. The loss averages over them;
//!   the rows of the others are all-ones masks (finite values) weighted by 0.
//!
//! The loss's distances are the full `[N, P]` (the host path narrows them to the proxies
//! in use, which it only knows after reading). A batch where no example is an anchor gives
//! a loss of 0 with zero gradients, as pytorch-metric-learning's losses do, when the
//! finiteness checks are off; with them on (they wait for the device anyway) it is
//! [`LossError::NoPairs`](crate::LossError::NoPairs), as on the host.

use candle_core::{DType, Tensor};

use crate::common::{check_label_tensor, host_classes, pairwise_squared_distances, prepare};
use crate::{LossError, Result};
use nofuss_tensor::ops::{k_hot, one_hot};
use nofuss_tensor::select::smallest_k;

/// Whether dynamic assignment (with `hardest` negatives, if given) is picked on the
/// device for `embeddings`: off the CPU, up to [`nofuss_tensor::select::MAX_K`] hardest
/// negatives. On the CPU the host selection costs no wait and narrows the loss to the
/// proxies in use.
pub(crate) fn picks_on_device(embeddings: &Tensor, hardest: Option<usize>) -> bool {
    !embeddings.device().is_cpu() && hardest.is_none_or(crate::proxy_triplet::hardest_on_device)
}

/// A batch's dynamic selection as masks on its device.
pub(crate) struct DeviceSelection {
    /// Squared distances `[N, P]` from every example to every proxy, differentiable.
    pub dist: Tensor,
    /// The positive proxy of each example, `[N, 1]` u32.
    pub positive: Tensor,
    /// `[N, P]` in the distances' dtype: 1 where the proxy is a negative of the anchor;
    /// rows of examples that are not anchors are all 1 (their values stay finite).
    pub negatives: Tensor,
    /// `[N, P]` one-hot rows of the positives (the distances' dtype).
    pub positive_mask: Tensor,
    /// `[N]` in the distances' dtype: 1 for the anchors, 0 for the others.
    pub anchors: Tensor,
}

impl DeviceSelection {
    /// How many examples are anchors, a scalar tensor in the distances' dtype.
    pub fn anchor_count(&self) -> Result<Tensor> {
        Ok(self.anchors.sum_all()?)
    }

    /// The mean of `per_anchor` (`[N]`) over the anchors: `Σ w l / max(Σ w, 1)`, so a
    /// batch without anchors gives 0, with zero gradients.
    pub fn mean_over_anchors(&self, per_anchor: &Tensor) -> Result<Tensor> {
        let total = (per_anchor * &self.anchors)?.sum_all()?;
        let count = self.anchor_count()?;
        Ok(total.div(&count.maximum(&count.ones_like()?)?)?)
    }
}

/// The dynamic selection of a batch on its device, and the differentiable distances:
/// inputs checked as the host path checks them (the labels read only when `check` is on),
/// embeddings and proxies normalised and scaled, the `hardest` `k` negatives kept when
/// given (at most [`nofuss_tensor::select::MAX_K`]). `min_proxies` and `what` make the
/// error for too few proxies.
pub(crate) fn dynamic_selection(
    embeddings: &Tensor,
    labels: &Tensor,
    proxies: &Tensor,
    (scales, check, hardest): ((f64, f64), bool, Option<usize>),
    (min_proxies, what): (usize, &str),
) -> Result<DeviceSelection> {
    let (n, p) = crate::assignment::checked_sizes(embeddings, proxies, min_proxies, what)?;
    check_label_tensor(labels, n)?;
    if check {
        host_classes(labels, n)?;
    }
    if n < 2 {
        // Known without reading anything: a lone example has no other class to take
        // negatives from.
        return Err(LossError::NoPairs(
            "no anchor has a negative proxy: the batch holds a single example".into(),
        ));
    }
    let (x, pr) = prepare(embeddings, proxies, scales, check)?;
    let dt = x.dtype();
    let dev = x.device();
    let all = pairwise_squared_distances(&x.detach(), &pr.detach())?;

    // Nearest proxy: the first column equal to the row's minimum.
    let at_min = all
        .broadcast_ne(&all.min_keepdim(1)?)?
        .to_dtype(DType::F32)?;
    let assigned = smallest_k(&at_min, 1, None)?.1.squeeze(1)?; // [N] u32

    // The first other example of the same class, when there is one.
    let labels = labels.to_device(dev)?;
    let same = labels
        .unsqueeze(1)?
        .broadcast_eq(&labels.unsqueeze(0)?)?
        .to_dtype(DType::F32)?;
    let other_class = (1.0 - &same)?; // [N, N], 0 on the diagonal
    let (key, mate) = smallest_k(&other_class, 1, Some(0))?;
    let has_mate = (1.0 - key)?.squeeze(1)?.to_dtype(DType::U8)?;
    let mate_assigned = assigned.index_select(&mate.squeeze(1)?, 0)?;
    let positive = has_mate.where_cond(&mate_assigned, &assigned)?; // [N] u32

    // Proxies of other classes' examples, minus the positive.
    let assigned_hot = one_hot(&assigned, p, dt)?;
    let positive_mask = one_hot(&positive, p, dt)?;
    let cover = other_class.to_dtype(dt)?.matmul(&assigned_hot)?; // counts, exact
    let mut negatives = (cover.gt(&cover.zeros_like()?)?.to_dtype(dt)? * (1.0 - &positive_mask)?)?;
    if let Some(k) = hardest {
        let inf = Tensor::full(f32::INFINITY, (n, p), dev)?;
        let masked = negatives
            .to_dtype(DType::U8)?
            .where_cond(&all.to_dtype(DType::F32)?, &inf)?;
        let kk = k.min(p);
        let (_, picked) = smallest_k(&masked, kk, None)?;
        negatives = (negatives * k_hot(&picked, p, dt)?)?;
    }
    let count = negatives.sum_keepdim(1)?;
    let anchors = count.gt(&count.zeros_like()?)?.to_dtype(dt)?; // [N, 1]
    if check
        && anchors
            .sum_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?
            == 0.0
    {
        return Err(LossError::NoPairs(
            "no anchor has a negative proxy: the batch holds a single class, or every \
             class shares one proxy"
                .into(),
        ));
    }
    let negatives = negatives.broadcast_add(&(1.0 - &anchors)?)?;
    Ok(DeviceSelection {
        dist: pairwise_squared_distances(&x, &pr)?,
        positive: positive.unsqueeze(1)?,
        negatives,
        positive_mask,
        anchors: anchors.squeeze(1)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy_nca::{nca_over_device_selection, proxy_nca, ProxyNcaConfig, ProxyNcaForm};
    use crate::proxy_triplet::{proxy_triplet, triplet_over_device_selection, ProxyTripletConfig};
    use crate::Assignment;
    use candle_core::{Device, Var};
    use rand::{Rng, SeedableRng};

    /// A loss on the CPU either way: `true` through the device selection, `false` through
    /// the public function (the host selection on the CPU).
    #[derive(Debug, Clone, Copy)]
    enum Which {
        Nca(ProxyNcaForm, f64),
        Triplet(Option<usize>),
    }

    type Outcome = Option<(f64, Vec<f64>, Vec<f64>)>;

    fn run(which: Which, device: bool, check: bool, data: &Batch, dt: DType) -> Outcome {
        let cpu = Device::Cpu;
        let x = Var::from_tensor(
            &Tensor::new(data.x.clone(), &cpu)
                .unwrap()
                .to_dtype(dt)
                .unwrap(),
        )
        .unwrap();
        let p = Var::from_tensor(
            &Tensor::new(data.p.clone(), &cpu)
                .unwrap()
                .to_dtype(dt)
                .unwrap(),
        )
        .unwrap();
        let y = Tensor::new(data.y.as_slice(), &cpu).unwrap();
        let (xt, pt) = (x.as_tensor(), p.as_tensor());
        let loss = match which {
            Which::Nca(form, smoothing) => {
                let cfg = ProxyNcaConfig {
                    form,
                    label_smoothing: smoothing,
                    check_finite: check,
                    assignment: Assignment::Dynamic,
                    ..Default::default()
                };
                if device {
                    let min = if form == ProxyNcaForm::Paper { 2 } else { 1 };
                    let scales = (cfg.embedding_scale, cfg.proxy_scale);
                    dynamic_selection(xt, &y, pt, (scales, check, None), (min, "test"))
                        .and_then(|s| nca_over_device_selection(&s, form, smoothing))
                } else {
                    proxy_nca(xt, &y, pt, &cfg)
                }
            }
            Which::Triplet(hardest) => {
                let cfg = ProxyTripletConfig {
                    margin: 0.3,
                    embedding_scale: 2.0,
                    proxy_scale: 1.5,
                    hardest_negatives: hardest,
                    check_finite: check,
                    assignment: Assignment::Dynamic,
                };
                if device {
                    let scales = (cfg.embedding_scale, cfg.proxy_scale);
                    dynamic_selection(xt, &y, pt, (scales, check, hardest), (2, "test"))
                        .and_then(|s| triplet_over_device_selection(&s, cfg.margin))
                } else {
                    proxy_triplet(xt, &y, pt, &cfg)
                }
            }
        };
        let loss = match loss {
            Ok(l) => l,
            Err(LossError::NoPairs(_)) => return None,
            Err(e) => panic!("{which:?}: {e}"),
        };
        let g = loss.backward().unwrap();
        let flat = |t: &Tensor| -> Vec<f64> {
            g.get(t).map_or_else(
                || vec![0.0; t.elem_count()],
                |g| {
                    g.to_dtype(DType::F64)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap()
                },
            )
        };
        let l = loss
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        Some((l, flat(xt), flat(pt)))
    }

    struct Batch {
        x: Vec<Vec<f64>>,
        p: Vec<Vec<f64>>,
        y: Vec<u32>,
    }

    /// `n` examples of classes below `classes`, `p` proxies, some of them copies of others
    /// (exact ties for the nearest and hardest picks), some examples on a proxy's
    /// direction (a clear nearest).
    fn batch(seed: u64, n: usize, p: usize, classes: u32) -> Batch {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let d = 4;
        let row = |rng: &mut rand_chacha::ChaCha8Rng| -> Vec<f64> {
            (0..d).map(|_| rng.gen_range(-1.0..1.0)).collect()
        };
        let mut pr: Vec<Vec<f64>> = (0..p).map(|_| row(&mut rng)).collect();
        for j in (1..p).step_by(3) {
            pr[j] = pr[j - 1].clone();
        }
        let x = (0..n)
            .map(|_| {
                if rng.gen_bool(0.3) {
                    let j = rng.gen_range(0..p);
                    pr[j].iter().map(|v| v * 2.0).collect()
                } else {
                    row(&mut rng)
                }
            })
            .collect();
        let y = (0..n).map(|_| rng.gen_range(0..classes)).collect();
        Batch { x, p: pr, y }
    }

    fn assert_close(which: Which, dt: DType, a: &Outcome, b: &Outcome) {
        let tol = if dt == DType::F64 { 1e-10 } else { 2e-5 };
        match (a, b) {
            (None, None) => {}
            (Some((la, xa, pa)), Some((lb, xb, pb))) => {
                let close = |u: f64, v: f64| (u - v).abs() <= tol * (1.0 + u.abs().max(v.abs()));
                assert!(close(*la, *lb), "{which:?} {dt:?}: loss {la} vs {lb}");
                for (what, u, v) in [("x", xa, xb), ("proxies", pa, pb)] {
                    for (i, (s, t)) in u.iter().zip(v).enumerate() {
                        assert!(close(*s, *t), "{which:?} {dt:?}: d{what}[{i}] {s} vs {t}");
                    }
                }
            }
            _ => panic!("{which:?} {dt:?}: host {a:?}, device {b:?}"),
        }
    }

    #[test]
    fn device_selection_gives_the_host_selections_loss_and_gradients() {
        let losses = [
            Which::Nca(ProxyNcaForm::Paper, 0.0),
            Which::Nca(ProxyNcaForm::Softmax, 0.0),
            Which::Nca(ProxyNcaForm::Softmax, 0.2),
            Which::Triplet(None),
            Which::Triplet(Some(1)),
            Which::Triplet(Some(2)),
            Which::Triplet(Some(50)),
        ];
        let mut compared = [0usize; 2];
        for seed in 0..12u64 {
            let (n, p, c) = [(2, 3, 2), (5, 7, 3), (9, 4, 5), (16, 20, 6)][seed as usize % 4];
            let data = batch(seed, n, p, c);
            for which in losses {
                for dt in [DType::F64, DType::F32] {
                    let host = run(which, false, true, &data, dt);
                    let device = run(which, true, true, &data, dt);
                    assert_close(which, dt, &host, &device);
                    compared[host.is_some() as usize] += 1;
                }
            }
        }
        // Both kinds of batch came up: some without any anchor, most with.
        assert!(
            compared[0] > 0 && compared[1] > compared[0] * 4,
            "{compared:?}"
        );
    }

    #[test]
    fn batches_without_anchors_give_zero_without_checks_and_no_pairs_with_them() {
        let data = Batch {
            x: vec![vec![1.0, 0.0], vec![0.9, 0.1], vec![0.0, 1.0]],
            p: vec![vec![1.0, 0.0], vec![0.0, 1.0], vec![-1.0, 0.0]],
            // One class: nobody has a negative.
            y: vec![4, 4, 4],
        };
        for which in [Which::Nca(ProxyNcaForm::Paper, 0.0), Which::Triplet(None)] {
            assert!(run(which, false, true, &data, DType::F32).is_none());
            assert!(run(which, true, true, &data, DType::F32).is_none());
            let (loss, gx, gp) = run(which, true, false, &data, DType::F32).unwrap();
            assert_eq!(loss, 0.0, "{which:?}");
            assert!(
                gx.iter().chain(&gp).all(|&g| g == 0.0),
                "{which:?}: {gx:?} {gp:?}"
            );
        }
        // A lone example is refused before anything runs, checks or not.
        let one = Batch {
            x: vec![vec![1.0, 0.0]],
            p: data.p.clone(),
            y: vec![0],
        };
        assert!(run(Which::Triplet(None), true, false, &one, DType::F32).is_none());
    }

    #[test]
    fn device_selection_checks_its_inputs() {
        let cpu = Device::Cpu;
        let x = Tensor::zeros((3, 2), DType::F32, &cpu).unwrap();
        let p = Tensor::ones((4, 2), DType::F32, &cpu).unwrap();
        let sel =
            |y: &Tensor, check| dynamic_selection(&x, y, &p, ((1.0, 1.0), check, None), (2, "t"));
        let short = Tensor::new(&[0u32, 1], &cpu).unwrap();
        assert!(matches!(sel(&short, false), Err(LossError::Shape(_))));
        let floats = Tensor::new(&[0f32, 1.0, 2.0], &cpu).unwrap();
        assert!(matches!(sel(&floats, false), Err(LossError::LabelDtype(_))));
        let negative = Tensor::new(&[0i64, -1, 2], &cpu).unwrap();
        assert!(matches!(
            sel(&negative, true),
            Err(LossError::LabelOutOfRange { .. })
        ));
        let few = Tensor::ones((1, 2), DType::F32, &cpu).unwrap();
        let y = Tensor::new(&[0u32, 1, 2], &cpu).unwrap();
        assert!(dynamic_selection(&x, &y, &few, ((1.0, 1.0), false, None), (2, "t")).is_err());
    }
}
