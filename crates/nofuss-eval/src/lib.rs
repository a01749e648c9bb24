//! Evaluation of embeddings on unseen classes: Recall@K and NMI, as in the
//! metric-learning literature (Song et al. 2016; Movshovitz-Attias et al. 2017, section 5),
//! and MAP@R / R-Precision (Musgrave et al. 2020).
//!
//! Works on plain row-major `&[f32]` slices, so embeddings from any framework can be
//! evaluated. Nearest neighbours are exact, computed tile by tile with a running
//! top-K per query (memory `O(N·K)`, never the `N×N` distance matrix), in parallel
//! with rayon. With the `candle` feature, `device::knn_on` runs the same search on a
//! candle device (the GPU with the `cuda` feature) and `evaluate_on` uses it.
//!
//! Besides every point against the others (CUB, Cars196, SOP), queries can be searched
//! among a separate gallery (`knn_between`, `recall_at_k_between`, `evaluate_between`):
//! the In-Shop Clothes protocol, and the search of one's own collection.
//!
//! ```
//! use nofuss_eval::{recall_at_k, Metric};
//! // Four 2-D points, two classes; each point's nearest neighbour shares its class.
//! let emb = [0.0f32, 0.0, 0.1, 0.0, 5.0, 5.0, 5.1, 5.0];
//! let labels = [0u32, 0, 1, 1];
//! let r = recall_at_k(&emb, 2, &labels, &[1, 2], Metric::Euclidean)?;
//! assert_eq!(r, vec![(1, 1.0), (2, 1.0)]);
//! # Ok::<(), nofuss_eval::EvalError>(())
//! ```

#[cfg(feature = "candle")]
pub mod device;
mod error;
mod kmeans;
pub(crate) mod knn;
mod map_at_r;
mod nmi;
mod panels;
mod tiles;

pub use error::{EvalError, Result};
pub use kmeans::{kmeans, KMeans, KMeansConfig};
pub use knn::{
    knn, knn_between, recall_at_k, recall_at_k_between, recall_from_gallery_neighbors,
    recall_from_neighbors, Metric, Neighbors,
};
pub use map_at_r::{
    map_at_r, map_at_r_from_gallery_neighbors, map_at_r_from_neighbors, max_r, max_r_between,
    MapAtR,
};
pub use nmi::{nmi, NmiNormalization};

/// What [`evaluate`] computes.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvalConfig {
    /// The K of Recall@K.
    pub ks: Vec<usize>,
    /// Distance for retrieval.
    pub metric: Metric,
    /// Whether to cluster with k-means (k = number of classes) and report NMI.
    pub nmi: bool,
    /// Whether to report MAP@R and R-Precision.
    pub map_at_r: bool,
    /// k-means settings (its `k` is ignored: the number of classes is used).
    pub kmeans: KMeansConfig,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self {
            ks: vec![1, 2, 4, 8],
            metric: Metric::Euclidean,
            nmi: true,
            map_at_r: false,
            kmeans: KMeansConfig::default(),
        }
    }
}

/// The metrics of one evaluation.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EvalReport {
    /// `(K, Recall@K)` in the order asked.
    pub recall: Vec<(usize, f64)>,
    /// NMI of k-means clusters against the classes, when asked for.
    pub nmi: Option<f64>,
    /// MAP@R and R-Precision, when asked for.
    pub map_at_r: Option<MapAtR>,
}

impl EvalReport {
    /// Recall@K for one K, if it was computed.
    pub fn recall_at(&self, k: usize) -> Option<f64> {
        self.recall.iter().find(|(kk, _)| *kk == k).map(|(_, r)| *r)
    }
}

/// Recall@K (and NMI, MAP@R, if configured) of `embeddings` (`[N, dim]` row-major) with
/// `labels`. One neighbour search serves Recall@K and MAP@R.
pub fn evaluate(
    embeddings: &[f32],
    dim: usize,
    labels: &[u32],
    cfg: &EvalConfig,
) -> Result<EvalReport> {
    evaluate_with(embeddings, dim, labels, cfg, knn)
}

/// [`evaluate`] with the neighbour search on a candle `device` ([`device::knn_on`]; on
/// the GPU with the `cuda` feature). k-means runs on the CPU.
#[cfg(feature = "candle")]
pub fn evaluate_on(
    device: &candle_core::Device,
    embeddings: &[f32],
    dim: usize,
    labels: &[u32],
    cfg: &EvalConfig,
) -> Result<EvalReport> {
    evaluate_with(embeddings, dim, labels, cfg, |e, d, k, m| {
        device::knn_on(device, e, d, k, m)
    })
}

