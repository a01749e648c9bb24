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

/// Exact K nearest neighbours of every row of `embeddings` (`[N, dim]`) among the others.
///
/// Works tile by tile: a block of queries times a tile of the database is one matrix
/// product (the `gemm` crate), distances follow as `|q|² + |x|² - 2 q·x`, and each query
/// keeps its best K (a buffer of up to 4K cut back by selection, a distance bound
/// skipping most of each tile). Memory is `O(N·K)` plus, per thread, one tile and its
/// block's buffers (8 MB at K = 1,000); the `N×N` matrix never exists. Query blocks run
/// in parallel (rayon).
///
/// Ties are broken deterministically: among equal distances the lower index comes first.
/// A point never counts as its own neighbour, but an exact duplicate of it does.
pub fn knn(embeddings: &[f32], dim: usize, k: usize, metric: Metric) -> Result<Neighbors> {
    check_knn(embeddings, dim, k)?;
    let data = for_metric(embeddings, dim, metric);
    let norms = sq_norms(&data, dim);
    Ok(search(
        Side {
            data: &data,
            norms: &norms,
        },
        Side {
            data: &data,
            norms: &norms,
        },
        dim,
        k,
        metric,
        true,
    ))
}

/// Exact K nearest rows of `gallery` (`[G, dim]`) for every row of `queries`
/// (`[Q, dim]`), nearest first; the indices are gallery rows.
///
/// The query/gallery protocol of retrieval benchmarks such as In-Shop Clothes (Liu et al.
/// 2016), and the search of one's own collection: the two sets are apart, so nothing is
/// excluded (a query that is also in the gallery finds itself at distance 0). Same
/// tiles, top-K and tie rule (lower gallery index first) as [`knn`].
pub fn knn_between(
    queries: &[f32],
    gallery: &[f32],
    dim: usize,
    k: usize,
    metric: Metric,
) -> Result<Neighbors> {
    check_knn_between(queries, gallery, dim, k)?;
    let (q, x) = (
        for_metric(queries, dim, metric),
        for_metric(gallery, dim, metric),
    );
    let (qn, xn) = (sq_norms(&q, dim), sq_norms(&x, dim));
    Ok(search(
        Side {
            data: &q,
            norms: &qn,
        },
        Side {
            data: &x,
            norms: &xn,
        },
        dim,
        k,
        metric,
        false,
    ))
}

/// The arguments of [`knn`] (and the device search's): the rows' shape and values, and
/// `1 <= K < N` (the query is excluded). Returns N.
pub(crate) fn check_knn(embeddings: &[f32], dim: usize, k: usize) -> Result<usize> {
    let n = check_embeddings(embeddings, dim, None)?;
    check_k(k)?;
    if k >= n {
        return Err(EvalError::KTooLarge { k, n });
    }
    Ok(n)
}

/// The arguments of [`knn_between`] (and the device search's): at least one query, the
/// two sets' shapes and values (errors about the gallery say so), and `1 <= K <= G`.
/// Returns the numbers of queries and gallery rows.
pub(crate) fn check_knn_between(
    queries: &[f32],
    gallery: &[f32],
    dim: usize,
    k: usize,
) -> Result<(usize, usize)> {
    let nq = check_queries(queries, dim, None)?;
    let g = check_gallery(gallery, dim, None)?;
    check_k(k)?;
    if k > g {
        return Err(EvalError::GalleryTooSmall { k, n: g });
    }
    Ok((nq, g))
}

/// K must be at least 1.
fn check_k(k: usize) -> Result<()> {
    if k == 0 {
        return Err(EvalError::Config("K must be at least 1".into()));
    }
    Ok(())
}

/// The queries' shape, values and, if given, number of labels; their rows counted (at
/// least one).
pub(crate) fn check_queries(queries: &[f32], dim: usize, labels: Option<usize>) -> Result<usize> {
    match check_embeddings(queries, dim, labels)? {
        0 => Err(EvalError::Shape("no query embeddings".into())),
        n => Ok(n),
    }
}

