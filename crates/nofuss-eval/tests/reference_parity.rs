//! Parity with reference implementations: scikit-learn (`tests/reference/eval_sklearn.py`)
//! pytorch-metric-learning (`tests/reference/eval_pml.py`) and faiss
//! (`tests/reference/knn_faiss.py`), and both for queries against a gallery
//! (`tests/reference/eval_between.py`), through their committed fixtures.

use nofuss_eval::{nmi, recall_at_k, Metric, NmiNormalization};
use serde_json::Value;

fn fixture() -> Value {
    serde_json::from_str(include_str!(
        "../../../tests/reference/fixtures/eval_sklearn.json"
    ))
    .unwrap()
}

fn u32s(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn nmi_matches_sklearn() {
    for case in fixture()["nmi"].as_array().unwrap() {
        let (a, b) = (u32s(&case["a"]), u32s(&case["b"]));
        for (norm, key) in [
            (NmiNormalization::Arithmetic, "arithmetic"),
            (NmiNormalization::Geometric, "geometric"),
        ] {
            let want = case[key].as_f64().unwrap();
            let got = nmi(&a, &b, norm).unwrap();
            assert!((got - want).abs() < 1e-10, "{key}: {got} vs sklearn {want}");
        }
    }
}

/// A fixture case's `dim`, row-major `embeddings` and `labels`.
fn embedding_case(case: &Value) -> (usize, Vec<f32>, Vec<u32>) {
    let dim = case["dim"].as_u64().unwrap() as usize;
    let emb = case["embeddings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    (dim, emb, u32s(&case["labels"]))
}

#[test]
fn recall_matches_sklearn_brute_force_neighbours() {
    for case in fixture()["recall"].as_array().unwrap() {
        let (dim, emb, labels) = embedding_case(case);
        let want = case["recall"].as_object().unwrap();
        let ks: Vec<usize> = want.keys().map(|k| k.parse().unwrap()).collect();
        for (k, r) in recall_at_k(&emb, dim, &labels, &ks, Metric::Euclidean).unwrap() {
            let w = want[&k.to_string()].as_f64().unwrap();
            assert_eq!(r, w, "Recall@{k} (dim {dim})");
        }
    }
}

#[test]
fn map_at_r_matches_pytorch_metric_learning() {
    let fx: Value = serde_json::from_str(include_str!(
        "../../../tests/reference/fixtures/eval_pml.json"
    ))
    .unwrap();
    for case in fx["cases"].as_array().unwrap() {
        let (dim, emb, labels) = embedding_case(case);
        let m = nofuss_eval::map_at_r(&emb, dim, &labels, Metric::Euclidean).unwrap();
        let (want_map, want_rp) = (
            case["map_at_r"].as_f64().unwrap(),
            case["r_precision"].as_f64().unwrap(),
        );
        assert!(
            (m.map_at_r - want_map).abs() < 1e-9,
            "MAP@R {} vs PML {want_map}",
            m.map_at_r
        );
        assert!(
            (m.r_precision - want_rp).abs() < 1e-9,
            "R-Precision {} vs PML {want_rp}",
            m.r_precision
        );
        let p1 = recall_at_k(&emb, dim, &labels, &[1], Metric::Euclidean).unwrap()[0].1;
        assert!(
            (p1 - case["precision_at_1"].as_f64().unwrap()).abs() < 1e-12,
            "Precision@1 = Recall@1"
        );
    }
}

#[test]
fn knn_matches_faiss_index_flat_l2() {
    let fx: Value = serde_json::from_str(include_str!(
        "../../../tests/reference/fixtures/knn_faiss.json"
    ))
    .unwrap();
    for case in fx["cases"].as_array().unwrap() {
        let (dim, emb, labels) = embedding_case(case);
        let k = case["k"].as_u64().unwrap() as usize;
        let nb = nofuss_eval::knn(&emb, dim, k, Metric::Euclidean).unwrap();
        let want_idx = case["indices"].as_array().unwrap();
        let want_dist = case["distances"].as_array().unwrap();
        for (i, (wi, wd)) in want_idx.iter().zip(want_dist).enumerate() {
            let wi = u32s(wi);
            // Same neighbours in the same order, same squared distances (float rounding aside).
            assert_eq!(nb.of(i), wi.as_slice(), "row {i}");
            for (slot, d) in wd.as_array().unwrap().iter().enumerate() {
                let (ours, theirs) = (nb.distances[i * k + slot], d.as_f64().unwrap() as f32);
                assert!(
                    (ours - theirs).abs() <= 1e-4 * theirs.max(1.0),
                    "row {i} slot {slot}: {ours} vs {theirs}"
                );
            }
        }
        let want = case["recall"].as_object().unwrap();
        let ks: Vec<usize> = want.keys().map(|s| s.parse().unwrap()).collect();
        for (kk, r) in recall_at_k(&emb, dim, &labels, &ks, Metric::Euclidean).unwrap() {
            // The same hit count; numpy's mean and hits/n may differ in the last bit.
            let w = want[&kk.to_string()].as_f64().unwrap();
            assert!((r - w).abs() < 1e-12, "Recall@{kk}: {r} vs faiss {w}");
        }
    }
}

/// A fixture array of numbers as f32.
fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

#[test]
fn queries_against_a_gallery_match_faiss_and_pytorch_metric_learning() {
    let fx: Value = serde_json::from_str(include_str!(
        "../../../tests/reference/fixtures/eval_between.json"
    ))
    .unwrap();
    for case in fx["cases"].as_array().unwrap() {
        let dim = case["dim"].as_u64().unwrap() as usize;
        let k = case["k"].as_u64().unwrap() as usize;
        let (queries, gallery) = (f32s(&case["queries"]), f32s(&case["gallery"]));
        let (q_labels, g_labels) = (u32s(&case["query_labels"]), u32s(&case["gallery_labels"]));
        let nb = nofuss_eval::knn_between(&queries, &gallery, dim, k, Metric::Euclidean).unwrap();
        let want_idx = case["indices"].as_array().unwrap();
        let want_dist = case["distances"].as_array().unwrap();
        assert_eq!(want_idx.len(), q_labels.len());
        for (i, (wi, wd)) in want_idx.iter().zip(want_dist).enumerate() {
            assert_eq!(nb.of(i), u32s(wi).as_slice(), "query {i} (dim {dim})");
            for (slot, d) in f32s(wd).into_iter().enumerate() {
                let ours = nb.distances[i * k + slot];
                assert!(
                    (ours - d).abs() <= 1e-4 * d.max(1.0),
                    "query {i} slot {slot}: {ours} vs faiss {d}"
                );
            }
        }
        let want = case["recall"].as_object().unwrap();
        let ks: Vec<usize> = want.keys().map(|s| s.parse().unwrap()).collect();
        let cfg = nofuss_eval::EvalConfig {
            ks: ks.clone(),
            nmi: false,
            map_at_r: true,
            ..Default::default()
        };
        let report =
            nofuss_eval::evaluate_between(&queries, &q_labels, &gallery, &g_labels, dim, &cfg)
                .unwrap();
        for (kk, r) in report.recall {
            let w = want[&kk.to_string()].as_f64().unwrap();
            assert!((r - w).abs() < 1e-12, "Recall@{kk}: {r} vs faiss {w}");
        }
        let m = report.map_at_r.unwrap();
        let (want_map, want_rp, want_p1) = (
            case["map_at_r"].as_f64().unwrap(),
            case["r_precision"].as_f64().unwrap(),
            case["precision_at_1"].as_f64().unwrap(),
        );
        assert!(
            (m.map_at_r - want_map).abs() < 1e-6,
            "MAP@R {} vs PML {want_map}",
            m.map_at_r
        );
        assert!(
            (m.r_precision - want_rp).abs() < 1e-6,
            "R-Precision {} vs PML {want_rp}",
            m.r_precision
        );
        let p1 = nofuss_eval::recall_at_k_between(
            &queries,
            &q_labels,
            &gallery,
            &g_labels,
            dim,
            &[1],
            Metric::Euclidean,
        )
        .unwrap()[0]
            .1;
        assert!(
            (p1 - want_p1).abs() < 1e-6,
            "Precision@1 {p1} vs PML {want_p1}"
        );
    }
}
