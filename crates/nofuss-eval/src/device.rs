//! Exact kNN on a candle device (feature `candle`; the GPU with feature `cuda`).
//!
//! The embeddings move to the device once. Each block of queries becomes one matrix
//! product against all points, `|q|² + |x|² - 2 q·x`, the query's own column is set to
//! +inf, and the K smallest distances are selected on the device by sorting chunks of at
//! most [`SORT_CHUNK`] columns, keeping each chunk's best K and repeating on the survivors
//! until one chunk is left. Only the `[block, K]` results come back to the host.
//!
//! Rounding differs from the CPU path ([`crate::knn`]) in the last bits of the distances,
//! and the device sort is not stable: the final K of every query are re-sorted on the
//! host by (distance, index), so the order is deterministic, but at exactly tied
//! distances across the K-th place another equally near point may be kept.

use candle_core::{DType, Device, Tensor, D};

use crate::knn::{Metric, Neighbors};
use crate::{check_embeddings, EvalError, Result};

/// Columns sorted at once on the device. candle's CUDA arg-sort keeps a row's indices in
/// shared memory (4 bytes each, rounded up to a power of two), so this stays well under
/// the 48 KiB every CUDA device offers.
pub const SORT_CHUNK: usize = 4096;

/// Elements of one query block's distance tile (`block x N`): 128 Mi floats, 512 MiB.
const TILE_ELEMENTS: usize = 1 << 27;

fn dev_err(e: candle_core::Error) -> EvalError {
    EvalError::Device(e.to_string())
}

/// Exact K nearest neighbours of every row of `embeddings` (`[N, dim]`) among the others,
/// computed on `device`. Same contract as [`crate::knn`]: the query is excluded, nearest
/// first, ties ordered by index (see the module notes on ties at the K-th place).
///
/// K above `SORT_CHUNK / 2` (2,048) cannot shrink the candidates chunk by chunk; such
/// searches, and every search on the CPU device, run [`crate::knn`] instead.
pub fn knn_on(
    device: &Device,
    embeddings: &[f32],
    dim: usize,
    k: usize,
    metric: Metric,
) -> Result<Neighbors> {
    if device.is_cpu() || 2 * k > SORT_CHUNK {
        return crate::knn(embeddings, dim, k, metric);
    }
    knn_chunked(device, embeddings, dim, k, metric, SORT_CHUNK)
}

/// [`knn_on`] with the selection sorting `chunk` columns at a time (`2 k <= chunk`).
fn knn_chunked(
    device: &Device,
    embeddings: &[f32],
    dim: usize,
    k: usize,
    metric: Metric,
    chunk: usize,
) -> Result<Neighbors> {
    let n = check_embeddings(embeddings, dim, None)?;
    if k == 0 {
        return Err(EvalError::Config("K must be at least 1".into()));
    }
    if k >= n {
        return Err(EvalError::KTooLarge { k, n });
    }
    let block = (TILE_ELEMENTS / n).clamp(1, n);
    let mut indices = Vec::with_capacity(n * k);
    let mut distances = Vec::with_capacity(n * k);
    let prepared = Prepared::new(device, embeddings, n, dim, metric).map_err(dev_err)?;
    for q0 in (0..n).step_by(block) {
        let nq = block.min(n - q0);
        let (vals, ids) = prepared.block(q0, nq, k, chunk).map_err(dev_err)?;
        let vals: Vec<Vec<f32>> = vals.to_vec2().map_err(dev_err)?;
        let ids: Vec<Vec<u32>> = ids.to_vec2().map_err(dev_err)?;
        for (v, i) in vals.into_iter().zip(ids) {
            let mut pairs: Vec<(f32, u32)> = v.into_iter().zip(i).collect();
            pairs.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            for (d, j) in pairs {
                distances.push(d);
                indices.push(j);
            }
        }
    }
    Ok(Neighbors {
        k,
        indices,
        distances,
    })
}

/// The points on the device, ready for blocks of queries.
struct Prepared {
    /// `[N, dim]` (L2-normalised rows for cosine).
    x: Tensor,
    /// `[dim, N]`.
    xt: Tensor,
    /// `[N]` squared norms.
    norms: Tensor,
    /// `[N]` point indices.
    cols: Tensor,
    metric: Metric,
}

