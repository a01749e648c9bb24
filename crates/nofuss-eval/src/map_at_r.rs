//! MAP@R and R-Precision (Musgrave, Belongie, Lim: "A Metric Learning Reality Check",
//! ECCV 2020, section 3.2).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::{check_embeddings, knn, EvalError, Metric, Neighbors, Result};

/// MAP@R and R-Precision of a set of embeddings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MapAtR {
    /// Mean over queries of `(1/R) Σ_{k<=R} P(k)·rel(k)`.
    pub map_at_r: f64,
    /// Mean over queries of the fraction of same-class points among the first R neighbours.
    pub r_precision: f64,
    /// Queries counted (those whose class has another member).
    pub queries: usize,
}

/// How many rows of each label `labels` holds.
fn label_counts(labels: &[u32]) -> HashMap<u32, usize> {
    let mut counts: HashMap<u32, usize> = HashMap::new();
    for &l in labels {
        *counts.entry(l).or_default() += 1;
    }
    counts
}

/// `R` of every point: the number of *other* points of its class.
pub(crate) fn r_per_point(labels: &[u32]) -> Vec<usize> {
    let counts = label_counts(labels);
    labels.iter().map(|l| counts[l] - 1).collect()
}

/// `R` of every query: the number of gallery rows of its class.
fn r_per_query(query_labels: &[u32], gallery_labels: &[u32]) -> Vec<usize> {
    let counts = label_counts(gallery_labels);
    query_labels
        .iter()
        .map(|l| counts.get(l).copied().unwrap_or(0))
        .collect()
}

/// The largest `R`: how many neighbours [`map_at_r_from_neighbors`] needs.
pub fn max_r(labels: &[u32]) -> usize {
    r_per_point(labels).into_iter().max().unwrap_or(0)
}

/// The largest `R` of queries against a gallery: how many neighbours
/// [`map_at_r_from_gallery_neighbors`] needs.
pub fn max_r_between(query_labels: &[u32], gallery_labels: &[u32]) -> usize {
    r_per_query(query_labels, gallery_labels)
        .into_iter()
        .max()
        .unwrap_or(0)
}

/// MAP@R and R-Precision from precomputed neighbours (`neighbors.k >= max_r(labels)`).
///
/// For a query whose class has `R` other members: R-Precision is the fraction of
/// same-class points among its first `R` neighbours; AP@R is
/// `(1/R) Σ_{k=1..R} P(k)·rel(k)`, with `P(k)` the precision among the first `k`.
/// Queries with `R = 0` (the only point of their class) have no relevant point and are
/// left out of both means; it is an error when no query remains.
pub fn map_at_r_from_neighbors(nb: &Neighbors, labels: &[u32]) -> Result<MapAtR> {
    from_neighbors(nb, labels, labels, &r_per_point(labels))
}

/// MAP@R and R-Precision of queries against a gallery, from [`crate::knn_between`]'s
/// neighbours (`neighbors.k >= max_r_between(...)`): a query's `R` is the number of
/// gallery rows of its class; queries whose class is not in the gallery are left out.
pub fn map_at_r_from_gallery_neighbors(
    nb: &Neighbors,
    query_labels: &[u32],
    gallery_labels: &[u32],
) -> Result<MapAtR> {
    let rs = r_per_query(query_labels, gallery_labels);
    from_neighbors(nb, query_labels, gallery_labels, &rs)
}

fn from_neighbors(
    nb: &Neighbors,
    query_labels: &[u32],
    gallery_labels: &[u32],
    rs: &[usize],
) -> Result<MapAtR> {
    let n = query_labels.len();
    if nb.indices.len() != n * nb.k {
        return Err(EvalError::Shape(format!(
            "{} labels for neighbours of {} points",
            n,
            nb.indices.len() / nb.k.max(1)
        )));
    }
    let needed = rs.iter().copied().max().unwrap_or(0);
    if nb.k < needed {
        return Err(EvalError::Config(format!(
            "MAP@R needs {needed} neighbours per point, {} were computed",
            nb.k
        )));
    }
    let (mut map_sum, mut rp_sum, mut queries) = (0.0f64, 0.0f64, 0usize);
    for (i, &r) in rs.iter().enumerate() {
        if r == 0 {
            continue;
        }
        let (mut hits, mut ap) = (0usize, 0.0f64);
        for (rank, &j) in nb.of(i)[..r].iter().enumerate() {
            let l = gallery_labels.get(j as usize).ok_or_else(|| {
                EvalError::Shape(format!(
                    "neighbour {j} of query {i} is outside the {} gallery labels",
                    gallery_labels.len()
                ))
            })?;
            if *l == query_labels[i] {
                hits += 1;
                ap += hits as f64 / (rank + 1) as f64;
            }
        }
        map_sum += ap / r as f64;
        rp_sum += hits as f64 / r as f64;
        queries += 1;
    }
    if queries == 0 {
        return Err(EvalError::Config(
            "MAP@R is undefined: no query has another point of its class to find".into(),
        ));
    }
    Ok(MapAtR {
        map_at_r: map_sum / queries as f64,
        r_precision: rp_sum / queries as f64,
        queries,
    })
}

