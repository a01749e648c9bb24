//! The summed squares of many tensors at once: the global gradient norm that clipping
//! scales by (`torch.nn.utils.clip_grad_norm_`).
//!
//! On a GPU, per-tensor candle operations (a cast to f64, a square, a sum: three kernels
//! and three buffers per tensor) take about 840 launches for BN-Inception's 280
//! parameter tensors, which costs more host time than the rest of an eager optimiser
//! step. Here the tensors go into `kernels/optim.cu`'s `sumsq_partial` in tables of
//! [`SUMSQ_TENSORS`]: every block squares and sums one chunk of [`SUMSQ_CHUNK`]
//! elements of one tensor in double precision, and `sumsq_total` adds the blocks'
//! partial sums in a fixed order. That is one launch per 64 tensors of a dtype and one
//! more, passed the tensors' addresses as launch parameters (nothing uploaded, so
//! nothing waits, and a CUDA graph captures it as it is), with the same total on every
//! run. On the CPU the sums are candle's per-tensor operations.

// The launch planning and the table serve the CUDA path only.
#![cfg_attr(not(feature = "cuda"), allow(dead_code))]

use candle_core::Tensor;

use crate::Result;

/// Tensors per launch of `sumsq_partial` (`SUMSQ_TENSORS` in `kernels/optim.cu`).
pub(crate) const SUMSQ_TENSORS: usize = 64;
/// Elements each block of `sumsq_partial` sums (`SUMSQ_CHUNK` in `kernels/optim.cu`).
pub(crate) const SUMSQ_CHUNK: usize = 4096;

/// One launch's tensors, as `kernels/optim.cu` declares it: addresses, lengths and each
/// tensor's first block; the launch's block count and where its partial sums start.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct SumsqTable {
    pub data: [u64; SUMSQ_TENSORS],
    pub len: [i64; SUMSQ_TENSORS],
    pub first_block: [u32; SUMSQ_TENSORS],
    pub count: u32,
    pub blocks: u32,
    pub base: u32,
    pub _pad: u32,
}

/// One launch of a [`plan`]: which tensors (indices into the lengths planned, none
/// empty), the first block of each, the grid, and the launch's first partial sum.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Launch {
    pub tensors: Vec<usize>,
    pub first_block: Vec<u32>,
    pub blocks: u32,
    pub base: u32,
}

/// The largest grid of one launch (CUDA's limit on `gridDim.x`).
const MAX_GRID: u64 = (1 << 31) - 1;

/// The launches that sum tensors of lengths `lens`, their partial sums numbered from
/// `base`, and the number after the last: tensors of no elements are left out, at most
/// [`SUMSQ_TENSORS`] go into a launch, each takes `ceil(len / SUMSQ_CHUNK)` blocks.
pub(crate) fn plan(lens: &[usize], base: u32) -> Result<(Vec<Launch>, u32)> {
    let too_many = || {
        crate::Error::Optim(format!(
            "summed squares of {} elements: more than one launch's grid",
            lens.iter().sum::<usize>()
        ))
    };
    let mut launches: Vec<Launch> = vec![];
    let mut next = base as u64;
    for (i, &len) in lens.iter().enumerate() {
        if len == 0 {
            continue;
        }
        let blocks = len.div_ceil(SUMSQ_CHUNK) as u64;
        let open = launches
            .last()
            .filter(|l| l.tensors.len() < SUMSQ_TENSORS && l.blocks as u64 + blocks <= MAX_GRID);
        if open.is_none() {
            launches.push(Launch {
                tensors: vec![],
                first_block: vec![],
                blocks: 0,
                base: u32::try_from(next).map_err(|_| too_many())?,
            });
        }
        let l = launches.last_mut().expect("a launch was just opened");
        if l.blocks as u64 + blocks > MAX_GRID {
            return Err(too_many());
        }
        l.tensors.push(i);
        l.first_block.push(l.blocks);
        l.blocks += blocks as u32;
        next += blocks;
    }
    let end = u32::try_from(next).map_err(|_| too_many())?;
    Ok((launches, end))
}

/// The sum of the squares of every element of `tensors` (f32 or f64), as a scalar f64
/// tensor on their device; `None` for no tensors. On CUDA one launch per
/// [`SUMSQ_TENSORS`] tensors of a dtype and one to total them (module docs), with the
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
    fn plans_chunk_tensors_skip_empty_ones_and_fill_launches_in_turn() {
        let (l, end) = plan(&[0, 1, SUMSQ_CHUNK, SUMSQ_CHUNK + 1, 0, 3 * SUMSQ_CHUNK], 5).unwrap();
        assert_eq!(
            l,
            vec![Launch {
                tensors: vec![1, 2, 3, 5],
                first_block: vec![0, 1, 2, 4],
                blocks: 7,
                base: 5
            }]
        );
        assert_eq!(end, 12);
        let (l, end) = plan(&[], 3).unwrap();
        assert!(l.is_empty());
        assert_eq!(end, 3);
        assert!(plan(&[0, 0], 0).unwrap().0.is_empty());
    }

    #[test]
    fn a_launch_takes_at_most_its_table_of_tensors() {
        let lens: Vec<usize> = (1..=150).map(|i| i * 1000).collect();
        let (l, end) = plan(&lens, 0).unwrap();
        assert_eq!(
            l.iter().map(|l| l.tensors.len()).collect::<Vec<_>>(),
            [64, 64, 22]
        );
        // Every tensor once, in order; blocks numbered on from launch to launch.
        let all: Vec<usize> = l.iter().flat_map(|l| l.tensors.clone()).collect();
        assert_eq!(all, (0..150).collect::<Vec<_>>());
        let mut base = 0;
        for launch in &l {
            assert_eq!(launch.base, base);
            let mut b = 0;
            for (&t, &f) in launch.tensors.iter().zip(&launch.first_block) {
                assert_eq!(f, b);
                b += lens[t].div_ceil(SUMSQ_CHUNK) as u32;
            }
            assert_eq!(launch.blocks, b);
            base += b;
        }
        assert_eq!(end, base);
    }

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