fn evaluate_with(
    embeddings: &[f32],
    dim: usize,
    labels: &[u32],
    cfg: &EvalConfig,
    search: impl Fn(&[f32], usize, usize, Metric) -> Result<Neighbors>,
) -> Result<EvalReport> {
    check_embeddings(embeddings, dim, Some(labels.len()))?;
    let kmax = cfg
        .ks
        .iter()
        .copied()
        .max()
        .ok_or_else(|| EvalError::Config("no K given".into()))?;
    let k = if cfg.map_at_r {
        kmax.max(max_r(labels))
    } else {
        kmax
    };
    let nb = search(embeddings, dim, k, cfg.metric)?;
    let recall = recall_from_neighbors(&nb, labels, &cfg.ks)?;
    let map_at_r = if cfg.map_at_r {
        Some(map_at_r_from_neighbors(&nb, labels)?)
    } else {
        None
    };
    let nmi = if cfg.nmi {
        let mut classes: Vec<u32> = labels.to_vec();
        classes.sort_unstable();
        classes.dedup();
        let km = kmeans(
            embeddings,
            dim,
            &KMeansConfig {
                k: classes.len(),
                ..cfg.kmeans.clone()
            },
        )?;
        Some(nmi::nmi(
            labels,
            &km.assignments,
            NmiNormalization::Arithmetic,
        )?)
    } else {
        None
    };
    Ok(EvalReport {
        recall,
        nmi,
        map_at_r,
    })
}

/// Recall@K (and MAP@R, if configured) of `queries` (`[Q, dim]`) searched among
/// `gallery` (`[G, dim]`): the query/gallery protocol (In-Shop Clothes), a hit being a
/// gallery row of the query's class ([`knn_between`]). NMI clusters one set of
/// embeddings, so `cfg.nmi` must be off (evaluate the gallery alone for it).
pub fn evaluate_between(
    queries: &[f32],
    query_labels: &[u32],
    gallery: &[f32],
    gallery_labels: &[u32],
    dim: usize,
    cfg: &EvalConfig,
) -> Result<EvalReport> {
    evaluate_between_with(
        queries,
        query_labels,
        gallery,
        gallery_labels,
        dim,
        cfg,
        knn_between,
    )
}

/// [`evaluate_between`] with the neighbour search on a candle `device`
/// ([`device::knn_between_on`]; on the GPU with the `cuda` feature).
#[cfg(feature = "candle")]
pub fn evaluate_between_on(
    device: &candle_core::Device,
    queries: &[f32],
    query_labels: &[u32],
    gallery: &[f32],
    gallery_labels: &[u32],
    dim: usize,
    cfg: &EvalConfig,
) -> Result<EvalReport> {
    evaluate_between_with(
        queries,
        query_labels,
        gallery,
        gallery_labels,
        dim,
        cfg,
        |q, g, d, k, m| device::knn_between_on(device, q, g, d, k, m),
    )
}

fn evaluate_between_with(
    queries: &[f32],
    query_labels: &[u32],
    gallery: &[f32],
    gallery_labels: &[u32],
    dim: usize,
    cfg: &EvalConfig,
    search: impl Fn(&[f32], &[f32], usize, usize, Metric) -> Result<Neighbors>,
) -> Result<EvalReport> {
    if cfg.nmi {
        return Err(EvalError::Config(
            "NMI clusters one set of embeddings, not queries against a gallery: turn `nmi` \
             off (or evaluate the gallery alone for it)"
                .into(),
        ));
    }
    knn::check_queries(queries, dim, Some(query_labels.len()))?;
    knn::check_gallery(gallery, dim, Some(gallery_labels.len()))?;
    let kmax = cfg
        .ks
        .iter()
        .copied()
        .max()
        .ok_or_else(|| EvalError::Config("no K given".into()))?;
    let k = if cfg.map_at_r {
        kmax.max(max_r_between(query_labels, gallery_labels))
    } else {
        kmax
    };
    let nb = search(queries, gallery, dim, k, cfg.metric)?;
    let recall = recall_from_gallery_neighbors(&nb, query_labels, gallery_labels, &cfg.ks)?;
    let map_at_r = if cfg.map_at_r {
        Some(map_at_r_from_gallery_neighbors(
            &nb,
            query_labels,
            gallery_labels,
        )?)
    } else {
        None
    };
    Ok(EvalReport {
        recall,
        nmi: None,
        map_at_r,
    })
}

