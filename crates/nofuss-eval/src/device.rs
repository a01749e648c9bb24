//! Exact kNN on a candle device (feature `candle`; the GPU with feature `cuda`).
//!
//! The embeddings move to the device once. Each block of queries becomes one matrix
//! product against all points, combined with the squared norms into `|q|² + |x|² - 2 q·x`
//! in one pass (or `1 - cos`), and
//! [`nofuss_tensor::select::smallest_k`] picks every query's K nearest on the device,
//! leaving the query itself out, sorted by (distance, index): on CUDA one kernel per
//! block of queries, nothing but the `[block, K]` results materialised or copied back.
//!
//! Rounding differs from the CPU path ([`crate::knn`]) in the last bits of the distances
//! (a matrix product here, tiled sums there), so points at nearly equal distances may
//! swap places; at exactly equal distances both keep the lower index.

use candle_core::{Device, Tensor};
use nofuss_tensor::ops::squared_distances_from_parts;
use nofuss_tensor::select::{smallest_k, MAX_K};

use crate::knn::{Metric, Neighbors};
use crate::{EvalError, Result};

/// Elements of one query block's distance tile (`block x N`): 128 Mi floats, 512 MiB.
const TILE_ELEMENTS: usize = 1 << 27;

fn dev_err(e: candle_core::Error) -> EvalError {
    EvalError::Device(e.to_string())
}

/// Exact K nearest neighbours of every row of `embeddings` (`[N, dim]`) among the others,
/// computed on `device`. Same contract as [`crate::knn`]: the query is excluded, nearest
/// first, ties ordered by index (see the module notes on rounding).
///
/// K above [`MAX_K`] (4,096), and every search on the CPU device, run [`crate::knn`]
/// instead.
pub fn knn_on(
    device: &Device,
    embeddings: &[f32],
    dim: usize,
    k: usize,
    metric: Metric,
) -> Result<Neighbors> {
    if device.is_cpu() || k > MAX_K {
        return crate::knn(embeddings, dim, k, metric);
    }
    knn_blocks(device, embeddings, None, dim, k, metric, TILE_ELEMENTS)
}

/// Exact K nearest gallery rows of every query, computed on `device`. Same contract as
/// [`crate::knn_between`] (nothing excluded, nearest first, ties by gallery index; see
/// the module notes on rounding).
///
/// K above [`MAX_K`] (4,096), and every search on the CPU device, run
/// [`crate::knn_between`] instead.
pub fn knn_between_on(
    device: &Device,
    queries: &[f32],
    gallery: &[f32],
    dim: usize,
    k: usize,
    metric: Metric,
) -> Result<Neighbors> {
    if device.is_cpu() || k > MAX_K {
        return crate::knn_between(queries, gallery, dim, k, metric);
    }
    knn_blocks(
        device,
        gallery,
        Some(queries),
        dim,
        k,
        metric,
        TILE_ELEMENTS,
    )
}

/// [`knn_on`] (no `queries`: every point against the others) or [`knn_between_on`]
/// (`queries` against `points`), in query blocks of about `tile / N` rows, on any
/// device (the tests run it on the CPU with small tiles).
fn knn_blocks(
    device: &Device,
    points: &[f32],
    queries: Option<&[f32]>,
    dim: usize,
    k: usize,
    metric: Metric,
    tile: usize,
) -> Result<Neighbors> {
    let (nq_all, n) = match queries {
        None => {
            let n = crate::knn::check_knn(points, dim, k)?;
            (n, n)
        }
        Some(q) => crate::knn::check_knn_between(q, points, dim, k)?,
    };
    if k > MAX_K {
        return Err(EvalError::Config(format!(
            "K = {k} is above the device search's {MAX_K}"
        )));
    }
    let block = (tile / n).clamp(1, nq_all.max(1));
    let mut indices = Vec::with_capacity(nq_all * k);
    let mut distances = Vec::with_capacity(nq_all * k);
    let gallery = Gallery::new(device, points, n, dim, metric).map_err(dev_err)?;
    let asked = match queries {
        Some(q) => Some(Rows::new(device, q, nq_all, dim, metric).map_err(dev_err)?),
        None => None,
    };
    for q0 in (0..nq_all).step_by(block) {
        let nq = block.min(nq_all - q0);
        let (vals, ids) = match &asked {
            // Row r is query q0 + r: its own column is left out.
            None => gallery.block(&gallery.rows, q0, nq, k, Some(q0)),
            Some(q) => gallery.block(q, q0, nq, k, None),
        }
        .map_err(dev_err)?;
        distances.extend(
            vals.flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(dev_err)?,
        );
        indices.extend(
            ids.flatten_all()
                .and_then(|t| t.to_vec1::<u32>())
                .map_err(dev_err)?,
        );
    }
    Ok(Neighbors {
        k,
        indices,
        distances,
    })
}

/// Rows on the device as the metric compares them.
struct Rows {
    /// `[N, dim]` (L2-normalised rows for cosine).
    x: Tensor,
    /// `[N]` squared norms.
    norms: Tensor,
}

impl Rows {
    fn new(
        device: &Device,
        embeddings: &[f32],
        n: usize,
        dim: usize,
        metric: Metric,
    ) -> candle_core::Result<Self> {
        let mut x = Tensor::from_slice(embeddings, (n, dim), device)?;
        if metric == Metric::Cosine {
            let norm = x.sqr()?.sum_keepdim(1)?.sqrt()?;
            // A zero row stays zero, as on the CPU.
            let safe = norm.gt(0.0)?.where_cond(&norm, &norm.ones_like()?)?;
            x = x.broadcast_div(&safe)?;
        }
        Ok(Self {
            norms: x.sqr()?.sum(1)?,
            x,
        })
    }
}

