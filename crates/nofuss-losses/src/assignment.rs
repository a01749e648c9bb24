//! Which proxy is an anchor's positive and which are its negatives: static assignment
//! (one proxy per class) and dynamic assignment (nearest proxy, paper section 3.1).

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::common::{
    check_label_tensor, embedding_dims, host_classes, host_labels, pairwise_squared_distances,
    prepare, proxy_count,
};
use crate::{LossError, Result};

/// How examples are mapped to proxies.
///
/// - **Static** (`p(x) = p_{class(x)}`): label `y` is proxy row `y`, so labels must be
///   below the number of proxies. An anchor's positive is its class proxy and every other
///   proxy is a negative.
/// - **Dynamic** (`p(u) = argmin_p d(u, p)`): each embedding of the batch is assigned,
///   without gradient, to its nearest proxy (squared Euclidean distance between the
///   normalised, scaled vectors; ties to the lower index). There may be fewer proxies than
///   classes and labels are any class ids. The positive proxy of anchor `x` is the
///   assigned proxy of the first *other* example of its class in the batch (batch order),
///   or of `x` itself when it is alone in its class. Its negatives are the assigned proxies
///   of the examples of other classes, each proxy once, minus the positive. An anchor with
///   no negative (every other-class example shares its positive proxy, or the batch holds
///   one class) is left out of the average.
///
///   On the CPU the picks are made on the host from the distances read back. On other
///   devices they are made there, as masks (the nearest proxy and the first same-class
///   example by `nofuss_tensor::select::smallest_k`, the negatives by a product of the
///   different-class matrix with the one-hot assignments): the same loss, nothing read
///   back or uploaded, so the step does not wait for the device and a CUDA graph can
///   replay it. There a batch in which no anchor has a negative gives a loss of 0 with
///   zero gradients when the finiteness checks are off (telling would mean waiting), and
///   [`LossError::NoPairs`] as on the CPU when they are on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Assignment {
    /// One proxy per class.
    #[default]
    Static,
    /// Nearest proxy, recomputed every step.
    Dynamic,
}

/// The anchors that take part, each with its positive proxy and its negative proxies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    /// Batch indices of the anchors that take part.
    pub anchors: Vec<u32>,
    /// Positive proxy of each anchor.
    pub positive: Vec<u32>,
    /// `[anchors, P]` row-major, 1 where the proxy is a negative of the anchor.
    pub negatives: Vec<u8>,
    /// Number of proxies `P`.
    pub num_proxies: usize,
}

impl Selection {
    /// Static assignment for `labels` (each below `num_proxies`): every anchor, its
    /// class proxy, all other proxies.
    pub fn fixed(labels: &[i64], num_proxies: usize) -> Self {
        let n = labels.len();
        let mut negatives = vec![1u8; n * num_proxies];
        for (i, &y) in labels.iter().enumerate() {
            negatives[i * num_proxies + y as usize] = 0;
        }
        Self {
            anchors: (0..n as u32).collect(),
            positive: labels.iter().map(|&y| y as u32).collect(),
            negatives,
            num_proxies,
        }
    }

    /// Dynamic assignment from the batch `classes` and each example's nearest proxy
    /// `assigned` (see [`Assignment::Dynamic`] for the rule).
    pub fn dynamic(classes: &[i64], assigned: &[u32], num_proxies: usize) -> Self {
        let n = classes.len();
        let mut sel = Self {
            anchors: Vec::with_capacity(n),
            positive: Vec::with_capacity(n),
            negatives: Vec::with_capacity(n * num_proxies),
            num_proxies,
        };
        for i in 0..n {
            let mate = (0..n)
                .find(|&j| j != i && classes[j] == classes[i])
                .unwrap_or(i);
            let pos = assigned[mate];
            let mut row = vec![0u8; num_proxies];
            for j in 0..n {
                if classes[j] != classes[i] && assigned[j] != pos {
                    row[assigned[j] as usize] = 1;
                }
            }
            if row.contains(&1) {
                sel.anchors.push(i as u32);
                sel.positive.push(pos);
                sel.negatives.extend_from_slice(&row);
            }
        }
        sel
    }