/// The gallery's shape, values and, if given, number of labels, its rows counted; errors
/// name the gallery.
pub(crate) fn check_gallery(gallery: &[f32], dim: usize, labels: Option<usize>) -> Result<usize> {
    check_embeddings(gallery, dim, labels).map_err(|e| match e {
        EvalError::NonFinite { row } => EvalError::NonFiniteGallery { row },
        EvalError::Shape(m) => EvalError::Shape(format!("gallery: {m}")),
        e => e,
    })
}

/// The rows as the metric compares them: as given for Euclidean, L2-normalised for
/// cosine (a zero row stays zero).
fn for_metric(embeddings: &[f32], dim: usize, metric: Metric) -> std::borrow::Cow<'_, [f32]> {
    match metric {
        Metric::Euclidean => embeddings.into(),
        Metric::Cosine => embeddings
            .chunks_exact(dim)
            .flat_map(|r| {
                let norm = r.iter().map(|v| v * v).sum::<f32>().sqrt();
                let s = if norm > 0.0 { 1.0 / norm } else { 0.0 };
                r.iter().map(move |v| v * s)
            })
            .collect::<Vec<f32>>()
            .into(),
    }
}

/// Rows (`[N, dim]`) and their squared norms.
#[derive(Clone, Copy)]
struct Side<'a> {
    data: &'a [f32],
    norms: &'a [f32],
}

const QUERY_BLOCK: usize = 256;
const DB_TILE: usize = 1024;

