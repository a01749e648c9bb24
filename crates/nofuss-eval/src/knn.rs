//! Exact k-nearest neighbours by tiles, and Recall@K on top of them.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::tiles::{dot_tile, sq_norms};
use crate::{check_embeddings, EvalError, Result};

/// The distance used for retrieval.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Metric {
    /// Squared Euclidean distance (same ranking as Euclidean).
    #[default]
    Euclidean,
    /// Cosine distance `1 - cos` (rows are L2-normalised first; a zero row stays zero).
    Cosine,
}

/// The K nearest neighbours of every point, itself excluded, nearest first.
#[derive(Debug, Clone, PartialEq)]
pub struct Neighbors {
    /// Neighbours per point.
    pub k: usize,
    /// `[N, k]` row-major neighbour indices.
    pub indices: Vec<u32>,
    /// `[N, k]` row-major distances (squared Euclidean, or `1 - cos`).
    pub distances: Vec<f32>,
}

impl Neighbors {
    /// The neighbour indices of point `i`.
    pub fn of(&self, i: usize) -> &[u32] {
        &self.indices[i * self.k..(i + 1) * self.k]
    }
}

const QUERY_BLOCK: usize = 256;
const DB_TILE: usize = 1024;

/// Exact K nearest neighbours of every row of `embeddings` (`[N, dim]`) among the others.
///
/// Works tile by tile: a block of queries times a tile of the database is one matrix
/// product (the `gemm` crate), distances follow as `|q|² + |x|² - 2 q·x`, and each query
/// keeps a bounded max-heap of its best K. Memory is `O(N·K)` plus one tile per thread;
/// the `N×N` matrix never exists. Query blocks run in parallel (rayon).
///
/// Ties are broken deterministically: among equal distances the lower index comes first.
/// A point never counts as its own neighbour, but an exact duplicate of it does.
pub fn knn(embeddings: &[f32], dim: usize, k: usize, metric: Metric) -> Result<Neighbors> {
    let n = check_embeddings(embeddings, dim, None)?;
    if k == 0 {
        return Err(EvalError::Config("K must be at least 1".into()));
    }
    if k >= n {
        return Err(EvalError::KTooLarge { k, n });
    }
    let normalised;
    let data: &[f32] = match metric {
        Metric::Euclidean => embeddings,
        Metric::Cosine => {
            normalised = embeddings
                .chunks_exact(dim)
                .flat_map(|r| {
                    let norm = r.iter().map(|v| v * v).sum::<f32>().sqrt();
                    let s = if norm > 0.0 { 1.0 / norm } else { 0.0 };
                    r.iter().map(move |v| v * s)
                })
                .collect::<Vec<f32>>();
            &normalised
        }
    };
    let sq_norms = sq_norms(data, dim);
    let mut indices = vec![0u32; n * k];
    let mut distances = vec![0f32; n * k];
    indices
        .par_chunks_mut(QUERY_BLOCK * k)
        .zip(distances.par_chunks_mut(QUERY_BLOCK * k))
        .enumerate()
        .for_each(|(block, (idx_out, dist_out))| {
            let q0 = block * QUERY_BLOCK;
            let nq = idx_out.len() / k;
            let mut tops: Vec<TopK> = (0..nq).map(|_| TopK::new(k)).collect();
            let mut tile = vec![0f32; QUERY_BLOCK * DB_TILE];
            for t0 in (0..n).step_by(DB_TILE) {
                let nt = DB_TILE.min(n - t0);
                dot_tile(
                    &data[q0 * dim..(q0 + nq) * dim],
                    &data[t0 * dim..(t0 + nt) * dim],
                    dim,
                    &mut tile[..nq * nt],
                );
                for (qi, top) in tops.iter_mut().enumerate() {
                    let q = q0 + qi;
                    for (jj, &d) in tile[qi * nt..(qi + 1) * nt].iter().enumerate() {
                        let j = t0 + jj;
                        if j == q {
                            continue;
                        }
                        let dist = match metric {
                            Metric::Euclidean => (sq_norms[q] + sq_norms[j] - 2.0 * d).max(0.0),
                            Metric::Cosine => 1.0 - d,
                        };
                        top.push(dist, j as u32);
                    }
                }
            }
            for (qi, top) in tops.into_iter().enumerate() {
                for (slot, (d, i)) in top.into_sorted().into_iter().enumerate() {
                    dist_out[qi * k + slot] = d;
                    idx_out[qi * k + slot] = i;
                }
            }
        });
    Ok(Neighbors {
        k,
        indices,
        distances,
    })
}