    /// Keeps only the `k` negatives of each anchor with the smallest distance in
    /// `dist_rows` (`[anchors, P]`, row-major, host values): the hardest ones. Ties go to
    /// the lower proxy index (the order is distance by `f64::total_cmp`, then index).
    /// Rows may be f32 or f64 (compared as f64, exactly).
    pub fn keep_hardest<T: Copy + Into<f64>>(&mut self, dist_rows: &[T], k: usize) {
        let p = self.num_proxies;
        let mut best = std::collections::BinaryHeap::with_capacity(k.min(p) + 1);
        for (a, row) in self.negatives.chunks_mut(p.max(1)).enumerate() {
            let d = &dist_rows[a * p..(a + 1) * p];
            // One pass with the k best so far in a max-heap: a candidate that is not
            // better than the worst of them costs one comparison (on SOP's 11,318
            // proxies almost all of them), instead of partitioning the whole row.
            best.clear();
            let mut count = 0usize;
            for (j, _) in row.iter().enumerate().filter(|(_, &m)| m == 1) {
                count += 1;
                let c = Hardness(d[j].into(), j);
                if best.len() < k {
                    best.push(c);
                } else if best.peek().is_some_and(|worst| c < *worst) {
                    // Only now take the top mutably (its guard sifts down when dropped).
                    if let Some(mut top) = best.peek_mut() {
                        *top = c;
                    }
                }
            }
            if count > k {
                row.fill(0);
                for h in best.iter() {
                    row[h.1] = 1;
                }
            }
        }
    }

    /// The rows of `dist` `[N,P]` of the anchors that take part, `[A,P]`; `dist` itself
    /// when every example is an anchor (always so with static assignment), which saves a
    /// copy of the `N x P` distances on every step.
    pub(crate) fn anchor_rows(&self, dist: &Tensor) -> Result<Tensor> {
        if self.anchors.len() == dist.dim(0)? {
            return Ok(dist.clone());
        }
        let idx = Tensor::from_slice(&self.anchors, self.anchors.len(), dist.device())?;
        Ok(dist.index_select(&idx, 0)?)
    }

    /// Error when no anchor takes part.
    pub(crate) fn require_anchors(&self) -> Result<()> {
        if self.anchors.is_empty() {
            Err(LossError::NoPairs(
                "no anchor has a negative proxy: the batch holds a single class, or every \
                 class shares one proxy"
                    .into(),
            ))
        } else {
            Ok(())
        }
    }

    /// The same selection over only the proxies some anchor uses (as positive or
    /// negative), and those proxies' indices in increasing order: column `k` of the
    /// result is proxy `used[k]`. A loss over the compact selection and the distances to
    /// `used` equals the loss over all proxies (the others are masked out of it).
    pub(crate) fn compact(&self) -> (Vec<u32>, Self) {
        let p = self.num_proxies;
        let mut in_use = vec![false; p];
        for &j in &self.positive {
            in_use[j as usize] = true;
        }
        for row in self.negatives.chunks(p.max(1)) {
            for (u, &m) in in_use.iter_mut().zip(row) {
                *u |= m == 1;
            }
        }
        let used: Vec<u32> = (0..p as u32).filter(|&j| in_use[j as usize]).collect();
        let negatives = self
            .negatives
            .chunks(p.max(1))
            .flat_map(|row| used.iter().map(move |&j| row[j as usize]))
            .collect();
        let positive = self
            .positive
            .iter()
            .map(|j| used.partition_point(|u| u < j) as u32)
            .collect();
        let sel = Self {
            anchors: self.anchors.clone(),
            positive,
            negatives,
            num_proxies: used.len(),
        };
        (used, sel)
    }
}

/// A negative's distance and proxy index, ordered by distance (`f64::total_cmp`), then
/// index: the order in which [`Selection::keep_hardest`] ranks negatives.
#[derive(Debug, Clone, Copy)]
struct Hardness(f64, usize);

impl Ord for Hardness {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0).then(self.1.cmp(&other.1))
    }
}

impl PartialOrd for Hardness {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Hardness {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other).is_eq()
    }
}

impl Eq for Hardness {}

/// `(N, P)` of `[N,D]` embeddings and `[P,D]` proxies, checked, with at least
/// `min_proxies` proxies (`what` names the loss in the error).
pub(crate) fn checked_sizes(
    embeddings: &Tensor,
    proxies: &Tensor,
    min_proxies: usize,
    what: &str,
) -> Result<(usize, usize)> {
    let (n, d) = embedding_dims(embeddings)?;
    let p = proxy_count(proxies, d)?;
    if p < min_proxies {
        return Err(LossError::Config(format!(
            "{what} needs at least {min_proxies} proxies, got {p}"
        )));
    }
    Ok((n, p))
}