/// MAP@R and R-Precision of `embeddings` (`[N, dim]`), every point a query against the others.
pub fn map_at_r(embeddings: &[f32], dim: usize, labels: &[u32], metric: Metric) -> Result<MapAtR> {
    check_embeddings(embeddings, dim, Some(labels.len()))?;
    let k = max_r(labels);
    if k == 0 {
        return Err(EvalError::Config(
            "MAP@R is undefined: every class has a single point".into(),
        ));
    }
    map_at_r_from_neighbors(&knn(embeddings, dim, k, metric)?, labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_computed() {
        // 1-D points; class a = {0, 1, 5}, class b = {2, 6}.
        // positions: p0=0.0(a) p1=1.0(a) p2=1.6(b) p3=5.0(a) p4=6.0(b)
        let emb = [0.0f32, 1.0, 1.6, 5.0, 6.0];
        let labels = [0u32, 0, 1, 0, 1];
        // p0 (R=2): neighbours 1(a), 2(b)      -> AP = (1/1)/2 = 0.5,        RP = 1/2
        // p1 (R=2): neighbours 2(b), 0(a)      -> AP = (1/2)/2 = 0.25,       RP = 1/2
        // p2 (R=1): neighbour 1(a)             -> AP = 0,                    RP = 0
        // p3 (R=2): neighbours 4(b), 2(b)      -> AP = 0,                    RP = 0
        // p4 (R=1): neighbour 3(a)             -> AP = 0,                    RP = 0
        let m = map_at_r(&emb, 1, &labels, Metric::Euclidean).unwrap();
        assert!((m.map_at_r - 0.75 / 5.0).abs() < 1e-12, "{m:?}");
        assert!((m.r_precision - 1.0 / 5.0).abs() < 1e-12, "{m:?}");
        assert_eq!(m.queries, 5);
    }

    #[test]
    fn perfect_clusters_score_one_and_singletons_are_skipped() {
        let emb = [0.0f32, 0.1, 0.2, 10.0, 10.1, 50.0];
        let labels = [0u32, 0, 0, 1, 1, 2];
        let m = map_at_r(&emb, 1, &labels, Metric::Euclidean).unwrap();
        assert_eq!((m.map_at_r, m.r_precision, m.queries), (1.0, 1.0, 5));
        assert!(map_at_r(&[0.0f32, 1.0], 1, &[0, 1], Metric::Euclidean).is_err());
        let nb = knn(&emb, 1, 1, Metric::Euclidean).unwrap();
        assert!(map_at_r_from_neighbors(&nb, &labels).is_err());
    }

    #[test]
    fn hand_computed_between() {
        // Gallery 1-D: 0(a) 1(a) 2(b) 9(b); queries 0.4(a) 8(b) 20(c).
        let gallery = [0.0f32, 1.0, 2.0, 9.0];
        let g_labels = [0u32, 0, 1, 1];
        let (queries, q_labels) = ([0.4f32, 8.0, 20.0], [0u32, 1, 2]);
        assert_eq!(max_r_between(&q_labels, &g_labels), 2);
        let nb = crate::knn_between(&queries, &gallery, 1, 2, Metric::Euclidean).unwrap();
        // 0.4 (R=2): 0(a) 1(a)  -> AP 1, RP 1
        // 8 (R=2):   9(b) 2(b)  -> AP 1, RP 1
        // 20 (R=0, class c not in the gallery): left out
        let m = map_at_r_from_gallery_neighbors(&nb, &q_labels, &g_labels).unwrap();
        assert_eq!((m.map_at_r, m.r_precision, m.queries), (1.0, 1.0, 2));
        // 8 (R=2) with 1(a) moved to 8.5: 8.5(a) 9(b) -> AP (1/2)/2, RP 1/2.
        let gallery = [0.0f32, 8.5, 2.0, 9.0];
        let nb = crate::knn_between(&queries[1..2], &gallery, 1, 2, Metric::Euclidean).unwrap();
        assert_eq!(nb.of(0), &[1, 3]);
        let m = map_at_r_from_gallery_neighbors(&nb, &[1], &g_labels).unwrap();
        assert_eq!((m.map_at_r, m.r_precision), (0.25, 0.5));
        assert!(map_at_r_from_gallery_neighbors(&nb, &[2], &g_labels).is_err());
    }
}
