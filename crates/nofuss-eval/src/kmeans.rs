//! k-means (Lloyd's algorithm) with k-means++ seeding and restarts.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::{check_embeddings, EvalError, Result};

/// Settings of [`kmeans`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KMeansConfig {
    /// Number of clusters.
    pub k: usize,
    /// Independent restarts; the run with the lowest inertia wins (scikit-learn's `n_init`).
    pub restarts: usize,
    /// Lloyd iterations per restart at most.
    pub max_iter: usize,
    /// Stop when the centroids move (summed squared shift) less than `tol` times the
    /// mean per-dimension variance of the data, as scikit-learn does.
    pub tol: f64,
    /// Seed of the k-means++ draws.
    pub seed: u64,
    /// Candidates drawn for each new centre in the k-means++ seeding, the one that
    /// lowers the inertia most being kept ("greedy k-means++", scikit-learn's default).
    /// 0 picks scikit-learn's number, `2 + ln k`; 1 is the original k-means++.
    pub local_trials: usize,
}

impl Default for KMeansConfig {
    /// scikit-learn's defaults (`KMeans(n_init="auto", max_iter=300, tol=1e-4)` with
    /// greedy k-means++): one run, as `n_init="auto"` means for k-means++ seeding.
    fn default() -> Self {
        Self {
            k: 8,
            restarts: 1,
            max_iter: 300,
            tol: 1e-4,
            seed: 0,
            local_trials: 0,
        }
    }
}

/// A clustering.
#[derive(Debug, Clone, PartialEq)]
pub struct KMeans {
    /// Cluster of each point.
    pub assignments: Vec<u32>,
    /// `[k, dim]` row-major centroids.
    pub centroids: Vec<f32>,
    /// Sum of squared distances of points to their centroid.
    pub inertia: f64,
}

/// Clusters the rows of `data` (`[N, dim]`) into `cfg.k` clusters.
pub fn kmeans(data: &[f32], dim: usize, cfg: &KMeansConfig) -> Result<KMeans> {
    let n = check_embeddings(data, dim, None)?;
    if cfg.k == 0 || cfg.k > n {
        return Err(EvalError::Config(format!(
            "k-means with k = {} on {n} points",
            cfg.k
        )));
    }
    if cfg.restarts == 0 {
        return Err(EvalError::Config(
            "k-means needs at least one restart".into(),
        ));
    }
    let mean_var = {
        let mut v = 0.0f64;
        for d in 0..dim {
            let m = (0..n).map(|i| data[i * dim + d] as f64).sum::<f64>() / n as f64;
            v += (0..n)
                .map(|i| (data[i * dim + d] as f64 - m).powi(2))
                .sum::<f64>()
                / n as f64;
        }
        v / dim as f64
    };
    let mut best: Option<KMeans> = None;
    for r in 0..cfg.restarts {
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed.wrapping_add(r as u64));
        let run = lloyd(
            data,
            dim,
            n,
            cfg,
            seed_centres(data, dim, n, cfg, &mut rng),
            cfg.tol * mean_var,
        );
        if best.as_ref().is_none_or(|b| run.inertia < b.inertia) {
            best = Some(run);
        }
    }
    best.ok_or_else(|| EvalError::Config("no k-means run".into()))
}

use crate::panels::Panels;
use crate::tiles::{dot_tile, sq_dist as sq, sq_norms};

/// Points per block of the assignment step (one block per rayon task).
const POINT_BLOCK: usize = 256;
/// Centroids per matrix-product tile.
const CENTROID_TILE: usize = 1024;

/// A point's nearest centroid, the squared distance to it, and a lower bound on the
/// squared distance to every other centroid.
#[derive(Debug, Clone, Copy)]
struct Nearest {
    centroid: u32,
    d2: f32,
    others: f32,
}

