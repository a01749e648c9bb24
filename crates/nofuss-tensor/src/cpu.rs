//! Helpers of the CPU halves of the crate's custom operations.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result, WithDType};

/// The contiguous part of a storage a layout describes.
pub(crate) fn slice<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<T>()?[a..b]),
        None => candle_core::bail!("nofuss custom operations need contiguous inputs"),
    }
}

/// A small parameter tensor (`[rows, C]`, f32 or f64) read as f64.
pub(crate) fn params_f64(s: &CpuStorage, l: &Layout) -> Result<Vec<f64>> {
    Ok(match s {
        CpuStorage::F32(_) => slice::<f32>(s, l)?.iter().map(|&v| v as f64).collect(),
        CpuStorage::F64(_) => slice::<f64>(s, l)?.to_vec(),
        _ => candle_core::bail!("parameter tensors must be f32 or f64, not {:?}", s.dtype()),
    })
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