/// What a proxy loss with dynamic assignment or the `hardest` `k` negatives needs before
/// its formula (static assignment with all negatives goes through [`static_inputs`]):
/// inputs checked, embeddings and proxies normalised and scaled, and the anchors' positive
/// and negative proxies with the squared distances to them. `min_proxies` and `what` make
/// the error for too few proxies. The nearest or hardest proxies come from distances
/// computed without gradient, and the returned distances and selection cover only the
/// proxies the anchors use ([`Selection::compact`]: at most `N` for dynamic assignment,
/// `N (k + 1)` for the hardest negatives, where SOP has 11,318), so the loss's passes,
/// masks and backward pass are that narrow.
pub(crate) fn proxy_distances(
    embeddings: &Tensor,
    labels: &Tensor,
    proxies: &Tensor,
    (scales, check, assignment, hardest): ((f64, f64), bool, Assignment, Option<usize>),
    (min_proxies, what): (usize, &str),
) -> Result<(Tensor, Selection)> {
    let (n, p) = checked_sizes(embeddings, proxies, min_proxies, what)?;
    let (x, pr) = prepare(embeddings, proxies, scales, check)?;
    let all = pairwise_squared_distances(&x.detach(), &pr.detach())?;
    let sel = select_on_host(all, labels, (n, p), assignment, hardest)?;
    let (used, sel) = sel.compact();
    let used = Tensor::from_vec(used, sel.num_proxies, pr.device())?;
    let dist = pairwise_squared_distances(&x, &pr.index_select(&used, 0)?)?;
    Ok((dist, sel))
}

/// The selection of a batch from its distances `all` `[N,P]` (without gradient), read
/// to the host once and dropped before the loss's own distances are computed: nearest
/// proxies for dynamic assignment, then the `hardest` negatives of each anchor.
fn select_on_host(
    all: Tensor,
    labels: &Tensor,
    (n, p): (usize, usize),
    assignment: Assignment,
    hardest: Option<usize>,
) -> Result<Selection> {
    // In the distances' own precision (f32 unless f64: half the bytes of an f64 copy).
    if all.dtype() == DType::F64 {
        let host: Vec<f64> = all.flatten_all()?.to_vec1()?;
        drop(all);
        select_from_rows(&host, labels, (n, p), assignment, hardest)
    } else {
        let host: Vec<f32> = all.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        drop(all);
        select_from_rows(&host, labels, (n, p), assignment, hardest)
    }
}

/// [`select_on_host`] from the host rows `host` `[N,P]`.
fn select_from_rows<T: Copy + Into<f64>>(
    host: &[T],
    labels: &Tensor,
    (n, p): (usize, usize),
    assignment: Assignment,
    hardest: Option<usize>,
) -> Result<Selection> {
    let mut sel = match assignment {
        Assignment::Static => Selection::fixed(&host_labels(labels, n, p)?, p),
        Assignment::Dynamic => {
            Selection::dynamic(&host_classes(labels, n)?, &nearest_rows(host, p), p)
        }
    };
    sel.require_anchors()?;
    if let Some(k) = hardest {
        if sel.anchors.len() == n {
            sel.keep_hardest(host, k);
        } else {
            let rows: Vec<T> = sel
                .anchors
                .iter()
                .flat_map(|&a| &host[a as usize * p..][..p])
                .copied()
                .collect();
            sel.keep_hardest(&rows, k);
        }
    }
    Ok(sel)
}

/// The inputs of a static-assignment loss computed per row from the points
/// (`nofuss_tensor::ops::*_rows_from_points`): the normalised, scaled embeddings and
/// proxies and the labels on their device, after the checks `proxy_distances` makes. The
/// labels are checked against the proxies on the host when they live there or when
/// `check` is on (then with the finiteness checks' synchronisations); otherwise nothing
/// waits for the device, and a label outside the proxies gives a NaN loss.
pub(crate) fn static_inputs(
    embeddings: &Tensor,
    labels: &Tensor,
    proxies: &Tensor,
    (scales, check): ((f64, f64), bool),
    (min_proxies, what): (usize, &str),
) -> Result<(Tensor, Tensor, Tensor)> {
    let (n, p) = checked_sizes(embeddings, proxies, min_proxies, what)?;
    check_label_tensor(labels, n)?;
    if labels.device().is_cpu() || check {
        host_labels(labels, n, p)?;
    }
    let (x, pr) = prepare(embeddings, proxies, scales, check)?;
    let labels = labels.to_device(x.device())?;
    Ok((x, pr, labels))
}

