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
}

impl Default for KMeansConfig {
    fn default() -> Self {
        Self {
            k: 8,
            restarts: 3,
            max_iter: 100,
            tol: 1e-4,
            seed: 0,
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
            plus_plus(data, dim, n, cfg.k, &mut rng),
            cfg.tol * mean_var,
        );
        if best.as_ref().is_none_or(|b| run.inertia < b.inertia) {
            best = Some(run);
        }
    }
    best.ok_or_else(|| EvalError::Config("no k-means run".into()))
}

fn sq(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

/// k-means++ seeding (Arthur & Vassilvitskii 2007): each next centre drawn with
/// probability proportional to the squared distance to the nearest centre so far.
fn plus_plus(data: &[f32], dim: usize, n: usize, k: usize, rng: &mut ChaCha8Rng) -> Vec<f32> {
    let row = |i: usize| &data[i * dim..(i + 1) * dim];
    let mut centroids = Vec::with_capacity(k * dim);
    centroids.extend_from_slice(row(rng.gen_range(0..n)));
    let mut d2: Vec<f32> = (0..n)
        .into_par_iter()
        .map(|i| sq(row(i), &centroids[..dim]))
        .collect();
    for _ in 1..k {
        let total: f64 = d2.iter().map(|&v| v as f64).sum();
        let pick = if total > 0.0 {
            let mut target = rng.gen::<f64>() * total;
            let mut chosen = n - 1;
            for (i, &v) in d2.iter().enumerate() {
                target -= v as f64;
                if target <= 0.0 && v > 0.0 {
                    chosen = i;
                    break;
                }
            }
            chosen
        } else {
            rng.gen_range(0..n)
        };
        let c = row(pick).to_vec();
        d2.par_iter_mut()
            .enumerate()
            .for_each(|(i, v)| *v = v.min(sq(row(i), &c)));
        centroids.extend_from_slice(&c);
    }
    centroids
}

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
    let assign = |centroids: &[f32]| -> Vec<(u32, f32)> {
        (0..n)
            .into_par_iter()
            .map(|i| {
                let mut best = (0u32, f32::INFINITY);
                for (c, cv) in centroids.chunks_exact(dim).enumerate() {
                    let d = sq(row(i), cv);
                    if d < best.1 {
                        best = (c as u32, d);
                    }
                }
                best
            })
            .collect()
    };
    let mut labels = assign(&centroids);
    for _ in 0..cfg.max_iter {
        let mut sums = vec![0f64; k * dim];
        let mut counts = vec![0usize; k];
        for (i, &(c, _)) in labels.iter().enumerate() {
            counts[c as usize] += 1;
            for (s, v) in sums[c as usize * dim..(c as usize + 1) * dim]
                .iter_mut()
                .zip(row(i))
            {
                *s += *v as f64;
            }
        }
        let mut new = vec![0f32; k * dim];
        // An empty cluster takes the point farthest from its current centroid.
        let mut far: Vec<usize> = (0..n).collect();
        far.sort_by(|&a, &b| labels[b].1.total_cmp(&labels[a].1).then(a.cmp(&b)));
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
        let shift: f64 = new
            .iter()
            .zip(&centroids)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum();
        centroids = new;
        labels = assign(&centroids);
        if shift <= tol {
            break;
        }
    }
    KMeans {
        inertia: labels.iter().map(|&(_, d)| d as f64).sum(),
        assignments: labels.into_iter().map(|(c, _)| c).collect(),
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