/// Recall@K: the fraction of queries with at least one same-class point among their K
/// nearest neighbours (the query excluded). Every point is a query; all others are the
/// database, as in Song et al. 2016. Returns `(K, recall)` in the order of `ks`.
pub fn recall_at_k(
    embeddings: &[f32],
    dim: usize,
    labels: &[u32],
    ks: &[usize],
    metric: Metric,
) -> Result<Vec<(usize, f64)>> {
    check_embeddings(embeddings, dim, Some(labels.len()))?;
    let kmax = ks
        .iter()
        .copied()
        .max()
        .ok_or_else(|| EvalError::Config("no K given".into()))?;
    let nb = knn(embeddings, dim, kmax, metric)?;
    recall_from_neighbors(&nb, labels, ks)
}

/// Recall@K from precomputed neighbours (each `K <= neighbors.k`).
pub fn recall_from_neighbors(
    nb: &Neighbors,
    labels: &[u32],
    ks: &[usize],
) -> Result<Vec<(usize, f64)>> {
    let n = labels.len();
    if nb.indices.len() != n * nb.k {
        return Err(EvalError::Shape(format!(
            "{} labels for neighbours of {} points",
            n,
            nb.indices.len() / nb.k.max(1)
        )));
    }
    // For each query, the rank of its first same-class neighbour (k if none).
    let first_hit: Vec<usize> = (0..n)
        .into_par_iter()
        .map(|i| {
            nb.of(i)
                .iter()
                .position(|&j| labels[j as usize] == labels[i])
                .unwrap_or(nb.k)
        })
        .collect();
    ks.iter()
        .map(|&k| {
            if k == 0 || k > nb.k {
                return Err(EvalError::Config(format!(
                    "K = {k} outside 1..={} (neighbours computed)",
                    nb.k
                )));
            }
            let hits = first_hit.iter().filter(|&&r| r < k).count();
            Ok((k, hits as f64 / n as f64))
        })
        .collect()
}

/// A candidate ordered by (distance, index): total, so ties break by index.
#[derive(Clone, Copy, PartialEq)]
struct Candidate(f32, u32);

impl Eq for Candidate {}

impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0).then(self.1.cmp(&other.1))
    }
}

/// The best K (distance, index) pairs seen: a max-heap whose top is the worst kept, so
/// a candidate that cannot enter is rejected with one comparison.
struct TopK {
    k: usize,
    heap: std::collections::BinaryHeap<Candidate>,
    /// Distance of the worst kept candidate (infinite until K are kept): anything
    /// farther is rejected without touching the heap.
    worst: f32,
}

impl TopK {
    fn new(k: usize) -> Self {
        Self {
            k,
            heap: std::collections::BinaryHeap::with_capacity(k + 1),
            worst: f32::INFINITY,
        }
    }

    #[inline]
    fn push(&mut self, d: f32, i: u32) {
        if d > self.worst {
            return;
        }
        let c = Candidate(d, i);
        if self.heap.len() < self.k {
            self.heap.push(c);
        } else if let Some(mut worst) = self.heap.peek_mut() {
            if c < *worst {
                *worst = c;
            }
        }
        if self.heap.len() == self.k {
            self.worst = self.heap.peek().map_or(f32::INFINITY, |w| w.0);
        }
    }