/// Index of the nearest proxy of each row of `dist` `[N,P]` (ties to the lower index).
pub fn nearest(dist: &Tensor) -> Result<Vec<u32>> {
    let (_, p) = dist.dims2()?;
    let host: Vec<f64> = dist
        .detach()
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1()?;
    Ok(nearest_rows(&host, p))
}

/// [`nearest`] over host rows of `p` values (row-major; f32 or f64, compared as f64).
fn nearest_rows<T: Copy + Into<f64>>(dist: &[T], p: usize) -> Vec<u32> {
    dist.chunks(p.max(1))
        .map(|row| {
            let mut best = 0usize;
            for (j, &v) in row.iter().enumerate() {
                if v.into() < row[best].into() {
                    best = j;
                }
            }
            best as u32
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(sel: &Selection) -> Vec<Vec<u32>> {
        sel.negatives
            .chunks(sel.num_proxies)
            .map(|r| {
                (0..r.len() as u32)
                    .filter(|&j| r[j as usize] == 1)
                    .collect()
            })
            .collect()
    }

    #[test]
    fn static_selection_is_class_proxy_against_all_others() {
        let s = Selection::fixed(&[2, 0], 3);
        assert_eq!(s.anchors, vec![0, 1]);
        assert_eq!(s.positive, vec![2, 0]);
        assert_eq!(rows(&s), vec![vec![0, 1], vec![1, 2]]);
    }

    #[test]
    fn dynamic_rule_on_hand_made_batches() {
        // Classes: a a b c ; assigned proxies: 0 1 1 3 (P = 4).
        // Anchor 0 (a): mate is 1 -> positive p1; negatives: proxies of b (1) and c (3)
        // minus p1 -> {3}.
        // Anchor 1 (a): mate is 0 -> positive p0; negatives {1, 3}.
        // Anchor 2 (b): alone -> itself, positive p1; negatives: a's {0, 1} and c's {3}
        // minus p1 -> {0, 3}.
        // Anchor 3 (c): alone -> p3; negatives {0, 1}.
        let s = Selection::dynamic(&[7, 7, 4, 9], &[0, 1, 1, 3], 4);
        assert_eq!(s.anchors, vec![0, 1, 2, 3]);
        assert_eq!(s.positive, vec![1, 0, 1, 3]);
        assert_eq!(rows(&s), vec![vec![3], vec![1, 3], vec![0, 3], vec![0, 1]]);
    }

    #[test]
    fn dynamic_drops_anchors_without_negatives() {
        // Two classes, every example on proxy 0: nobody has a negative.
        let s = Selection::dynamic(&[0, 0, 1, 1], &[0, 0, 0, 0], 2);
        assert!(s.anchors.is_empty());
        assert!(s.require_anchors().is_err());
        // One class only.
        let s = Selection::dynamic(&[5, 5, 5], &[0, 1, 2], 3);
        assert!(s.anchors.is_empty());
        // Anchor 0's positive (via its mate, proxy 1) is also class b's proxy: dropped.
        let s = Selection::dynamic(&[0, 0, 1], &[0, 1, 1], 2);
        assert_eq!(s.anchors, vec![1, 2]);
        assert_eq!(rows(&s), vec![vec![1], vec![0]]);
    }

    #[test]
    fn dynamic_with_one_proxy_per_class_in_the_batch_is_static_restricted_to_the_batch() {
        // Assignments equal the classes: same positives as static, negatives are the
        // other classes present in the batch.
        let s = Selection::dynamic(&[0, 1, 2, 0], &[0, 1, 2, 0], 4);
        assert_eq!(s.positive, vec![0, 1, 2, 0]);
        assert_eq!(rows(&s)[0], vec![1, 2]);
    }

    #[test]
    fn hardest_negatives_are_the_nearest() {
        let mut s = Selection::fixed(&[0, 1], 4);
        let d = [0.0, 3.0, 1.0, 2.0, 5.0, 0.0, 4.0, 4.0];
        s.keep_hardest(&d, 2);
        assert_eq!(rows(&s), vec![vec![2, 3], vec![2, 3]]);
        s.keep_hardest(&d, 5);
        assert_eq!(rows(&s), vec![vec![2, 3], vec![2, 3]]);
    }

    #[test]
    fn hardest_negatives_match_a_full_sort_with_ties() {
        // 3 anchors, 200 proxies, distances from 7 values (many ties at every boundary).
        let (n, p) = (3usize, 200usize);
        let d: Vec<f64> = (0..n * p).map(|i| ((i * 37 + 11) % 7) as f64).collect();
        for k in [1, 2, 13, 50, 198, 199, 300] {
            let mut s = Selection::fixed(&[4, 0, 199], p);
            s.keep_hardest(&d, k);
            for (a, &y) in [4usize, 0, 199].iter().enumerate() {
                let row = &d[a * p..][..p];
                let mut want: Vec<u32> = (0..p as u32).filter(|&j| j as usize != y).collect();
                want.sort_by(|&x, &z| row[x as usize].total_cmp(&row[z as usize]).then(x.cmp(&z)));
                want.truncate(k);
                want.sort_unstable();
                assert_eq!(rows(&s)[a], want, "k {k} anchor {a}");
            }
        }
    }

    #[test]
    fn nearest_breaks_ties_low() {
        let d = Tensor::new(
            &[[1f32, 0.5, 0.5], [0.0, 2.0, 0.0]],
            &candle_core::Device::Cpu,
        )
        .unwrap();
        assert_eq!(nearest(&d).unwrap(), vec![1, 0]);
    }

    #[test]
    fn compact_selection_keeps_the_loss_and_its_gradients() {
        use crate::proxy_nca::{nca_over_selection, ProxyNcaForm};
        use candle_core::{Device, Var};
        // 6 examples in 3 classes assigned to 4 of 10 proxies.
        let (classes, assigned) = ([0i64, 0, 1, 1, 2, 2], [7u32, 7, 2, 9, 2, 5]);
        let sel = Selection::dynamic(&classes, &assigned, 10);
        let (used, c) = sel.compact();
        assert_eq!(used, [2, 5, 7, 9]);
        assert_eq!((c.num_proxies, &c.anchors), (4, &sel.anchors));
        for (a, row) in sel.negatives.chunks(10).enumerate() {
            assert_eq!(used[c.positive[a] as usize], sel.positive[a]);
            for (j, &m) in row.iter().enumerate() {
                let k = used.iter().position(|&u| u as usize == j);
                assert_eq!(
                    k.map_or(0, |k| c.negatives[a * 4 + k]),
                    m,
                    "anchor {a} proxy {j}"
                );
            }
        }
        // The loss over the used proxies equals the loss over all, with its gradients.
        let dev = Device::Cpu;
        let xv: Vec<f64> = (0..18).map(|i| ((i * 7 % 11) as f64 - 5.0) / 4.0).collect();
        let pv: Vec<f64> = (0..30).map(|i| ((i * 5 % 13) as f64 - 6.0) / 5.0).collect();
        for (form, eps) in [
            (ProxyNcaForm::Paper, 0.0),
            (ProxyNcaForm::Softmax, 0.0),
            (ProxyNcaForm::Softmax, 0.1),
        ] {
            let run = |compact: bool| {
                let x = Var::from_vec(xv.clone(), (6, 3), &dev).unwrap();
                let p = Var::from_vec(pv.clone(), (10, 3), &dev).unwrap();
                let loss = if compact {
                    let idx = Tensor::from_vec(used.clone(), 4, &dev).unwrap();
                    let pc = p.as_tensor().index_select(&idx, 0).unwrap();
                    let dist = pairwise_squared_distances(x.as_tensor(), &pc).unwrap();
                    nca_over_selection(&dist, &c, form, eps).unwrap()
                } else {
                    let dist = pairwise_squared_distances(x.as_tensor(), p.as_tensor()).unwrap();
                    nca_over_selection(&dist, &sel, form, eps).unwrap()
                };
                let g = loss.backward().unwrap();
                let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f64>().unwrap();
                let grads = [x.as_tensor(), p.as_tensor()].map(|v| flat(g.get(v).unwrap()));
                (loss.to_scalar::<f64>().unwrap(), grads)
            };
            let ((l1, g1), (l2, g2)) = (run(false), run(true));
            assert!((l1 - l2).abs() < 1e-12, "{form:?} {eps}: {l1} vs {l2}");
            for (a, b) in g1.iter().flatten().zip(g2.iter().flatten()) {
                assert!((a - b).abs() < 1e-12, "{form:?} {eps}: {a} vs {b}");
            }
        }
    }
}