/// Checks the common shape contract: `embeddings.len() == labels.len() * dim`, finite values.
pub(crate) fn check_embeddings(
    embeddings: &[f32],
    dim: usize,
    n_labels: Option<usize>,
) -> Result<usize> {
    if dim == 0 {
        return Err(EvalError::Shape("embedding dimension is 0".into()));
    }
    if !embeddings.len().is_multiple_of(dim) {
        return Err(EvalError::Shape(format!(
            "{} values do not form rows of dimension {dim}",
            embeddings.len()
        )));
    }
    let n = embeddings.len() / dim;
    if let Some(l) = n_labels {
        if l != n {
            return Err(EvalError::Shape(format!("{n} embeddings but {l} labels")));
        }
    }
    if let Some(i) = embeddings.iter().position(|v| !v.is_finite()) {
        return Err(EvalError::NonFinite { row: i / dim });
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evaluate_reports_both_metrics() {
        let emb = [
            0.0f32, 0.0, 0.1, 0.0, 5.0, 5.0, 5.1, 5.0, 0.0, 0.2, 5.0, 5.2,
        ];
        let labels = [0u32, 0, 1, 1, 0, 1];
        let cfg = EvalConfig {
            ks: vec![1, 2],
            ..Default::default()
        };
        let r = evaluate(&emb, 2, &labels, &cfg).unwrap();
        assert!(matches!(
            evaluate(&emb, 2, &labels, &EvalConfig::default()),
            Err(EvalError::KTooLarge { k: 8, n: 6 })
        ));
        assert_eq!(r.recall_at(1), Some(1.0));
        assert_eq!(r.recall_at(3), None);
        assert!((r.nmi.unwrap() - 1.0).abs() < 1e-9);
    }

    #[test]
    fn evaluate_shares_one_neighbour_search_for_map_at_r() {
        let emb = [0.0f32, 1.0, 1.6, 5.0, 6.0];
        let labels = [0u32, 0, 1, 0, 1];
        let cfg = EvalConfig {
            ks: vec![1],
            nmi: false,
            map_at_r: true,
            ..Default::default()
        };
        let r = evaluate(&emb, 1, &labels, &cfg).unwrap();
        assert_eq!(
            r.map_at_r,
            Some(map_at_r(&emb, 1, &labels, Metric::Euclidean).unwrap())
        );
        assert_eq!(r.nmi, None);
        // Only point 0 has a same-class nearest neighbour (point 1).
        assert_eq!(r.recall, vec![(1, 0.2)]);
    }

    #[test]
    fn evaluate_between_reports_recall_and_map_at_r_and_refuses_nmi() {
        // Gallery 1-D: 0(a) 1(a) 2(b) 9(b); queries 0.4(a) 8(b).
        let (gallery, g_labels) = ([0.0f32, 1.0, 2.0, 9.0], [0u32, 0, 1, 1]);
        let (queries, q_labels) = ([0.4f32, 8.0], [0u32, 1]);
        let cfg = EvalConfig {
            ks: vec![1, 3],
            nmi: false,
            map_at_r: true,
            ..Default::default()
        };
        let r = evaluate_between(&queries, &q_labels, &gallery, &g_labels, 1, &cfg).unwrap();
        assert_eq!(r.recall, vec![(1, 1.0), (3, 1.0)]);
        assert_eq!(r.nmi, None);
        let m = r.map_at_r.unwrap();
        assert_eq!((m.map_at_r, m.r_precision, m.queries), (1.0, 1.0, 2));
        let with_nmi = EvalConfig {
            nmi: true,
            ..cfg.clone()
        };
        assert!(matches!(
            evaluate_between(&queries, &q_labels, &gallery, &g_labels, 1, &with_nmi),
            Err(EvalError::Config(m)) if m.contains("NMI")
        ));
        assert!(matches!(
            evaluate_between(&queries, &q_labels, &gallery, &g_labels[..3], 1, &cfg),
            Err(EvalError::Shape(_))
        ));
        let far = EvalConfig { ks: vec![5], ..cfg };
        assert!(matches!(
            evaluate_between(&queries, &q_labels, &gallery, &g_labels, 1, &far),
            Err(EvalError::GalleryTooSmall { k: 5, n: 4 })
        ));
    }

    #[test]
    fn shape_errors() {
        assert!(matches!(
            check_embeddings(&[1.0; 5], 2, None),
            Err(EvalError::Shape(_))
        ));
        assert!(matches!(
            check_embeddings(&[1.0; 4], 2, Some(3)),
            Err(EvalError::Shape(_))
        ));
        assert!(matches!(
            check_embeddings(&[1.0, f32::NAN, 0.0, 0.0], 2, None),
            Err(EvalError::NonFinite { row: 0 })
        ));
        assert!(matches!(
            check_embeddings(&[], 0, None),
            Err(EvalError::Shape(_))
        ));
    }
}

/// The README's example, compiled and run as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctest;