impl Prepared {
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
            xt: x.t()?.contiguous()?,
            cols: Tensor::arange(0u32, n as u32, device)?,
            x,
            metric,
        })
    }

    /// The `k` nearest (unordered) of queries `q0..q0 + nq`: distances and indices,
    /// each `[nq, k]`.
    fn block(
        &self,
        q0: usize,
        nq: usize,
        k: usize,
        chunk: usize,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let n = self.cols.dim(0)?;
        let device = self.x.device();
        let dots = self.x.narrow(0, q0, nq)?.matmul(&self.xt)?; // [nq, N]
        let dist = match self.metric {
            Metric::Euclidean => dots
                .affine(-2.0, 0.0)?
                .broadcast_add(&self.norms.narrow(0, q0, nq)?.unsqueeze(1)?)?
                .broadcast_add(&self.norms.unsqueeze(0)?)?
                .relu()?,
            Metric::Cosine => dots.affine(-1.0, 1.0)?,
        };
        let rows = Tensor::arange(q0 as u32, (q0 + nq) as u32, device)?.unsqueeze(1)?;
        let own = self.cols.unsqueeze(0)?.broadcast_eq(&rows)?;
        let inf = Tensor::full(f32::INFINITY, (nq, n), device)?;
        let dist = own.where_cond(&inf, &dist)?;
        let ids = self
            .cols
            .unsqueeze(0)?
            .broadcast_as((nq, n))?
            .contiguous()?;
        smallest_k(dist, ids, k, chunk)
    }
}

/// The `k` smallest values of every row of `vals` (`[rows, cols]`) with the matching
/// entries of `ids`, by sorting chunks of `chunk` columns and keeping each chunk's best
/// `k` until at most one chunk is left (each round at least halves the columns, as
/// `2 k <= chunk`). Unordered ties.
fn smallest_k(
    mut vals: Tensor,
    mut ids: Tensor,
    k: usize,
    chunk: usize,
) -> candle_core::Result<(Tensor, Tensor)> {
    if 2 * k > chunk {
        candle_core::bail!("k = {k} needs sort chunks of at least {}", 2 * k);
    }
    let rows = vals.dim(0)?;
    loop {
        let cols = vals.dim(1)?;
        if cols <= chunk {
            let order = vals
                .arg_sort_last_dim(true)?
                .narrow(1, 0, k)?
                .contiguous()?;
            return Ok((vals.gather(&order, 1)?, ids.gather(&order, 1)?));
        }
        let chunks = cols.div_ceil(chunk);
        let pad = chunks * chunk - cols;
        if pad > 0 {
            let inf = Tensor::full(f32::INFINITY, (rows, pad), vals.device())?;
            let zero = Tensor::zeros((rows, pad), DType::U32, ids.device())?;
            vals = Tensor::cat(&[&vals, &inf], 1)?;
            ids = Tensor::cat(&[&ids, &zero], 1)?;
        }
        let v = vals.reshape((rows, chunks, chunk))?;
        let i = ids.reshape((rows, chunks, chunk))?;
        let keep = k;
        let order = v
            .arg_sort_last_dim(true)?
            .narrow(D::Minus1, 0, keep)?
            .contiguous()?;
        vals = v
            .gather(&order, D::Minus1)?
            .reshape((rows, chunks * keep))?;
        ids = i
            .gather(&order, D::Minus1)?
            .reshape((rows, chunks * keep))?;
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
    fn agrees_with_the_cpu_search_across_sort_chunks() {
        // Small sort chunks so the selection runs several rounds, padding included.
        let (n, dim, chunk) = (700, 6, 64);
        let emb = data(n, dim, 1);
        for (k, metric) in [
            (1, Metric::Euclidean),
            (5, Metric::Euclidean),
            (32, Metric::Cosine),
            (29, Metric::Euclidean),
        ] {
            let cpu = crate::knn(&emb, dim, k, metric).unwrap();
            let dev = knn_chunked(&Device::Cpu, &emb, dim, k, metric, chunk).unwrap();
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
        assert!(knn_chunked(&Device::Cpu, &emb, dim, 33, Metric::Euclidean, chunk).is_err());
    }

    #[test]
    fn small_cases_and_errors() {
        let emb = [0.0f32, 1.0, 3.0, 7.0];
        let nb = knn_chunked(&Device::Cpu, &emb, 1, 2, Metric::Euclidean, 4).unwrap();
        assert_eq!(nb.indices, vec![1, 2, 0, 2, 1, 0, 2, 1]);
        assert_eq!(nb.distances[..2], [1.0, 9.0]);
        assert!(matches!(
            knn_chunked(&Device::Cpu, &emb, 1, 4, Metric::Euclidean, 8),
            Err(EvalError::KTooLarge { k: 4, n: 4 })
        ));
        assert!(matches!(
            knn_chunked(&Device::Cpu, &[0.0, f32::NAN], 1, 1, Metric::Euclidean, 4),
            Err(EvalError::NonFinite { row: 1 })
        ));
    }
}
