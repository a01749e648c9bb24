//! Pieces every loss shares: input checks, distances, masked log-sum-exp.

use candle_core::{DType, Tensor, D};

use crate::{LossError, Result};

/// Squared Euclidean distances between the rows of `a` `[N,D]` and `b` `[P,D]`, `[N,P]`,
/// as `|a|² + |b|² - 2 a·b`, clamped at 0 against rounding: one matrix product and one
/// fused pass each way ([`nofuss_tensor::ops::pairwise_squared_distances`]).
pub fn pairwise_squared_distances(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok(nofuss_tensor::ops::pairwise_squared_distances(a, b)?)
}

/// Rows divided by their L2 norm (zero rows stay zero).
pub(crate) fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    Ok(nofuss_tensor::ops::l2_normalize_rows(x)?)
}

/// The dtype losses compute in: f64 stays f64, everything else becomes f32.
pub(crate) fn compute_dtype(x: &Tensor) -> DType {
    if x.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// Checks that `embeddings` is a non-empty `[N,D]` matrix; returns `(N, D)`.
pub(crate) fn embedding_dims(embeddings: &Tensor) -> Result<(usize, usize)> {
    let (n, d) = embeddings.dims2().map_err(|_| {
        LossError::Shape(format!("embeddings {:?} are not [N,D]", embeddings.dims()))
    })?;
    if n == 0 {
        return Err(LossError::EmptyBatch);
    }
    if d == 0 {
        return Err(LossError::Shape("embeddings have dimension 0".into()));
    }
    Ok((n, d))
}

/// Checks `proxies` `[P,D]` against the embedding dimension `d`; returns `P`.
pub(crate) fn proxy_count(proxies: &Tensor, d: usize) -> Result<usize> {
    let (p, pd) = proxies
        .dims2()
        .map_err(|_| LossError::Shape(format!("proxies {:?} are not [P,D]", proxies.dims())))?;
    if d != pd {
        return Err(LossError::Shape(format!(
            "embedding dimension {d} differs from proxy dimension {pd}"
        )));
    }
    if p == 0 {
        return Err(LossError::Config("no proxies".into()));
    }
    Ok(p)
}

/// Checks what can be checked of class labels without reading them: an integer dtype
/// (u8, u32 or i64), then the shape `[n]`.
pub(crate) fn check_label_tensor(labels: &Tensor, n: usize) -> Result<()> {
    if !matches!(labels.dtype(), DType::U8 | DType::U32 | DType::I64) {
        return Err(LossError::LabelDtype(labels.dtype()));
    }
    if labels.dims() != [n] {
        return Err(LossError::Shape(format!(
            "labels have shape {:?}, expected [{n}]",
            labels.dims()
        )));
    }
    Ok(())
}

/// Reads class labels `[N]` (u8, u32 or i64, non-negative) to the host.
pub(crate) fn host_classes(labels: &Tensor, n: usize) -> Result<Vec<i64>> {
    if labels.dims() != [n] {
        return Err(LossError::Shape(format!(
            "labels have shape {:?}, expected [{n}]",
            labels.dims()
        )));
    }
    let v: Vec<i64> = match labels.dtype() {
        DType::U8 | DType::U32 | DType::I64 => labels.to_dtype(DType::I64)?.to_vec1()?,
        other => return Err(LossError::LabelDtype(other)),
    };
    if let Some((index, &label)) = v.iter().enumerate().find(|(_, &l)| l < 0) {
        return Err(LossError::LabelOutOfRange {
            label,
            index,
            num_proxies: 0,
        });
    }
    Ok(v)
}

/// Reads labels to the host and checks each names one of `num_proxies` proxies.
pub(crate) fn host_labels(labels: &Tensor, n: usize, num_proxies: usize) -> Result<Vec<i64>> {
    let v = host_classes(labels, n)?;
    for (index, &label) in v.iter().enumerate() {
        if label as usize >= num_proxies {
            return Err(LossError::LabelOutOfRange {
                label,
                index,
                num_proxies,
            });
        }
    }
    Ok(v)
}

/// [`LossError::NonFinite`] if `t` holds NaN or infinity (one pass over it; one host
/// sync on a GPU).
pub(crate) fn check_finite(t: &Tensor, what: &'static str) -> Result<()> {
    if nofuss_tensor::ops::all_finite(t)? {
        Ok(())
    } else {
        Err(LossError::NonFinite(what))
    }
}

/// Row-wise `log Σ exp(x)` over the last dimension, stable (the row max is taken out).
/// Entries equal to `-inf` contribute nothing. Callers never pass a row of only `-inf`
/// (its value would be `-inf` and its gradient NaN): anchors without candidates are
/// dropped before.
pub(crate) fn log_sum_exp_rows(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    // A row of only -inf: subtract a finite number instead of -inf (which gives NaN).
    let m_safe = m.clamp(-1e30, 1e30)?;
    let s = x
        .broadcast_sub(&m_safe)?
        .exp()?
        .sum_keepdim(D::Minus1)?
        .log()?;
    Ok((s + m_safe)?.squeeze(D::Minus1)?)
}

/// `x` where `mask` is 1, `-inf` elsewhere.
pub(crate) fn keep_or_neg_inf(mask: &Tensor, x: &Tensor) -> Result<Tensor> {
    let neg_inf = Tensor::full(f64::NEG_INFINITY, x.shape(), x.device())?.to_dtype(x.dtype())?;
    Ok(mask.where_cond(x, &neg_inf)?)
}

/// Normalised embeddings times `s_x` and proxies times `s_p`, in the compute dtype,
/// after optional finiteness checks.
pub(crate) fn prepare(
    embeddings: &Tensor,
    proxies: &Tensor,
    scales: (f64, f64),
    check: bool,
) -> Result<(Tensor, Tensor)> {
    let dt = compute_dtype(embeddings);
    let x = embeddings.to_dtype(dt)?;
    let p = proxies.to_dtype(dt)?;
    if check {
        check_finite(&x, "embeddings")?;
        check_finite(&p, "proxies")?;
    }
    // One fused pass each way per matrix (the proxies are all P of them every step).
    Ok((
        nofuss_tensor::ops::scaled_l2_normalize_rows(&x, scales.0)?,
        nofuss_tensor::ops::scaled_l2_normalize_rows(&p, scales.1)?,
    ))
}

/// Checks a positive finite scale.
pub(crate) fn check_scale(name: &str, v: f64) -> Result<()> {
    if v > 0.0 && v.is_finite() {
        Ok(())
    } else {
        Err(LossError::Config(format!("{name} must be > 0, got {v}")))
    }
}