/// Nearest centroid of every row of `data` (with `x_norms` its squared norms).
///
/// Distances to all centroids come from matrix products, `|x|² + |c|² - 2 x·c`, one
/// block of points times one tile of centroids at a time; the winner's distance is then
/// recomputed directly so inertia carries no cancellation error. Ties go to the lower
/// centroid index. Cost: one `N x k x dim` product, memory one tile per thread.
fn assign(data: &[f32], x_norms: &[f32], centroids: &[f32], dim: usize) -> Vec<Nearest> {
    let k = centroids.len() / dim;
    let c_norms = sq_norms(centroids, dim);
    let init = Nearest {
        centroid: 0,
        d2: f32::INFINITY,
        others: f32::INFINITY,
    };
    let mut out = vec![init; x_norms.len()];
    out.par_chunks_mut(POINT_BLOCK)
        .enumerate()
        .for_each(|(b, best)| {
            let p0 = b * POINT_BLOCK;
            let np = best.len();
            let mut tile = vec![0f32; np * CENTROID_TILE.min(k)];
            for c0 in (0..k).step_by(CENTROID_TILE) {
                let nc = CENTROID_TILE.min(k - c0);
                dot_tile(
                    &data[p0 * dim..(p0 + np) * dim],
                    &centroids[c0 * dim..(c0 + nc) * dim],
                    dim,
                    &mut tile[..np * nc],
                );
                for (nb, row) in best.iter_mut().zip(tile[..np * nc].chunks_exact(nc)) {
                    // `d2` and `others` hold |c|² - 2 x·c until the end.
                    let (mut bd, mut bc, mut second) = (nb.d2, nb.centroid, nb.others);
                    for (cj, &dot) in row.iter().enumerate() {
                        let d = c_norms[c0 + cj] - 2.0 * dot;
                        if d < bd {
                            second = bd;
                            bd = d;
                            bc = (c0 + cj) as u32;
                        } else if d < second {
                            second = d;
                        }
                    }
                    *nb = Nearest {
                        centroid: bc,
                        d2: bd,
                        others: second,
                    };
                }
            }
            for (pi, nb) in best.iter_mut().enumerate() {
                let (c, p) = (nb.centroid as usize, p0 + pi);
                nb.d2 = sq(
                    &data[p * dim..(p + 1) * dim],
                    &centroids[c * dim..(c + 1) * dim],
                );
                // Rounding of the expanded form: keep the bound on the safe side.
                nb.others = (nb.others + x_norms[p]) * (1.0 - 1e-5) - 1e-6 * (1.0 + x_norms[p]);
            }
        });
    out
}

/// The k-means++ seeding `cfg` asks for.
fn seed_centres(
    data: &[f32],
    dim: usize,
    n: usize,
    cfg: &KMeansConfig,
    rng: &mut ChaCha8Rng,
) -> Vec<f32> {
    let trials = match cfg.local_trials {
        0 => 2 + (cfg.k as f64).ln() as usize,
        t => t,
    };
    if trials == 1 {
        plus_plus(data, dim, n, cfg.k, rng)
    } else {
        greedy_plus_plus(data, dim, n, cfg.k, trials, rng)
    }
}

/// Points per task of a greedy seeding step.
const GREEDY_BLOCK: usize = 4096;

/// Sum of one block of squared distances, in f64.
fn block_sum(b: &[f32]) -> f64 {
    b.iter().map(|&v| v as f64).sum()
}

/// The seeding's start: a uniformly drawn first centre (room for `k`), every point's
/// squared distance to it, and the sums of those per block of `SEED_BLOCK` points.
fn first_centre(
    data: &[f32],
    dim: usize,
    n: usize,
    k: usize,
    rng: &mut ChaCha8Rng,
) -> (Vec<f32>, Vec<f32>, Vec<f64>) {
    let row = |i: usize| &data[i * dim..(i + 1) * dim];
    let mut centroids = Vec::with_capacity(k * dim);
    let first = rng.gen_range(0..n);
    centroids.extend_from_slice(row(first));
    let d2: Vec<f32> = (0..n)
        .into_par_iter()
        .map(|i| sq(row(i), row(first)))
        .collect();
    let sums = d2.par_chunks(SEED_BLOCK).map(block_sum).collect();
    (centroids, d2, sums)
}

