//! `nofuss eval`: retrieval and clustering metrics of embeddings made by any model.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use nofuss_eval::EvalReport;

use crate::{Result, TrainError};

/// Embeddings and labels read from disk.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadedEmbeddings {
    /// `[N, dim]` row-major.
    pub data: Vec<f32>,
    /// Embedding dimension.
    pub dim: usize,
    /// Class of each row.
    pub labels: Vec<u32>,
}

/// An input error about the file `path`.
pub(crate) fn input_err(path: &Path, message: impl Into<String>) -> TrainError {
    TrainError::Input {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// Reads `embeddings` (f32/f16/bf16/f64 `[N, D]`) and `labels` (u8/u32/i64 `[N]`) from a
/// safetensors file holding both, or from two `.npy` files (`labels` given).
pub fn load(embeddings: &Path, labels: Option<&Path>) -> Result<LoadedEmbeddings> {
    let is_npy = embeddings.extension().is_some_and(|e| e == "npy");
    let (emb, lab, lab_path) = if is_npy {
        let lp = labels.ok_or_else(|| {
            input_err(
                embeddings,
                "a .npy embeddings file needs --labels LABELS.npy",
            )
        })?;
        let read = |p: &Path| Tensor::read_npy(p).map_err(|e| input_err(p, e.to_string()));
        (read(embeddings)?, read(lp)?, lp.to_path_buf())
    } else {
        if let Some(lp) = labels {
            return Err(input_err(
                lp,
                "--labels is only for .npy embeddings; a safetensors file holds `labels` itself",
            ));
        }
        let mut t =
            candle_core::safetensors::load(embeddings, &Device::Cpu).map_err(|e| match e {
                // A missing or unreadable file says so as it is.
                candle_core::Error::Io(_) => input_err(embeddings, e.to_string()),
                _ => input_err(
                    embeddings,
                    format!("not a readable safetensors file (or .npy with --labels): {e}"),
                ),
            })?;
        let mut take = |name: &str| {
            t.remove(name).ok_or_else(|| {
                input_err(
                    embeddings,
                    format!(
                        "no tensor named `{name}` (expected `embeddings` [N,D] and `labels` [N])"
                    ),
                )
            })
        };
        (
            take("embeddings")?,
            take("labels")?,
            embeddings.to_path_buf(),
        )
    };
    let (data, n, dim) = rows_of(embeddings, &emb)?;
    let lab = if lab.rank() == 2 && lab.dim(1)? == 1 {
        lab.squeeze(1)?
    } else {
        lab
    };
    if lab.dims() != [n] {
        return Err(input_err(
            &lab_path,
            format!(
                "labels have shape {:?}, expected [{n}] to match the embeddings",
                lab.dims()
            ),
        ));
    }
    let raw: Vec<i64> = match lab.dtype() {
        DType::U8 | DType::U32 | DType::I64 => lab.to_dtype(DType::I64)?.to_vec1()?,
        d => {
            return Err(input_err(
                &lab_path,
                format!("labels must be integers (u8, u32, i64), got {d:?}"),
            ))
        }
    };
    let labels = raw
        .iter()
        .enumerate()
        .map(|(i, &l)| {
            u32::try_from(l).map_err(|_| {
                input_err(&lab_path, format!("label {l} at row {i} is not in 0..2^32"))
            })
        })
        .collect::<Result<Vec<u32>>>()?;
    Ok(LoadedEmbeddings { data, dim, labels })
}

/// The `[N, D]` float rows of `emb` as f32, with N and D.
pub(crate) fn rows_of(path: &Path, emb: &Tensor) -> Result<(Vec<f32>, usize, usize)> {
    let (n, dim) = emb.dims2().map_err(|_| {
        input_err(
            path,
            format!("embeddings have shape {:?}, expected [N, D]", emb.dims()),
        )
    })?;
    let data = match emb.dtype() {
        DType::F32 | DType::F16 | DType::BF16 | DType::F64 => {
            emb.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?
        }
        d => {
            return Err(input_err(
                path,
                format!("embeddings must be floating point, got {d:?}"),
            ))
        }
    };
    Ok((data, n, dim))
}

/// Refuses queries (`queries_dim` wide, read from `queries_path`) and a gallery of
/// another dimension, naming both files (`eval --gallery`, `search --queries`).
pub fn check_same_dim(
    queries_path: &Path,
    queries_dim: usize,
    gallery_path: &Path,
    gallery_dim: usize,
) -> Result<()> {
    if queries_dim != gallery_dim {
        return Err(input_err(
            gallery_path,
            format!(
                "gallery embeddings have dimension {gallery_dim}, the queries ({}) {queries_dim}",
                queries_path.display(),
            ),
        ));
    }
    Ok(())
}

/// The report as JSON: `recall@K`, `nmi`, `map@r`, `r_precision` (null when not computed).
pub fn report_json(r: &EvalReport) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    for (k, v) in &r.recall {
        m.insert(format!("recall@{k}"), (*v).into());
    }
    m.insert("nmi".into(), r.nmi.into());
    m.insert("map@r".into(), r.map_at_r.map(|x| x.map_at_r).into());
    m.insert(
        "r_precision".into(),
        r.map_at_r.map(|x| x.r_precision).into(),
    );
    serde_json::Value::Object(m)
}

/// The report as a two-column table.
pub fn report_table(r: &EvalReport) -> String {
    let mut rows: Vec<(String, f64)> = r
        .recall
        .iter()
        .map(|(k, v)| (format!("Recall@{k}"), *v))
        .collect();
    if let Some(n) = r.nmi {
        rows.push(("NMI".into(), n));
    }
    if let Some(m) = r.map_at_r {
        rows.push(("MAP@R".into(), m.map_at_r));
        rows.push(("R-Precision".into(), m.r_precision));
    }
    rows.iter()
        .map(|(k, v)| format!("{k:<12} {v:.4}\n"))
        .collect()
}