/// The search of [`knn`] (`exclude_self`: query `q` is gallery row `q` and is left out)
/// and [`knn_between`]: one copy of the loop for both.
#[inline(never)]
fn search(
    queries: Side<'_>,
    gallery: Side<'_>,
    dim: usize,
    k: usize,
    metric: Metric,
    exclude_self: bool,
) -> Neighbors {
    let (nq_all, n) = (queries.norms.len(), gallery.norms.len());
    let mut indices = vec![0u32; nq_all * k];
    let mut distances = vec![0f32; nq_all * k];
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
                    &queries.data[q0 * dim..(q0 + nq) * dim],
                    &gallery.data[t0 * dim..(t0 + nt) * dim],
                    dim,
                    &mut tile[..nq * nt],
                );
                for (qi, top) in tops.iter_mut().enumerate() {
                    let q = q0 + qi;
                    let skip = if exclude_self { q } else { usize::MAX };
                    let row = &tile[qi * nt..(qi + 1) * nt];
                    let norms = &gallery.norms[t0..t0 + nt];
                    match metric {
                        Metric::Euclidean => {
                            let qn = queries.norms[q];
                            scan_row(top, row, norms, t0, skip, Squared(qn))
                        }
                        Metric::Cosine => scan_row(top, row, norms, t0, skip, OneMinus),
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
    Neighbors {
        k,
        indices,
        distances,
    }
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

/// Recall@K with queries and gallery apart: the fraction of queries with at least one
/// gallery row of their class among their K nearest gallery rows ([`knn_between`]), the
/// In-Shop protocol. Returns `(K, recall)` in the order of `ks`.
pub fn recall_at_k_between(
    queries: &[f32],
    query_labels: &[u32],
    gallery: &[f32],
    gallery_labels: &[u32],
    dim: usize,
    ks: &[usize],
    metric: Metric,
) -> Result<Vec<(usize, f64)>> {
    let cfg = crate::EvalConfig {
        ks: ks.to_vec(),
        metric,
        nmi: false,
        map_at_r: false,
        kmeans: Default::default(),
    };
    Ok(crate::evaluate_between(queries, query_labels, gallery, gallery_labels, dim, &cfg)?.recall)
}

/// Recall@K from precomputed neighbours (each `K <= neighbors.k`).
pub fn recall_from_neighbors(
    nb: &Neighbors,
    labels: &[u32],
    ks: &[usize],
) -> Result<Vec<(usize, f64)>> {
    recall_from_gallery_neighbors(nb, labels, labels, ks)
}

/// Recall@K from precomputed neighbours of queries among a gallery ([`knn_between`]):
/// `query_labels` one per query, `gallery_labels` indexed by the neighbours.
pub fn recall_from_gallery_neighbors(
    nb: &Neighbors,
    query_labels: &[u32],
    gallery_labels: &[u32],
    ks: &[usize],
) -> Result<Vec<(usize, f64)>> {
    let n = query_labels.len();
    if n == 0 {
        return Err(EvalError::Shape("Recall@K of no queries".into()));
    }
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
            for (rank, &j) in nb.of(i).iter().enumerate() {
                match gallery_labels.get(j as usize) {
                    Some(&l) if l == query_labels[i] => return Ok(rank),
                    Some(_) => {}
                    None => {
                        return Err(EvalError::Shape(format!(
                            "neighbour {j} of query {i} is outside the {} gallery labels",
                            gallery_labels.len()
                        )))
                    }
                }
            }
            Ok(nb.k)
        })
        .collect::<Result<_>>()?;
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

/// Lanes of [`scan_row`]'s chunks.
const LANES: usize = 16;

/// A distance from a product `d` with a gallery row and that row's squared norm `n`.
trait Distance: Copy {
    fn one(self, d: f32, n: f32) -> f32;

    /// [`Distance::one`] on four lanes, the same operations (so the same values).
    #[cfg(target_arch = "x86_64")]
    fn four(
        self,
        d: std::arch::x86_64::__m128,
        n: std::arch::x86_64::__m128,
    ) -> std::arch::x86_64::__m128;
}

/// Squared Euclidean: `max(|q|² + n - 2d, 0)`, with `|q|²` the query's squared norm.
#[derive(Clone, Copy)]
struct Squared(f32);

impl Distance for Squared {
    #[inline(always)]
    fn one(self, d: f32, n: f32) -> f32 {
        (self.0 + n - 2.0 * d).max(0.0)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn four(
        self,
        d: std::arch::x86_64::__m128,
        n: std::arch::x86_64::__m128,
    ) -> std::arch::x86_64::__m128 {
        use std::arch::x86_64::*;
        // SAFETY: SSE2 is part of x86-64 itself. 2d as d + d: exact, as the product by 2.
        unsafe {
            let v = _mm_sub_ps(_mm_add_ps(_mm_set1_ps(self.0), n), _mm_add_ps(d, d));
            _mm_max_ps(v, _mm_setzero_ps())
        }
    }
}

/// Cosine on normalised rows: `1 - d`.
#[derive(Clone, Copy)]
struct OneMinus;

impl Distance for OneMinus {
    #[inline(always)]
    fn one(self, d: f32, _: f32) -> f32 {
        1.0 - d
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn four(
        self,
        d: std::arch::x86_64::__m128,
        _: std::arch::x86_64::__m128,
    ) -> std::arch::x86_64::__m128 {
        use std::arch::x86_64::*;
        // SAFETY: SSE2 is part of x86-64 itself.
        unsafe { _mm_sub_ps(_mm_set1_ps(1.0), d) }
    }
}

/// A chunk's distances into `out` and the mask of those below `bound` (bit `l` for lane
/// `l`): on x86-64 in SSE2 (always there), four lanes per instruction and one `movmskps`
/// per four, since the compiler's own vectorisation of the plain loop went through the
/// stack in pieces that the processor could not forward.
#[inline(always)]
fn chunk_below(
    dist: impl Distance,
    dc: &[f32],
    nc: &[f32],
    bound: f32,
    out: &mut [f32; LANES],
) -> u32 {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::*;
        assert!(dc.len() == LANES && nc.len() == LANES);
        let mut mask = 0u32;
        for q in 0..LANES / 4 {
            // SAFETY: SSE2 is part of x86-64 itself; the three slices hold LANES values
            // (checked above for `dc` and `nc`).
            unsafe {
                let b = _mm_set1_ps(bound);
                let v = dist.four(
                    _mm_loadu_ps(dc.as_ptr().add(4 * q)),
                    _mm_loadu_ps(nc.as_ptr().add(4 * q)),
                );
                _mm_storeu_ps(out.as_mut_ptr().add(4 * q), v);
                mask |= (_mm_movemask_ps(_mm_cmplt_ps(v, b)) as u32) << (4 * q);
            }
        }
        mask
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        for l in 0..LANES {
            out[l] = dist.one(dc[l], nc[l]);
        }
        out.iter()
            .enumerate()
            .fold(0u32, |m, (l, &v)| m | (u32::from(v < bound) << l))
    }
}

/// Offers one query's distances to a tile (`dist` of each product in
/// `row`, gallery rows from `t0`) to its top-K, leaving out row `skip`. In chunks of
/// [`LANES`]: the chunk's distances and whether any is below the bound are computed
/// without a branch (vectorised) as a bit mask, and only the lanes set in it are offered
/// to the top-K. At SOP scale (K = 1,000) about a sixth of a query's 60,502 distances are
/// below the bound when seen, three in a chunk that has any: visiting all 16 of its lanes
/// with a branch on the bound mispredicted often (the mask made the search 1.26x faster).
#[inline(always)]
fn scan_row(
    top: &mut TopK,
    row: &[f32],
    norms: &[f32],
    t0: usize,
    skip: usize,
    dist: impl Distance,
) {
    let (rows, norm_chunks) = (row.chunks_exact(LANES), norms.chunks_exact(LANES));
    let (row_tail, norm_tail) = (rows.remainder(), norm_chunks.remainder());
    let mut d = [0f32; LANES];
    for (c, (dc, nc)) in rows.zip(norm_chunks).enumerate() {
        let mut below = chunk_below(dist, dc, nc, top.worst, &mut d);
        // Only the lanes below the bound, lowest first (a cut on the way may tighten
        // the bound for the rest, which `push` checks).
        let j0 = t0 + c * LANES;
        while below != 0 {
            let l = below.trailing_zeros() as usize;
            below &= below - 1;
            if j0 + l != skip {
                top.push(d[l], (j0 + l) as u32);
            }
        }
    }
    let j0 = t0 + row.len() - row_tail.len();
    for (l, (&dd, &n)) in row_tail.iter().zip(norm_tail).enumerate() {
        if j0 + l != skip {
            top.push(dist.one(dd, n), (j0 + l) as u32);
        }
    }
}

/// A candidate as one integer key ordered by (distance, index): the distance's bits
/// mapped so that unsigned order is `f32::total_cmp`'s, above the index. One integer
/// comparison instead of a float comparison and a tie-break, which the selection of
/// [`TopK::cut`] makes many of.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Candidate(u64);

impl Candidate {
    fn new(d: f32, i: u32) -> Self {
        let b = d.to_bits();
        // Negative values: all bits flipped (larger magnitude, smaller key); others: the
        // sign bit set, above every negative.
        let ordered = if b >> 31 == 1 { !b } else { b | 0x8000_0000 };
        Self((u64::from(ordered) << 32) | u64::from(i))
    }

    fn distance(self) -> f32 {
        let o = (self.0 >> 32) as u32;
        f32::from_bits(if o >> 31 == 1 { o & 0x7fff_ffff } else { !o })
    }

    fn index(self) -> u32 {
        self.0 as u32
    }
}

/// The best K (distance, index) pairs seen, for candidates offered in increasing index
/// order (the search scans the gallery in order).
///
/// Candidates nearer than the current bound go into a buffer of up to `4K`; a full buffer
/// is cut back to its K best by one selection (`select_nth_unstable`), and the K-th best
/// becomes the bound. Each kept candidate costs O(1) amortised, where a heap paid a
/// sift-down of `log2 K` levels, each with a branch the predictor cannot learn (the
/// SOP-scale search went from 23-25 s to 15 s). The order is (distance, index), total, so
/// the K kept are exactly the K best.
struct TopK {
    k: usize,
    /// The buffer's size: 4K, at least K + 32 (so that a small K is not cut at every
    /// candidate; 4K was a little faster than 2K and 3K at SOP scale).
    cap: usize,
    buf: Vec<Candidate>,
    /// The K-th best distance of the last cut (infinite before the first): a candidate
    /// at or beyond it cannot enter, since at an equal distance its index is the higher.
    /// (The distances are never -0.0, which `>=` would take for +0.0.)
    worst: f32,
}

impl TopK {
    fn new(k: usize) -> Self {
        let cap = k + (3 * k).max(32);
        Self {
            k,
            cap,
            buf: Vec::with_capacity(cap),
            worst: f32::INFINITY,
        }
    }

    #[inline(always)]
    fn push(&mut self, d: f32, i: u32) {
        if d >= self.worst {
            return;
        }
        self.buf.push(Candidate::new(d, i));
        if self.buf.len() == self.cap {
            self.cut();
        }
    }

    /// Keeps the K best; the K-th becomes the bound.
    #[inline(never)]
    fn cut(&mut self) {
        if self.buf.len() > self.k {
            self.buf.select_nth_unstable(self.k - 1);
            self.buf.truncate(self.k);
            self.worst = self.buf[self.k - 1].distance();
        }
    }

    /// The kept pairs, nearest first.
    fn into_sorted(mut self) -> Vec<(f32, u32)> {
        self.cut();
        self.buf.sort_unstable();
        self.buf
            .into_iter()
            .map(|c| (c.distance(), c.index()))
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
    fn candidate_keys_order_as_total_cmp_then_index() {
        let values = [
            f32::NEG_INFINITY,
            -3.5,
            -1e-30,
            -0.0,
            0.0,
            1e-38,
            0.25,
            1.0,
            7e30,
            f32::INFINITY,
        ];
        for &a in &values {
            for &b in &values {
                for (i, j) in [(0u32, 1u32), (5, 5), (u32::MAX, 2)] {
                    let (ca, cb) = (Candidate::new(a, i), Candidate::new(b, j));
                    let want = a.total_cmp(&b).then(i.cmp(&j));
                    assert_eq!(ca.cmp(&cb), want, "{a} {i} vs {b} {j}");
                    assert_eq!((ca.distance().to_bits(), ca.index()), (a.to_bits(), i));
                }
            }
        }
    }

    #[test]
    fn top_k_keeps_the_k_smallest_in_order() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        for k in [1, 2, 3, 7, 64, 200] {
            // Few distinct distances, so ties by index are exercised.
            let items: Vec<(f32, u32)> = (0..500)
                .map(|i| (rng.gen_range(0..40) as f32, i as u32))
                .collect();
            let mut top = TopK::new(k);
            for &(d, i) in &items {
                top.push(d, i);
            }
            let mut want = items.clone();
            want.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            want.truncate(k);
            assert_eq!(top.into_sorted(), want, "k {k}");
        }
    }

    #[test]
    fn between_matches_brute_force_across_tiles() {
        // 300 queries (a ragged second block) among 2,100 gallery rows (three tiles, the
        // last ragged); query 7 is gallery row 11 and must find it at distance 0.
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let (nq, ng, dim) = (300, 2100, 5);
        let gallery: Vec<f32> = (0..ng * dim).map(|_| rng.gen::<f32>()).collect();
        let mut queries: Vec<f32> = (0..nq * dim).map(|_| rng.gen::<f32>()).collect();
        queries[7 * dim..8 * dim].copy_from_slice(&gallery[11 * dim..12 * dim]);
        for k in [6, 150] {
            let nb = knn_between(&queries, &gallery, dim, k, Metric::Euclidean).unwrap();
            assert_eq!(nb.indices.len(), nq * k);
            assert_eq!((nb.of(7)[0], nb.distances[7 * k]), (11, 0.0));
            for i in (0..nq).step_by(5) {
                let q = &queries[i * dim..(i + 1) * dim];
                let mut want: Vec<f32> = gallery
                    .chunks_exact(dim)
                    .map(|g| q.iter().zip(g).map(|(a, b)| (a - b).powi(2)).sum())
                    .collect();
                want.sort_by(f32::total_cmp);
                for (slot, &j) in nb.of(i).iter().enumerate() {
                    let g = &gallery[j as usize * dim..(j as usize + 1) * dim];
                    let d: f32 = q.iter().zip(g).map(|(a, b)| (a - b).powi(2)).sum();
                    assert!((d - want[slot]).abs() < 1e-5, "k {k} query {i} slot {slot}");
                    assert!((nb.distances[i * k + slot] - d).abs() < 1e-5);
                }
            }
        }
    }

    #[test]
    fn between_a_set_and_itself_is_knn_with_the_query_first() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let (n, dim, k) = (500, 4, 9);
        let x: Vec<f32> = (0..n * dim).map(|_| rng.gen::<f32>()).collect();
        for metric in [Metric::Euclidean, Metric::Cosine] {
            let own = knn(&x, dim, k, metric).unwrap();
            let all = knn_between(&x, &x, dim, k + 1, metric).unwrap();
            for i in 0..n {
                assert_eq!(all.of(i)[0] as usize, i, "{metric:?} row {i}");
                assert_eq!(&all.of(i)[1..], own.of(i), "{metric:?} row {i}");
            }
        }
    }

    #[test]
    fn hand_computed_recall_between() {
        // Gallery 1-D: 0(a) 4(b) 10(a); queries 1(a) 5(a) 9(b).
        let gallery = [0.0f32, 4.0, 10.0];
        let g_labels = [0u32, 1, 0];
        let queries = [1.0f32, 5.0, 9.0];
        let q_labels = [0u32, 0, 1];
        // 1 -> {0, 4}: hit at rank 0; 5 -> {4, 0 or 10}: hit at rank 1; 9 -> {10, 4}: rank 1.
        let r = recall_at_k_between(
            &queries,
            &q_labels,
            &gallery,
            &g_labels,
            1,
            &[1, 2],
            Metric::Euclidean,
        )
        .unwrap();
        assert_eq!(r, vec![(1, 1.0 / 3.0), (2, 1.0)]);
        // 5 is 4 from 1 and 5 from 0 and 10: ties go to the lower gallery index.
        let nb = knn_between(&queries, &gallery, 1, 3, Metric::Euclidean).unwrap();
        assert_eq!(nb.of(1), &[1, 0, 2]);
    }

    #[test]
    fn between_errors_name_the_gallery() {
        let (q, g) = ([0.0f32, 1.0], [0.0f32, 1.0, 2.0, 3.0]);
        assert!(matches!(
            knn_between(&q, &g, 2, 3, Metric::Euclidean),
            Err(EvalError::GalleryTooSmall { k: 3, n: 2 })
        ));
        assert!(knn_between(&q, &g, 2, 2, Metric::Euclidean).is_ok());
        assert!(matches!(
            knn_between(&[], &g, 2, 1, Metric::Euclidean),
            Err(EvalError::Shape(m)) if m == "no query embeddings"
        ));
        assert!(matches!(
            knn_between(&q, &g, 2, 0, Metric::Euclidean),
            Err(EvalError::Config(_))
        ));
        assert!(matches!(
            knn_between(&q, &[0.0, 1.0, f32::NAN, 3.0], 2, 1, Metric::Euclidean),
            Err(EvalError::NonFiniteGallery { row: 1 })
        ));
        assert!(matches!(
            knn_between(&q, &[0.0, 1.0, 2.0], 2, 1, Metric::Euclidean),
            Err(EvalError::Shape(m)) if m.starts_with("gallery")
        ));
        assert!(matches!(
            recall_at_k_between(&q, &[0, 1], &g, &[0, 1], 2, &[1], Metric::Euclidean),
            Err(EvalError::Shape(_))
        ));
        assert!(matches!(
            recall_at_k_between(&q, &[0], &g, &[0], 2, &[1], Metric::Euclidean),
            Err(EvalError::Shape(m)) if m.starts_with("gallery")
        ));
        let nb = knn_between(&[2.0, 3.0], &g, 2, 1, Metric::Euclidean).unwrap();
        assert_eq!(nb.of(0), &[1]);
        // Neighbours indexing past the gallery labels given.
        assert!(recall_from_gallery_neighbors(&nb, &[0], &[0], &[1]).is_err());
    }

    #[test]
    fn single_class_has_recall_one() {
        let r = recall_at_k(&[0.0f32, 5.0, 9.0], 1, &[4, 4, 4], &[1], Metric::Euclidean).unwrap();
        assert_eq!(r, vec![(1, 1.0)]);
    }
}
