//! The summed squares of many tensors at once: the global gradient norm that clipping
//! scales by (`torch.nn.utils.clip_grad_norm_`).
//!
//! On a GPU, per-tensor candle operations (a cast to f64, a square, a sum: three kernels
//! and three buffers per tensor) take about 840 launches for BN-Inception's 280
//! parameter tensors, which costs more host time than the rest of an eager optimiser
//! step. Here the tensors go into `kernels/optim.cu`'s `sumsq_partial` in tables of
//! `TABLE_TENSORS` (`crate::tables`): every block squares and sums one chunk of `TABLE_CHUNK`
//! elements of one tensor in double precision, and `sumsq_total` adds the blocks'
//! partial sums in a fixed order. That is one launch per 64 tensors of a dtype and one
//! more, passed the tensors' addresses as launch parameters (nothing uploaded, so
//! nothing waits, and a CUDA graph captures it as it is), with the same total on every
//! run. On the CPU the sums are candle's per-tensor operations.

// The table serves the CUDA path only.
#![cfg_attr(not(feature = "cuda"), allow(dead_code))]

use candle_core::Tensor;

use crate::tables::TABLE_TENSORS;
use crate::Result;

/// One launch's tensors, as `kernels/optim.cu` declares it: addresses, lengths and each
/// tensor's first block; the launch's block count and where its partial sums start.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct SumsqTable {
    pub data: [u64; TABLE_TENSORS],
    pub len: [i64; TABLE_TENSORS],
    pub first_block: [u32; TABLE_TENSORS],
    pub count: u32,
    pub blocks: u32,
    pub base: u32,
    pub _pad: u32,
}

/// The sum of the squares of every element of `tensors` (f32 or f64), as a scalar f64
/// tensor on their device; `None` for no tensors. On CUDA one launch per
/// `TABLE_TENSORS` tensors of a dtype and one to total them (module docs), with the
/// result left on the device; elsewhere candle's operations.
pub(crate) fn sum_of_squares(tensors: &[&Tensor]) -> Result<Option<Tensor>> {
    let Some(first) = tensors.first() else {
        return Ok(None);
    };
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(dev) = first.device() {
        return Ok(Some(crate::cuda::sum_of_squares(dev, tensors)?));
    }
    let _ = first;
    let sums = tensors
        .iter()
        .map(|t| t.to_dtype(candle_core::DType::F64)?.sqr()?.sum_all())
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Some(Tensor::stack(&sums, 0)?.sum_all()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_on_the_cpu_are_the_squares_in_double() {
        let dev = candle_core::Device::Cpu;
        // 1e20 squared overflows f32, not f64.
        let a = Tensor::new(&[1e20f32, 3.0], &dev).unwrap();
        let b = Tensor::new(&[[0.5f64], [2.0]], &dev).unwrap();
        let s = sum_of_squares(&[&a, &b]).unwrap().unwrap();
        assert_eq!(s.dims(), &[] as &[usize]);
        let big = (1e20f32 as f64).powi(2);
        assert_eq!(s.to_scalar::<f64>().unwrap(), big + 9.0 + 4.25);
        let small = sum_of_squares(&[&b]).unwrap().unwrap();
        assert_eq!(small.to_scalar::<f64>().unwrap(), 4.25);
        assert!(sum_of_squares(&[]).unwrap().is_none());
    }
}
