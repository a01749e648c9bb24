//! `nofuss search`: the nearest gallery images of query images, by their embeddings.
//!
//! Reads the files `nofuss embed` writes (or any safetensors file with `embeddings`
//! [N, D], or a `.npy` of them): each row is named by the file's `paths` metadata (one
//! path per line, as `embed --images` writes it) or, without it, by its row number.

use std::path::Path;

use candle_core::{Device, Tensor};
use nofuss_eval::{Metric, Neighbors};

use crate::eval_cmd::input_err;
use crate::Result;

/// Embeddings with a name for each row.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedRows {
    /// `[N, dim]` row-major.
    pub data: Vec<f32>,
    /// Embedding dimension.
    pub dim: usize,
    /// Each row's image path (from the file's `paths` metadata), or `row <i>`.
    pub names: Vec<String>,
}

/// Reads the `embeddings` of a safetensors file (and its `paths` metadata, when it has
/// one line per row), or a `.npy` array of them.
pub fn load_named(path: &Path) -> Result<NamedRows> {
    let (emb, paths) = if path.extension().is_some_and(|e| e == "npy") {
        let t = Tensor::read_npy(path).map_err(|e| input_err(path, e.to_string()))?;
        (t, None)
    } else {
        let bytes = std::fs::read(path).map_err(|e| input_err(path, e.to_string()))?;
        let not_safetensors = |e: &dyn std::fmt::Display| {
            input_err(
                path,
                format!("not a readable safetensors file (or .npy): {e}"),
            )
        };
        let (_, meta) =
            safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| not_safetensors(&e))?;
        let paths = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get("paths").cloned());
        let mut t = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
            .map_err(|e| not_safetensors(&e))?;
        let emb = t
            .remove("embeddings")
            .ok_or_else(|| input_err(path, "no tensor named `embeddings` (expected [N, D])"))?;
        (emb, paths)
    };
    let (data, n, dim) = crate::eval_cmd::rows_of(path, &emb)?;
    let names = match paths {
        Some(p) if p.lines().count() == n => p.lines().map(str::to_string).collect(),
        Some(p) => {
            return Err(input_err(
                path,
                format!(
                    "its `paths` metadata names {} images for {n} embeddings",
                    p.lines().count()
                ),
            ))
        }
        None => (0..n).map(|i| format!("row {i}")).collect(),
    };
    Ok(NamedRows { data, dim, names })
}

/// The `k` nearest rows of `gallery` for every row of `queries` on `device`; without
/// `queries`, every gallery row among the others (itself left out).
pub fn search(
    device: &Device,
    queries: Option<&NamedRows>,
    gallery: &NamedRows,
    k: usize,
    metric: Metric,
) -> Result<Neighbors> {
    Ok(match queries {
        Some(q) => nofuss_eval::device::knn_between_on(
            device,
            &q.data,
            &gallery.data,
            gallery.dim,
            k,
            metric,
        )?,
        None => nofuss_eval::device::knn_on(device, &gallery.data, gallery.dim, k, metric)?,
    })
}

/// One query's neighbours as a JSON object: `query` and `neighbours` (`rank` from 1,
/// gallery `row`, `name`, `distance`).
pub fn result_json(
    query: &str,
    nb: &Neighbors,
    i: usize,
    gallery: &NamedRows,
) -> serde_json::Value {
    let neighbours: Vec<serde_json::Value> = nb
        .of(i)
        .iter()
        .enumerate()
        .map(|(slot, &j)| {
            serde_json::json!({
                "rank": slot + 1,
                "row": j,
                "name": gallery.names[j as usize],
                "distance": nb.distances[i * nb.k + slot],
            })
        })
        .collect();
    serde_json::json!({ "query": query, "neighbours": neighbours })
}

/// One query's neighbours as text: the query, then a line per neighbour (rank,
/// distance, name).
pub fn result_text(query: &str, nb: &Neighbors, i: usize, gallery: &NamedRows) -> String {
    let mut s = format!("{query}\n");
    for (slot, &j) in nb.of(i).iter().enumerate() {
        s += &format!(
            "  {:>3}  {:.4}  {}\n",
            slot + 1,
            nb.distances[i * nb.k + slot],
            gallery.names[j as usize]
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, emb: &[f32], dim: usize, paths: Option<&str>) {
        let t = Tensor::from_slice(emb, (emb.len() / dim, dim), &Device::Cpu).unwrap();
        let meta = paths.map(|p| std::collections::HashMap::from([("paths".into(), p.into())]));
        safetensors::serialize_to_file([("embeddings", &t)], meta, path).unwrap();
    }

    #[test]
    fn rows_are_named_by_the_paths_metadata_or_their_number() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (
            tmp.path().join("a.safetensors"),
            tmp.path().join("b.safetensors"),
        );
        write(&a, &[0.0, 1.0, 2.0, 3.0], 2, Some("x/1.jpg\ny/2.jpg"));
        write(&b, &[0.0, 1.0, 2.0, 3.0], 2, None);
        let named = load_named(&a).unwrap();
        assert_eq!(named.names, ["x/1.jpg", "y/2.jpg"]);
        assert_eq!((named.dim, named.data.len()), (2, 4));
        assert_eq!(load_named(&b).unwrap().names, ["row 0", "row 1"]);
        write(&b, &[0.0, 1.0, 2.0, 3.0], 2, Some("only-one.jpg"));
        let err = load_named(&b).unwrap_err().to_string();
        assert!(
            err.contains("b.safetensors") && err.contains("1 images for 2"),
            "{err}"
        );
        std::fs::write(&b, "not a tensor file").unwrap();
        assert!(load_named(&b)
            .unwrap_err()
            .to_string()
            .contains("not a readable"));
    }

    #[test]
    fn a_query_finds_its_nearest_and_the_gallery_alone_leaves_each_row_out() {
        let gallery = NamedRows {
            data: vec![0.0, 1.0, 5.0, 5.5],
            dim: 1,
            names: ["a", "b", "c", "d"].map(String::from).to_vec(),
        };
        let queries = NamedRows {
            data: vec![4.9],
            dim: 1,
            names: vec!["q".into()],
        };
        let nb = search(&Device::Cpu, Some(&queries), &gallery, 2, Metric::Euclidean).unwrap();
        let text = result_text("q", &nb, 0, &gallery);
        assert!(
            text.starts_with("q\n    1  0.0100  c\n    2  0.3600  d\n"),
            "{text}"
        );
        let own = search(&Device::Cpu, None, &gallery, 1, Metric::Euclidean).unwrap();
        assert_eq!(own.of(2), &[3]);
        let j = result_json("c", &own, 2, &gallery);
        assert_eq!(j["neighbours"][0]["name"], "d");
        assert_eq!(j["neighbours"][0]["rank"], 1);
    }
}
