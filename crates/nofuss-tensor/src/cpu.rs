//! Helpers of the CPU halves of the crate's custom operations.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Layout, Result, WithDType};

/// The contiguous part of a storage a layout describes.
pub(crate) fn slice<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<T>()?[a..b]),
        None => candle_core::bail!("nofuss custom operations need contiguous inputs"),
    }
}

/// A tensor's values as a flat f64 vector (tests compare through it).
#[cfg(test)]
pub(crate) fn values(t: &candle_core::Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1())
        .expect("a tensor readable as f64")
}

/// An f32 or f64 storage's values as f64 (parameters, statistics, distances).
pub(crate) fn to_f64s(s: &CpuStorage, l: &Layout) -> Result<Vec<f64>> {
    Ok(match s {
        CpuStorage::F32(_) => slice::<f32>(s, l)?.iter().map(|&v| v as f64).collect(),
        CpuStorage::F64(_) => slice::<f64>(s, l)?.to_vec(),
        _ => candle_core::bail!("f32 or f64 values expected, got {:?}", s.dtype()),
    })
}

/// f64 results as a storage of `dtype`: f64 stays f64, anything else becomes f32 (the
/// accumulator dtype of the crate's operations).
pub(crate) fn from_f64s(dtype: DType, v: Vec<f64>) -> CpuStorage {
    match dtype {
        DType::F64 => CpuStorage::F64(v),
        _ => CpuStorage::F32(v.into_iter().map(|x| x as f32).collect()),
    }
}

/// Dispatches on a CPU storage's dtype with `$T` bound to its element type (f32, f64,
/// bf16, f16).
macro_rules! with_cpu_dtype {
    ($dt:expr, $T:ident, $body:block) => {
        match $dt {
            candle_core::DType::F32 => {
                type $T = f32;
                $body
            }
            candle_core::DType::F64 => {
                type $T = f64;
                $body
            }
            candle_core::DType::BF16 => {
                type $T = half::bf16;
                $body
            }
            candle_core::DType::F16 => {
                type $T = half::f16;
                $body
            }
            dt => candle_core::bail!("floating-point input expected, got {dt:?}"),
        }
    };
}
pub(crate) use with_cpu_dtype;