/// The rows searched, ready for blocks of queries.
struct Gallery {
    rows: Rows,
    /// `[dim, N]`: the rows transposed for the matrix products.
    xt: Tensor,
    metric: Metric,
}

impl Gallery {
    fn new(
        device: &Device,
        embeddings: &[f32],
        n: usize,
        dim: usize,
        metric: Metric,
    ) -> candle_core::Result<Self> {
        let rows = Rows::new(device, embeddings, n, dim, metric)?;
        Ok(Self {
            xt: rows.x.t()?.contiguous()?,
            rows,
            metric,
        })
    }

    /// The `k` nearest gallery rows of rows `q0..q0 + nq` of `queries`, sorted:
    /// distances and indices, each `[nq, k]`; `skip` is the column of the block's first
    /// row left out (row r leaves out column `skip + r`).
    fn block(
        &self,
        queries: &Rows,
        q0: usize,
        nq: usize,
        k: usize,
        skip: Option<usize>,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let dots = queries.x.narrow(0, q0, nq)?.matmul(&self.xt)?; // [nq, N]
        let dist = match self.metric {
            // One fused pass over the tile: `max((|q|² + |x|²) - 2 q·x, 0)`.
            Metric::Euclidean => squared_distances_from_parts(
                &dots,
                &queries.norms.narrow(0, q0, nq)?,
                &self.rows.norms,
            )?,
            Metric::Cosine => dots.affine(-1.0, 1.0)?,
        };
        smallest_k(&dist, k, skip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn data(n: usize, dim: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n * dim).map(|_| rng.gen_range(-1.0f32..1.0)).collect()
    }

    #[test]
    fn agrees_with_the_cpu_search_across_query_blocks() {
        // Small tiles so the search runs many query blocks, a short last one included.
        let (n, dim, tile) = (700, 6, 64 * 700 + 5);
        let emb = data(n, dim, 1);
        for (k, metric) in [
            (1, Metric::Euclidean),
            (5, Metric::Euclidean),
            (32, Metric::Cosine),
            (29, Metric::Euclidean),
        ] {
            let cpu = crate::knn(&emb, dim, k, metric).unwrap();
            let dev = knn_blocks(&Device::Cpu, &emb, None, dim, k, metric, tile).unwrap();
            let mut mismatches = 0;
            for (pos, (a, b)) in dev.indices.iter().zip(&cpu.indices).enumerate() {
                let (da, db) = (dev.distances[pos], cpu.distances[pos]);
                assert!(
                    (da - db).abs() < 1e-5,
                    "{metric:?} k {k} at {pos}: {da} vs {db}"
                );
                // Another index only where rounding reorders near-equal distances.
                if a != b {
                    mismatches += 1;
                }
            }
            assert!(
                mismatches <= n * k / 1000,
                "{metric:?} k {k}: {mismatches} differ"
            );
        }
        assert!(knn_blocks(
            &Device::Cpu,
            &emb,
            None,
            dim,
            MAX_K + 1,
            Metric::Euclidean,
            tile
        )
        .is_err());
    }

    #[test]
    fn between_agrees_with_the_cpu_search_across_query_blocks() {
        let (nq, n, dim, tile) = (230, 700, 6, 64 * 700 + 5);
        let (queries, gallery) = (data(nq, dim, 2), data(n, dim, 3));
        for (k, metric) in [
            (1, Metric::Euclidean),
            (17, Metric::Cosine),
            (700, Metric::Euclidean),
        ] {
            let cpu = crate::knn_between(&queries, &gallery, dim, k, metric).unwrap();
            let dev =
                knn_blocks(&Device::Cpu, &gallery, Some(&queries), dim, k, metric, tile).unwrap();
            assert_eq!(dev.indices.len(), nq * k);
            let mut mismatches = 0;
            for (pos, (a, b)) in dev.indices.iter().zip(&cpu.indices).enumerate() {
                let (da, db) = (dev.distances[pos], cpu.distances[pos]);
                assert!(
                    (da - db).abs() < 1e-5,
                    "{metric:?} k {k} at {pos}: {da} vs {db}"
                );
                mismatches += usize::from(a != b);
            }
            assert!(
                mismatches <= nq * k / 1000,
                "{metric:?} k {k}: {mismatches} differ"
            );
        }
        assert!(matches!(
            knn_blocks(
                &Device::Cpu,
                &gallery,
                Some(&queries),
                dim,
                n + 1,
                Metric::Euclidean,
                tile
            ),
            Err(EvalError::GalleryTooSmall { .. })
        ));
        let cpu_device =
            knn_between_on(&Device::Cpu, &queries, &gallery, dim, 3, Metric::Euclidean);
        assert_eq!(
            cpu_device.unwrap(),
            crate::knn_between(&queries, &gallery, dim, 3, Metric::Euclidean).unwrap()
        );
    }

    #[test]
    fn small_cases_and_errors() {
        let emb = [0.0f32, 1.0, 3.0, 7.0];
        let nb = knn_blocks(&Device::Cpu, &emb, None, 1, 2, Metric::Euclidean, 4).unwrap();
        assert_eq!(nb.indices, vec![1, 2, 0, 2, 1, 0, 2, 1]);
        assert_eq!(nb.distances[..2], [1.0, 9.0]);
        assert!(matches!(
            knn_blocks(&Device::Cpu, &emb, None, 1, 4, Metric::Euclidean, 8),
            Err(EvalError::KTooLarge { k: 4, n: 4 })
        ));
        assert!(matches!(
            knn_blocks(
                &Device::Cpu,
                &[0.0, f32::NAN],
                None,
                1,
                1,
                Metric::Euclidean,
                4
            ),
            Err(EvalError::NonFinite { row: 1 })
        ));
    }
}