/// Greedy k-means++ (as scikit-learn's `_kmeans_plusplus`): for each new centre, draw
/// `trials` candidates with probability proportional to the squared distance to the
/// nearest centre so far, and keep the one that leaves the smallest total. The
/// candidates' distances to all points and the totals come from one pass over the points
/// per step ([`Panels::block`], per block of `GREEDY_BLOCK` points).
fn greedy_plus_plus(
    data: &[f32],
    dim: usize,
    n: usize,
    k: usize,
    trials: usize,
    rng: &mut ChaCha8Rng,
) -> Vec<f32> {
    let row = |i: usize| &data[i * dim..(i + 1) * dim];
    let x_norms = sq_norms(data, dim);
    let panels = Panels::new(data, &x_norms, dim);
    let (mut centroids, mut d2, mut sums) = first_centre(data, dim, n, k, rng);
    // Zero for the panels' padding: never drawn, nothing added to a total.
    d2.resize(panels.len(), 0.0);
    // Per block of points, `[trials, points]` distances to the step's candidates.
    let mut cand_d2 = vec![0f32; panels.len() * trials];
    let mut cands = vec![0f32; trials * dim];
    while centroids.len() < k * dim {
        let total: f64 = sums.iter().sum();
        let picks: Vec<usize> = (0..trials)
            .map(|_| {
                if total > 0.0 {
                    draw(&d2, &sums, rng.gen::<f64>() * total)
                } else {
                    rng.gen_range(0..n)
                }
            })
            .collect();
        for (t, &p) in picks.iter().enumerate() {
            cands[t * dim..(t + 1) * dim].copy_from_slice(row(p));
        }
        let c_norms: Vec<f32> = picks.iter().map(|&p| x_norms[p]).collect();
        // Summed in block order, so the result does not depend on threads.
        let partial: Vec<Vec<f64>> = cand_d2
            .par_chunks_mut(GREEDY_BLOCK * trials)
            .zip(d2.par_chunks(GREEDY_BLOCK))
            .enumerate()
            .map(|(b, (out, d))| panels.block(b * GREEDY_BLOCK, d, &cands, &c_norms, out))
            .collect();
        let mut best = (0, f64::INFINITY);
        for t in 0..trials {
            let pot: f64 = partial.iter().map(|p| p[t]).sum();
            if pot < best.1 {
                best = (t, pot);
            }
        }
        let t = best.0;
        d2.par_chunks_mut(GREEDY_BLOCK)
            .zip(cand_d2.par_chunks(GREEDY_BLOCK * trials))
            .zip(sums.par_chunks_mut(GREEDY_BLOCK / SEED_BLOCK))
            .for_each(|((d, c), s)| {
                let len = d.len();
                for (dv, &cv) in d.iter_mut().zip(&c[t * len..(t + 1) * len]) {
                    *dv = dv.min(cv);
                }
                for (sb, db) in s.iter_mut().zip(d.chunks(SEED_BLOCK)) {
                    *sb = block_sum(db);
                }
            });
        centroids.extend_from_slice(row(picks[t]));
    }
    centroids
}

/// Points per block of the k-means++ draw: the draw walks block sums, then one block.
const SEED_BLOCK: usize = 1024;
/// New centres gathered before the distances of all points are brought up to date.
const SEED_BATCH: usize = 32;