    /// The kept pairs, nearest first.
    fn into_sorted(self) -> Vec<(f32, u32)> {
        self.heap
            .into_sorted_vec()
            .into_iter()
            .map(|c| (c.0, c.1))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Brute-force sorted squared distances (computed as sums of squared differences).
    fn brute_distances(emb: &[f32], dim: usize, i: usize) -> Vec<f32> {
        let n = emb.len() / dim;
        let mut c: Vec<f32> = (0..n)
            .filter(|&j| j != i)
            .map(|j| {
                (0..dim)
                    .map(|t| (emb[i * dim + t] - emb[j * dim + t]).powi(2))
                    .sum()
            })
            .collect();
        c.sort_by(f32::total_cmp);
        c
    }

    #[test]
    fn matches_brute_force_across_tiles() {
        // 2,100 points: three database tiles (the last ragged) and a ragged last query
        // block; K = 6 and K = 150 (many heap replacements).
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let (n, dim) = (2100, 5);
        let emb: Vec<f32> = (0..n * dim).map(|_| rng.gen::<f32>()).collect();
        for k in [6, 150] {
            let nb = knn(&emb, dim, k, Metric::Euclidean).unwrap();
            for i in (0..n).step_by(7) {
                let want = brute_distances(&emb, dim, i);
                // The true distances of the neighbours we chose are the k smallest, in order.
                for (slot, &j) in nb.of(i).iter().enumerate() {
                    assert_ne!(j as usize, i);
                    let d: f32 = (0..dim)
                        .map(|t| (emb[i * dim + t] - emb[j as usize * dim + t]).powi(2))
                        .sum();
                    assert!(
                        (d - want[slot]).abs() < 1e-5,
                        "k {k} row {i} slot {slot}: {d} vs {}",
                        want[slot]
                    );
                }
            }
        }
    }

    #[test]
    fn hand_computed_recall() {
        // 1-D points: 0(a) 1(b) 3(a) 10(b) 11(b)
        let emb = [0.0f32, 1.0, 3.0, 10.0, 11.0];
        let labels = [0u32, 1, 0, 1, 1];
        // NN: 0->1(b) miss, 1->0(a) miss, 2->1(b) miss, 3->4 hit, 4->3 hit  => R@1 = 2/5
        // 2-NN: 0->{1,2} hit, 1->{0,2} miss, 2->{1,0} hit, 3,4 hit => R@2 = 4/5
        let r = recall_at_k(&emb, 1, &labels, &[1, 2], Metric::Euclidean).unwrap();
        assert_eq!(r, vec![(1, 0.4), (2, 0.8)]);
    }

    #[test]
    fn ties_prefer_lower_index_and_duplicates_count() {
        // Point 0 is equidistant from 1 and 2; duplicates 3 and 4.
        let emb = [0.0f32, -1.0, 1.0, 7.0, 7.0];
        let nb = knn(&emb, 1, 2, Metric::Euclidean).unwrap();
        assert_eq!(nb.of(0), &[1, 2]);
        assert_eq!(nb.of(3)[0], 4);
        assert_eq!(nb.distances[3 * 2], 0.0);
    }

    #[test]
    fn cosine_ignores_norms() {
        let emb = [1.0f32, 0.0, 100.0, 1.0, 0.0, 1.0, 0.0, 50.0];
        let nb = knn(&emb, 2, 1, Metric::Cosine).unwrap();
        assert_eq!(nb.of(0), &[1]);
        assert_eq!(nb.of(2), &[3]);
        let eu = knn(&emb, 2, 1, Metric::Euclidean).unwrap();
        assert_eq!(eu.of(0), &[2]);
    }

    #[test]
    fn bad_k_and_labels() {
        let emb = [0.0f32, 1.0, 2.0];
        assert!(matches!(
            knn(&emb, 1, 3, Metric::Euclidean),
            Err(EvalError::KTooLarge { k: 3, n: 3 })
        ));
        assert!(matches!(
            knn(&emb, 1, 0, Metric::Euclidean),
            Err(EvalError::Config(_))
        ));
        assert!(matches!(
            recall_at_k(&emb, 1, &[0, 1], &[1], Metric::Euclidean),
            Err(EvalError::Shape(_))
        ));
        assert!(matches!(
            recall_at_k(&emb, 1, &[0, 1, 1], &[], Metric::Euclidean),
            Err(EvalError::Config(_))
        ));
        let nb = knn(&emb, 1, 1, Metric::Euclidean).unwrap();
        assert!(recall_from_neighbors(&nb, &[0, 0, 0], &[2]).is_err());
    }

    #[test]
    fn single_class_has_recall_one() {
        let r = recall_at_k(&[0.0f32, 5.0, 9.0], 1, &[4, 4, 4], &[1], Metric::Euclidean).unwrap();
        assert_eq!(r, vec![(1, 1.0)]);
    }
}