/// k-means++ seeding (Arthur & Vassilvitskii 2007): each next centre drawn with
/// probability proportional to the squared distance to the nearest centre so far.
///
/// Exact, but lazy: the distances of all points are refreshed only every `SEED_BATCH`
/// centres (one matrix product, one pass over the data). In between, a point is proposed
/// from the stale distances, which only overestimate, and accepted with probability
/// true / stale, where "true" also looks at the centres chosen since the refresh. That is
/// rejection sampling, so each centre is still drawn with probability proportional to
/// its true squared distance, while the data is read `k / SEED_BATCH` times, not `k`.
fn plus_plus(data: &[f32], dim: usize, n: usize, k: usize, rng: &mut ChaCha8Rng) -> Vec<f32> {
    let row = |i: usize| &data[i * dim..(i + 1) * dim];
    let x_norms = sq_norms(data, dim);
    let (mut centroids, mut d2, mut sums) = first_centre(data, dim, n, k, rng);
    // Centres chosen since the last refresh start at this row of `centroids`.
    let mut fresh_from = 1;
    let mut rejections = 0;
    while centroids.len() < k * dim {
        let pending = &centroids[fresh_from * dim..];
        let total: f64 = sums.iter().sum();
        let stale_run = rejections >= 4 * SEED_BATCH;
        if pending.len() == SEED_BATCH * dim || (stale_run && !pending.is_empty()) {
            refresh(data, &x_norms, pending, dim, &mut d2);
            sums = d2.par_chunks(SEED_BLOCK).map(block_sum).collect();
            fresh_from = centroids.len() / dim;
            rejections = 0;
            continue;
        }
        if total <= 0.0 || stale_run {
            // Every point sits on a centre: any point will do.
            centroids.extend_from_slice(row(rng.gen_range(0..n)));
            rejections = 0;
            continue;
        }
        let i = draw(&d2, &sums, rng.gen::<f64>() * total);
        let stale = d2[i];
        let exact = pending
            .chunks_exact(dim)
            .map(|c| sq(row(i), c))
            .fold(stale, f32::min);
        let u: f32 = rng.gen();
        if u * stale < exact {
            centroids.extend_from_slice(row(i));
            rejections = 0;
        } else {
            // A tighter bound is still a bound: proposals stay exact.
            let b = i / SEED_BLOCK;
            sums[b] += exact as f64 - stale as f64;
            d2[i] = exact;
            rejections += 1;
        }
    }
    centroids
}

/// `d2[i] = min(d2[i], |x_i - c|²)` over the rows `c` of `centres`, by matrix products.
fn refresh(data: &[f32], x_norms: &[f32], centres: &[f32], dim: usize, d2: &mut [f32]) {
    let c_norms = sq_norms(centres, dim);
    let nc = c_norms.len();
    d2.par_chunks_mut(POINT_BLOCK)
        .enumerate()
        .for_each(|(b, d)| {
            let p0 = b * POINT_BLOCK;
            let np = d.len();
            let mut tile = vec![0f32; np * nc];
            dot_tile(&data[p0 * dim..(p0 + np) * dim], centres, dim, &mut tile);
            for (pi, (dv, row)) in d.iter_mut().zip(tile.chunks_exact(nc)).enumerate() {
                for (&cn, &dot) in c_norms.iter().zip(row) {
                    *dv = dv.min((x_norms[p0 + pi] + cn - 2.0 * dot).max(0.0));
                }
            }
        });
}

/// The point where the running sum of `d2` first reaches `target` (points at distance 0
/// are never drawn); `sums` holds the sums of the blocks of `SEED_BLOCK` points.
fn draw(d2: &[f32], sums: &[f64], mut target: f64) -> usize {
    for (b, &s) in sums.iter().enumerate() {
        if target > s && b + 1 < sums.len() {
            target -= s;
            continue;
        }
        let start = b * SEED_BLOCK;
        for (j, &v) in d2[start..(start + SEED_BLOCK).min(d2.len())]
            .iter()
            .enumerate()
        {
            if v > 0.0 {
                target -= v as f64;
                if target <= 0.0 {
                    return start + j;
                }
            }
        }
        // Rounding ran past this block: go on with the next ones.
    }
    d2.iter().rposition(|&v| v > 0.0).unwrap_or(0)
}

/// Lloyd's iterations from `centroids`, with Hamerly's bounds (Hamerly 2010) to skip
/// points whose nearest centroid cannot have changed: after the centroids move by at most
/// `δ`, a point at distance `u` from its own centroid and at least `l` from all others
/// keeps it when `u < l - δ`. Only the other points go through the matrix products. The
/// result is that of plain Lloyd's iterations (up to rounding), just cheaper once the
/// clustering settles.
fn lloyd(
    data: &[f32],
    dim: usize,
    n: usize,
    cfg: &KMeansConfig,
    mut centroids: Vec<f32>,
    tol: f64,
) -> KMeans {
    let k = cfg.k;
    let row = |i: usize| &data[i * dim..(i + 1) * dim];
    let x_norms = sq_norms(data, dim);
    let mut near = assign(data, &x_norms, &centroids, dim);
    for _ in 0..cfg.max_iter {
        let mut sums = vec![0f64; k * dim];
        let mut counts = vec![0usize; k];
        for (i, nb) in near.iter().enumerate() {
            let c = nb.centroid as usize;
            counts[c] += 1;
            for (s, v) in sums[c * dim..(c + 1) * dim].iter_mut().zip(row(i)) {
                *s += *v as f64;
            }
        }
        let mut new = vec![0f32; k * dim];
        // An empty cluster takes the point farthest from its current centroid.
        let mut far: Vec<usize> = (0..n).collect();
        far.sort_by(|&a, &b| near[b].d2.total_cmp(&near[a].d2).then(a.cmp(&b)));
        let mut far = far.into_iter();
        for c in 0..k {
            if counts[c] == 0 {
                let p = far.next().unwrap_or(0);
                new[c * dim..(c + 1) * dim].copy_from_slice(row(p));
            } else {
                for d in 0..dim {
                    new[c * dim + d] = (sums[c * dim + d] / counts[c] as f64) as f32;
                }
            }
        }
        let moves: Vec<f32> = new
            .chunks_exact(dim)
            .zip(centroids.chunks_exact(dim))
            .map(|(a, b)| sq(a, b))
            .collect();
        let shift: f64 = moves.iter().map(|&m| m as f64).sum();
        let max_move = moves.iter().fold(0f32, |m, &v| m.max(v)).sqrt();
        centroids = new;
        let stale: Vec<usize> = near
            .par_iter_mut()
            .enumerate()
            .filter_map(|(i, nb)| {
                let c = nb.centroid as usize;
                nb.d2 = sq(row(i), &centroids[c * dim..(c + 1) * dim]);
                let l = (nb.others.max(0.0).sqrt() - max_move).max(0.0);
                nb.others = l * l;
                (nb.d2 >= nb.others).then_some(i)
            })
            .collect();
        if !stale.is_empty() {
            let rows: Vec<f32> = stale.iter().flat_map(|&i| row(i).iter().copied()).collect();
            let norms: Vec<f32> = stale.iter().map(|&i| x_norms[i]).collect();
            for (&i, nb) in stale.iter().zip(assign(&rows, &norms, &centroids, dim)) {
                near[i] = nb;
            }
        }
        if shift <= tol {
            break;
        }
    }
    KMeans {
        inertia: near.iter().map(|nb| nb.d2 as f64).sum(),
        assignments: near.into_iter().map(|nb| nb.centroid).collect(),
        centroids,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blobs() -> (Vec<f32>, Vec<u32>) {
        let centres = [(0.0, 0.0), (10.0, 0.0), (0.0, 10.0), (10.0, 10.0)];
        let mut data = Vec::new();
        let mut truth = Vec::new();
        for (c, &(x, y)) in centres.iter().enumerate() {
            for i in 0..25 {
                let a = i as f32 * 0.7;
                data.extend_from_slice(&[x + a.sin(), y + a.cos()]);
                truth.push(c as u32);
            }
        }
        (data, truth)
    }

    #[test]
    fn recovers_separated_blobs() {
        let (data, truth) = blobs();
        let km = kmeans(
            &data,
            2,
            &KMeansConfig {
                k: 4,
                ..Default::default()
            },
        )
        .unwrap();
        let score =
            crate::nmi(&truth, &km.assignments, crate::NmiNormalization::Arithmetic).unwrap();
        assert!((score - 1.0).abs() < 1e-9, "nmi {score}");
        // inertia: every point at distance 1 from its centre (sin²+cos²), so about 100.
        assert!((km.inertia - 100.0).abs() < 1.0, "{}", km.inertia);
    }

    #[test]
    fn deterministic_for_a_seed() {
        let (data, _) = blobs();
        let cfg = KMeansConfig {
            k: 7,
            seed: 11,
            ..Default::default()
        };
        assert_eq!(
            kmeans(&data, 2, &cfg).unwrap(),
            kmeans(&data, 2, &cfg).unwrap()
        );
    }

    #[test]
    fn restarts_never_worse() {
        let (data, _) = blobs();
        let one = kmeans(
            &data,
            2,
            &KMeansConfig {
                k: 6,
                restarts: 1,
                ..Default::default()
            },
        )
        .unwrap();
        let many = kmeans(
            &data,
            2,
            &KMeansConfig {
                k: 6,
                restarts: 5,
                ..Default::default()
            },
        )
        .unwrap();
        assert!(many.inertia <= one.inertia);
    }

    #[test]
    fn seeding_draws_proportionally_to_squared_distance() {
        // Five points on a line, k = 3: the third centre is drawn while the second is
        // still "pending", which exercises the rejection step. Compare the frequency of
        // every (first, second, third) sequence with its exact k-means++ probability.
        let xs = [0.0f32, 1.0, 3.0, 7.0, 8.0];
        let n = xs.len();
        let mut expected = std::collections::HashMap::new();
        for a in 0..n {
            let d2a: Vec<f64> = xs.iter().map(|&x| ((x - xs[a]) as f64).powi(2)).collect();
            let ta: f64 = d2a.iter().sum();
            for b in 0..n {
                let pb = d2a[b] / ta;
                let d2b: Vec<f64> = xs
                    .iter()
                    .zip(&d2a)
                    .map(|(&x, &d)| d.min(((x - xs[b]) as f64).powi(2)))
                    .collect();
                let tb: f64 = d2b.iter().sum();
                for (c, &dc) in d2b.iter().enumerate() {
                    let p = pb * dc / tb.max(f64::MIN_POSITIVE) / n as f64;
                    if p > 0.0 {
                        *expected.entry((a, b, c)).or_insert(0.0) += p;
                    }
                }
            }
        }
        let runs = 40_000;
        let mut seen = std::collections::HashMap::new();
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        for _ in 0..runs {
            let c = plus_plus(&xs, 1, n, 3, &mut rng);
            let idx = |v: f32| xs.iter().position(|&x| x == v).unwrap();
            *seen
                .entry((idx(c[0]), idx(c[1]), idx(c[2])))
                .or_insert(0usize) += 1;
        }
        for key in seen.keys() {
            assert!(expected.contains_key(key), "impossible draw {key:?}");
        }
        for (key, &p) in &expected {
            let f = *seen.get(key).unwrap_or(&0) as f64 / runs as f64;
            let sd = (p * (1.0 - p) / runs as f64).sqrt();
            assert!((f - p).abs() < 5.0 * sd + 1e-4, "{key:?}: {f} vs {p}");
        }
    }

    #[test]
    fn greedy_seeding_is_the_plain_greedy_rule() {
        // The fused pass against a direct transcription of greedy k-means++: the same
        // draws (same generator, same block sums), every candidate's total summed point
        // by point in f64 from directly computed distances, the smallest kept. Blobs
        // in 16-d, over several blocks of points and with an odd tail.
        let (n, dim, k, trials) = (9_000, 16, 40, 6);
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let centres: Vec<f32> = (0..k * dim).map(|_| rng.gen_range(-4.0..4.0)).collect();
        let data: Vec<f32> = (0..n)
            .flat_map(|i| {
                let c = (i * 7) % k;
                let row: Vec<f32> = (0..dim)
                    .map(|d| centres[c * dim + d] + rng.gen_range(-1.0..1.0))
                    .collect();
                row
            })
            .collect();
        let row = |i: usize| &data[i * dim..(i + 1) * dim];
        let fast = greedy_plus_plus(&data, dim, n, k, trials, &mut ChaCha8Rng::seed_from_u64(2));

        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let (mut slow, mut d2, _) = first_centre(&data, dim, n, k, &mut rng);
        while slow.len() < k * dim {
            let sums: Vec<f64> = d2.chunks(SEED_BLOCK).map(block_sum).collect();
            let total: f64 = sums.iter().sum();
            let picks: Vec<usize> = (0..trials)
                .map(|_| draw(&d2, &sums, rng.gen::<f64>() * total))
                .collect();
            let pot =
                |p: usize| -> f64 { (0..n).map(|i| d2[i].min(sq(row(i), row(p))) as f64).sum() };
            let best = picks
                .iter()
                .copied()
                .min_by(|&a, &b| pot(a).total_cmp(&pot(b)))
                .unwrap();
            for (i, d) in d2.iter_mut().enumerate() {
                *d = d.min(sq(row(i), row(best)));
            }
            slow.extend_from_slice(row(best));
        }
        assert_eq!(fast, slow);
    }

    #[test]
    fn matches_plain_lloyd_on_many_clusters() {
        // Hamerly's bounds skip work, never change the result: compare with a direct
        // transcription of Lloyd's iterations from the same seeds.
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let (n, dim, k) = (600, 5, 40);
        let data: Vec<f32> = (0..n * dim).map(|_| rng.gen::<f32>()).collect();
        let cfg = KMeansConfig {
            k,
            restarts: 1,
            max_iter: 30,
            tol: 0.0,
            seed: 9,
            local_trials: 1,
        };
        let fast = kmeans(&data, dim, &cfg).unwrap();
        let row = |i: usize| &data[i * dim..(i + 1) * dim];
        let mut seed_rng = ChaCha8Rng::seed_from_u64(9);
        let mut cent = plus_plus(&data, dim, n, k, &mut seed_rng);
        let nearest = |cent: &[f32], i: usize| {
            (0..k)
                .map(|c| (sq(row(i), &cent[c * dim..(c + 1) * dim]), c))
                .fold((f32::INFINITY, 0), |b, x| if x.0 < b.0 { x } else { b })
                .1
        };
        let mut lab: Vec<usize> = (0..n).map(|i| nearest(&cent, i)).collect();
        for _ in 0..30 {
            let mut sums = vec![0f64; k * dim];
            let mut counts = vec![0usize; k];
            for i in 0..n {
                counts[lab[i]] += 1;
                for d in 0..dim {
                    sums[lab[i] * dim + d] += row(i)[d] as f64;
                }
            }
            assert!(
                counts.iter().all(|&c| c > 0),
                "pick a case without empty clusters"
            );
            let new: Vec<f32> = (0..k * dim)
                .map(|j| (sums[j] / counts[j / dim] as f64) as f32)
                .collect();
            let done = new == cent;
            cent = new;
            lab = (0..n).map(|i| nearest(&cent, i)).collect();
            if done {
                break;
            }
        }
        let slow: Vec<u32> = lab.iter().map(|&c| c as u32).collect();
        assert_eq!(fast.assignments, slow);
    }

    #[test]
    fn bad_settings() {
        let (data, _) = blobs();
        assert!(kmeans(
            &data,
            2,
            &KMeansConfig {
                k: 0,
                ..Default::default()
            }
        )
        .is_err());
        assert!(kmeans(
            &data,
            2,
            &KMeansConfig {
                k: 101,
                ..Default::default()
            }
        )
        .is_err());
        assert!(kmeans(
            &data,
            2,
            &KMeansConfig {
                restarts: 0,
                ..Default::default()
            }
        )
        .is_err());
        let km = kmeans(
            &[1.0, 1.0, 1.0],
            1,
            &KMeansConfig {
                k: 2,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(km.assignments.len(), 3);
    }
}
